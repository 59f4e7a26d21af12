"""Triton kernels for MLA's q/k assembly with RoPE (CUDA only; the PyTorch reference and the custom ops are in
kernels/rope.py).

* `_rope_rows_kernel`: out[b, t, h] = [nope[b, t, h]; R(±θ_t) rope[b, t, h]], one (position block, batch row,
  head) per program: q forward (rope = q's own last dims), k forward (rope = the token's shared k_rope, head
  stride 0) and q backward (−θ).
* `_k_backward_kernel`: k's gradient split back: dk[..., :d_nope] copied out (k_nope's gradient) and
  R(−θ_t) Σ_h dk[b, t, h, d_nope:] (the shared k_rope's, summed in fp32), one pass over all heads of a block of
  positions (the copy was a strided clone of its own before, at ~1.5 TB/s).

Rows are addressed by (batch, position, head) strides, so the GEMM outputs and the attention kernel's gradients
are read where they lie, without copies; each row's rope dims are loaded and stored whole and their pairs split
and joined in registers (a first version that loaded and stored the pair members as separate strided accesses,
with the grid's row index divided into (batch, position), ran at ~0.6 TB/s on an H200).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 64        # positions of one head per program
# k's backward: elements of dk per program (positions × heads × dims, padded), and warps per 8192 of them. At
# small on an H200 (bench/rope.py --sweep): 16 positions × 8 heads on 2 warps 7.3 µs, 32 on 4 8.4 µs, while 8
# positions on 4 warps took 25.7 µs (each warp then holds fewer heads, and the head sum crosses warps)
K_ELEMENTS = 16384


@triton.jit
def _rotate(x, c, s, BLOCK_T: tl.constexpr, D_ROPE: tl.constexpr, INTERLEAVE: tl.constexpr):
    """x (BLOCK_T, D_ROPE) in fp32 -> each pair (x1, x2) rotated to (x1 c − x2 s, x2 c + x1 s); c, s (BLOCK_T,
    D_ROPE/2). Pairs are adjacent dims when INTERLEAVE, else dims i and i + D_ROPE/2."""
    if INTERLEAVE:
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_T, D_ROPE // 2, 2)))
        return tl.reshape(tl.join(x1 * c - x2 * s, x2 * c + x1 * s), (BLOCK_T, D_ROPE))
    x1, x2 = tl.split(tl.permute(tl.reshape(x, (BLOCK_T, 2, D_ROPE // 2)), (0, 2, 1)))
    return tl.reshape(tl.permute(tl.join(x1 * c - x2 * s, x2 * c + x1 * s), (0, 2, 1)), (BLOCK_T, D_ROPE))


@triton.jit
def _rope_rows_kernel(nope, rope, cos, sin, out, T, H, s_nb, s_nt, s_nh, s_rb, s_rt, s_rh, s_cb, s_ct,
                      SIGN: tl.constexpr, D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, P_NOPE: tl.constexpr,
                      BLOCK_T: tl.constexpr, INTERLEAVE: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    live = (t < T)[:, None]
    t = t.to(tl.int64)
    row = out + (((b * T + t) * H + h) * (D_NOPE + D_ROPE))[:, None]
    j = tl.arange(0, P_NOPE)[None, :]
    x = tl.load(nope + (b * s_nb + h * s_nh + t * s_nt)[:, None] + j, mask=live & (j < D_NOPE))
    tl.store(row + j, x.to(out.dtype.element_ty), mask=live & (j < D_NOPE))
    i = tl.arange(0, D_ROPE // 2)[None, :]
    c = tl.load(cos + (b * s_cb + t * s_ct)[:, None] + i, mask=live).to(tl.float32)
    s = tl.load(sin + (b * s_cb + t * s_ct)[:, None] + i, mask=live).to(tl.float32) * SIGN
    r = tl.arange(0, D_ROPE)[None, :]
    x = tl.load(rope + (b * s_rb + h * s_rh + t * s_rt)[:, None] + r, mask=live).to(tl.float32)
    y = _rotate(x, c, s, BLOCK_T, D_ROPE, INTERLEAVE)
    tl.store(row + D_NOPE + r, y.to(out.dtype.element_ty), mask=live)


@triton.jit
def _k_backward_kernel(dk, cos, sin, d_nope, d_rope, T, H, s_b, s_t, s_h, s_cb, s_ct, D_NOPE: tl.constexpr,
                       D_ROPE: tl.constexpr, P_NOPE: tl.constexpr, P_H: tl.constexpr, BLOCK_T: tl.constexpr,
                       INTERLEAVE: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1).to(tl.int64)
    live = t < T
    t = t.to(tl.int64)
    h = tl.arange(0, P_H).to(tl.int64)
    rows = (b * s_b + t * s_t)[:, None, None] + (h * s_h)[None, :, None]            # (BLOCK_T, P_H, 1)
    live3 = live[:, None, None] & (h < H)[None, :, None]
    j = tl.arange(0, P_NOPE)[None, None, :]
    x = tl.load(dk + rows + j, mask=live3 & (j < D_NOPE))
    dst = (((b * T + t)[:, None] * H + h[None, :]) * D_NOPE)[:, :, None]
    tl.store(d_nope + dst + j, x, mask=live3 & (j < D_NOPE))
    r = tl.arange(0, D_ROPE)[None, None, :]
    g = tl.sum(tl.load(dk + rows + D_NOPE + r, mask=live3, other=0.0).to(tl.float32), axis=1)
    i = tl.arange(0, D_ROPE // 2)[None, :]
    c = tl.load(cos + (b * s_cb + t * s_ct)[:, None] + i, mask=live[:, None]).to(tl.float32)
    s = -tl.load(sin + (b * s_cb + t * s_ct)[:, None] + i, mask=live[:, None]).to(tl.float32)
    y = _rotate(g, c, s, BLOCK_T, D_ROPE, INTERLEAVE)
    r2 = tl.arange(0, D_ROPE)[None, :]
    tl.store(d_rope + ((b * T + t) * D_ROPE)[:, None] + r2, y.to(d_rope.dtype.element_ty), mask=live[:, None])


def supports(d_rope: int) -> bool:
    """The rope dims are one block of registers: a power of two."""
    return d_rope >= 2 and d_rope & (d_rope - 1) == 0


def _check(*tensors: torch.Tensor):
    for x in tensors:
        if x.stride(-1) != 1:
            raise ValueError(f"rope_qk: the last dim must be contiguous, got strides {tuple(x.stride())}")


def _rows(nope, rope, cos, sin, out, sign: int, interleave: bool, rope_per_head: bool):
    B, T, H, d_nope = nope.shape
    d_rope = out.shape[-1] - d_nope
    _check(nope, rope, cos)
    if B * T * H == 0:
        return out
    _rope_rows_kernel[(triton.cdiv(T, BLOCK_T), B, H)](
        nope, rope, cos, sin, out, T, H, nope.stride(0), nope.stride(1), nope.stride(2), rope.stride(0),
        rope.stride(1), rope.stride(2) if rope_per_head else 0, cos.stride(0), cos.stride(1),
        SIGN=sign, D_NOPE=d_nope, D_ROPE=d_rope, P_NOPE=triton.next_power_of_2(max(d_nope, 1)), BLOCK_T=BLOCK_T,
        INTERLEAVE=interleave, num_warps=4)
    return out


def _angles(cos: torch.Tensor, sin: torch.Tensor, B: int, T: int):
    # cos/sin may broadcast over the batch (stride 0): strides are read as they are
    return cos.expand(B, T, cos.shape[-1]), sin.expand(B, T, sin.shape[-1])


def rope_qk(q, k_nope, k_rope, cos, sin, interleave: bool):
    B, T, H, d_qk = q.shape
    d_nope = k_nope.shape[-1]
    cos, sin = _angles(cos, sin, B, T)
    q_out = q.new_empty(B, T, H, d_qk)
    k_out = k_nope.new_empty(B, T, H, d_qk)
    _rows(q[..., :d_nope], q[..., d_nope:], cos, sin, q_out, 1, interleave, rope_per_head=True)
    _rows(k_nope, k_rope, cos, sin, k_out, 1, interleave, rope_per_head=False)
    return q_out, k_out


def rope_qk_backward(dq, dk, cos, sin, d_nope: int, interleave: bool):
    B, T, H, d_qk = dq.shape
    d_rope = d_qk - d_nope
    cos, sin = _angles(cos, sin, B, T)
    d_q = dq.new_empty(B, T, H, d_qk)
    _rows(dq[..., :d_nope], dq[..., d_nope:], cos, sin, d_q, -1, interleave, rope_per_head=True)
    d_k_nope = dk.new_empty(B, T, H, d_nope)
    d_k_rope = dk.new_empty(B, T, d_rope)
    _check(dk)
    if B * T and H:
        p_h, p_nope = triton.next_power_of_2(H), triton.next_power_of_2(max(d_nope, 1))
        row = p_h * (p_nope + d_rope)
        block_t = 1 << (max(K_ELEMENTS // row, 1).bit_length() - 1)   # a power of two
        num_warps = min(max(triton.next_power_of_2(block_t * row // 8192), 2), 8)
        _k_backward_kernel[(triton.cdiv(T, block_t), B)](
            dk, cos, sin, d_k_nope, d_k_rope, T, H, dk.stride(0), dk.stride(1), dk.stride(2), cos.stride(0),
            cos.stride(1), D_NOPE=d_nope, D_ROPE=d_rope, P_NOPE=p_nope, P_H=p_h, BLOCK_T=block_t,
            INTERLEAVE=interleave, num_warps=num_warps)
    return d_q, d_k_nope, d_k_rope
