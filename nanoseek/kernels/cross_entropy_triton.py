"""Cross-entropy and its gradient on a chunk of logits, one Triton program per row (CUDA only; the PyTorch
reference is kernels/cross_entropy.py's `loss_and_grad_reference`):

    lse = log Σ_j exp(z_j),   loss = lse − z_y,   G_j = exp(z_j − lse) − [j = y]      (zero on ignored rows)

Two passes over the row: an online max and sum per lane (rescaled when the max grows), then G, which may be
written over the logits (each element is read before it is overwritten, by the same thread). inductor's kernel
for the same formulas takes three (max, sum, G). The second pass finds most of the row still in L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _loss_grad_kernel(logits, labels, loss, grad, V, ignore_index, BLOCK: tl.constexpr, WANT_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * V
    y = tl.load(labels + row)
    valid = y != ignore_index
    cols = tl.arange(0, BLOCK)
    m_lane = tl.full([BLOCK], -float("inf"), tl.float32)
    s_lane = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        z = tl.load(base + start + cols, mask=start + cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m_lane, z)
        safe = tl.where(m_new == -float("inf"), 0.0, m_new)   # lanes with no value yet: s stays 0, no NaN
        s_lane = s_lane * tl.exp(m_lane - safe) + tl.exp(z - safe)
        m_lane = m_new
    m = tl.max(m_lane, 0)
    lse = m + tl.log(tl.sum(s_lane * tl.exp(m_lane - m), 0))
    z_y = tl.load(base + tl.where(valid, y, 0)).to(tl.float32)
    tl.store(loss + row, tl.where(valid, lse - z_y, 0.0))
    if WANT_GRAD:
        out = grad + row * V
        for start in range(0, V, BLOCK):
            idx = start + cols
            z = tl.load(base + idx, mask=idx < V, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - (idx == y).to(tl.float32)
            tl.store(out + idx, tl.where(valid, g, 0.0).to(grad.dtype.element_ty), mask=idx < V)


def loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, want_grad: bool,
                  block: int = 2048, num_warps: int = 8, inplace: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (n, V) contiguous, labels (n,) -> (Σ_rows loss in fp32, G in the logits' dtype or None); with
    `inplace` G is the logits tensor, overwritten."""
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if not want_grad:
        grad = loss   # unused pointer
    else:
        grad = logits if inplace else torch.empty_like(logits)
    if n:
        _loss_grad_kernel[(n,)](logits, labels, loss, grad, V, ignore_index, BLOCK=block, WANT_GRAD=want_grad,
                                num_warps=num_warps)
    return loss.sum(), (grad if want_grad else None)
