"""MLA's q and k for the attention kernel, with RoPE on their decoupled dims, as one custom op: Triton kernels on
CUDA (kernels/rope_triton.py), the plain-PyTorch reference below everywhere else.

    q = [q_nope; RoPE(q_rope)]                   per head, from W_UQ's output (B, T, H, d_nope + d_rope)
    k = [k_nope; RoPE(k_rope)]                   k_nope per head (W_UKV's output), k_rope one per token

Backward is the transpose: RoPE rotates each pair by +θ, its adjoint by −θ (the same formula with sin negated),
and the shared k_rope's gradient is the rotation of its gradients summed over heads.

Compiled from the PyTorch code, the concatenations and the rotation of interleaved pairs became element-wise
kernels taking 1.86 ms a step at `small` on an H200 (bench/profile_train.py). As a custom op they are 1.23 ms
(row kernels at ~16 µs a call; k's backward, the copy of dk_nope and the head sum in one kernel, 29 µs before its
tile was retuned, 7-8 µs alone since in bench/rope.py), and the step 61.7 → 61.15 ms in one run
(bench/train.py --variants bf16-graph, this op against its reference compiled, 2026-12-02).
"""
from __future__ import annotations

import torch

from . import have_triton


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate pairs of x (B, T, [H,] d) by the angles in cos/sin (B, T, d/2), in fp32 (or x's wider dtype):
        (x1, x2) -> (x1 cos θ − x2 sin θ,  x2 cos θ + x1 sin θ)
    Pairs are (x0,x1),(x2,x3),… when `interleave` (DeepSeek's checkpoints), else (x_i, x_{i+d/2}).
    Output keeps the input layout, so q·k is the same either way for matching layouts.
    """
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype)


def rope_qk_reference(q: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    d_nope = k_nope.shape[-1]
    q_nope, q_rope = q.split([d_nope, q.shape[-1] - d_nope], dim=-1)
    k_rope = apply_rope(k_rope, cos, sin, interleave)
    return (torch.cat([q_nope, apply_rope(q_rope, cos, sin, interleave)], dim=-1),
            torch.cat([k_nope, k_rope[:, :, None].expand(*k_nope.shape[:-1], -1)], dim=-1))


def rope_qk_backward_reference(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                               d_nope: int, interleave: bool):
    """(dq (B, T, H, d_qk), dk likewise) -> gradients of q, k_nope and k_rope; the head sum in fp32 or wider."""
    dq_nope, dq_rope = dq.split([d_nope, dq.shape[-1] - d_nope], dim=-1)
    dk_rope = dk[..., d_nope:].to(torch.promote_types(dk.dtype, torch.float32)).sum(2)
    return (torch.cat([dq_nope, apply_rope(dq_rope, cos, -sin, interleave)], dim=-1),
            dk[..., :d_nope].clone(memory_format=torch.contiguous_format),
            apply_rope(dk_rope, cos, -sin, interleave).to(dk.dtype))


def _triton(t: torch.Tensor, d_rope: int) -> bool:
    if not (t.is_cuda and t.dtype in (torch.bfloat16, torch.float16, torch.float32) and have_triton()):
        return False
    from . import rope_triton
    return rope_triton.supports(d_rope)


@torch.library.custom_op("nanoseek::rope_qk", mutates_args=())
def rope_qk(q: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, T, H, d_nope + d_rope), k_nope (B, T, H, d_nope), k_rope (B, T, d_rope), cos/sin (B, T, d_rope/2)
    -> q, k (B, T, H, d_nope + d_rope), contiguous. Inputs may be strided views (their last dim contiguous)."""
    if _triton(q, q.shape[-1] - k_nope.shape[-1]):
        from . import rope_triton
        return rope_triton.rope_qk(q, k_nope, k_rope, cos, sin, interleave)
    return rope_qk_reference(q, k_nope, k_rope, cos, sin, interleave)


@rope_qk.register_fake
def _(q, k_nope, k_rope, cos, sin, interleave):
    return (q.new_empty(q.shape), k_nope.new_empty(*k_nope.shape[:-1], q.shape[-1]))


@torch.library.custom_op("nanoseek::rope_qk_backward", mutates_args=())
def rope_qk_backward(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, d_nope: int,
                     interleave: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _triton(dq, dq.shape[-1] - d_nope):
        from . import rope_triton
        return rope_triton.rope_qk_backward(dq, dk, cos, sin, d_nope, interleave)
    return rope_qk_backward_reference(dq, dk, cos, sin, d_nope, interleave)


@rope_qk_backward.register_fake
def _(dq, dk, cos, sin, d_nope, interleave):
    B, T, H, _ = dk.shape
    return (dq.new_empty(dq.shape), dk.new_empty(B, T, H, d_nope), dk.new_empty(B, T, dk.shape[-1] - d_nope))


def _setup(ctx, inputs, output):
    _, k_nope, _, cos, sin, interleave = inputs
    ctx.save_for_backward(cos, sin)
    ctx.d_nope, ctx.interleave = k_nope.shape[-1], interleave


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    d_q, d_k_nope, d_k_rope = rope_qk_backward(dq, dk, cos, sin, ctx.d_nope, ctx.interleave)
    return d_q, d_k_nope, d_k_rope, None, None, None


rope_qk.register_autograd(_backward, setup_context=_setup)
