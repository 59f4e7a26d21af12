"""Triton kernels for the MoE layer's memory-bound steps (CUDA only; the PyTorch references and the custom ops that
pick between them are in kernels/moe_rows.py).

Inductor compiles the same steps from PyTorch indexing, but it loads the row index once per element rather than
once per row, and fuses the sums over a token's K rows into its neighbours' reductions: on an H200 those kernels
moved 1.3-2 TB/s of the 4.8 (bench/profile_train.py). Here each program copies or sums whole rows, index loaded
once per row, so the steps run at copy speed.

* `gather_rows`:  out[j] = src[index[j] // k]                      (dispatch; the combine's backward)
* `sum_rows`:     out[n] = Σ_{j<k} src[index[n·k + j]], fp32 sum     (combine; the dispatch's backward),
                  plus residual[n] when given: the block's residual add in the same pass
* `swiglu_backward`: for h = silu(gate) · up · s (s one scale per row, the routing weight g), given dh:
      d_gate = dh·s · up · σ(gate)(1 + gate(1 − σ(gate))),   d_up = dh·s · silu(gate),
      d_s = Σ_cols dh · silu(gate) · up
  in one pass over [gate; up] and dh, where autograd's graph reads them in two.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# (elements per program, warps): enough bytes in flight per SM for a copy at full bandwidth. At small's rows of
# 1024 on an H200 (bench/moe_rows.py --sweep): gather 8 rows / 8 warps 57 µs; the sum, whose K loads per element
# are in flight at once, 4 rows / 16 warps 41 µs against 47 at 8 / 8
_GATHER = (8192, 8)
_SUM = (4096, 16)


def _blocks(cols: int, elements: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(max(cols, 1)), 2048)
    return max(elements // block_c, 1), block_c


@triton.jit
def _gather_rows_kernel(src, index, out, M, H, k: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    live = rows < M
    source = (tl.load(index + rows, mask=live, other=0) // k).to(tl.int64)
    mask = live[:, None] & (cols[None, :] < H)
    v = tl.load(src + source[:, None] * H + cols[None, :], mask=mask)
    tl.store(out + rows.to(tl.int64)[:, None] * H + cols[None, :], v, mask=mask)


@triton.jit
def _sum_rows_kernel(src, index, out, N, H, residual, k: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    live = rows < N
    mask = live[:, None] & (cols[None, :] < H)
    at = rows.to(tl.int64)[:, None] * H + cols[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(k):
        source = tl.load(index + rows * k + j, mask=live, other=0).to(tl.int64)
        acc += tl.load(src + source[:, None] * H + cols[None, :], mask=mask).to(tl.float32)
    if HAS_RESIDUAL:
        acc += tl.load(residual + at, mask=mask).to(tl.float32)
    tl.store(out + at, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(gate_up, scale, dh, d_gate_up, d_scale, M, I, HAS_SCALE: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < M
    r64 = rows.to(tl.int64)[:, None]
    if HAS_SCALE:
        s = tl.load(scale + rows, mask=live, other=0.0).to(tl.float32)[:, None]
    else:
        s = tl.full((BLOCK_R, 1), 1.0, dtype=tl.float32)
    ds = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, I, BLOCK_I):
        cols = c0 + tl.arange(0, BLOCK_I)[None, :]
        mask = live[:, None] & (cols < I)
        gate = tl.load(gate_up + r64 * (2 * I) + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up + r64 * (2 * I) + I + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dh + r64 * I + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        ds += tl.sum(g * silu * up, axis=1)
        g = g * s
        out_ty = d_gate_up.dtype.element_ty
        tl.store(d_gate_up + r64 * (2 * I) + cols, (g * up * sig * (1 + gate * (1 - sig))).to(out_ty), mask=mask)
        tl.store(d_gate_up + r64 * (2 * I) + I + cols, (g * silu).to(out_ty), mask=mask)
    tl.store(d_scale + rows, ds, mask=live)


def _rows(kernel, src: torch.Tensor, index: torch.Tensor, k: int, n_out: int, config: tuple[int, int],
          dtype: torch.dtype | None = None, **extra) -> torch.Tensor:
    src, index = src.contiguous(), index.contiguous()
    H = src.shape[1]
    out = src.new_empty(n_out, H, dtype=dtype or src.dtype)
    if n_out and H:
        elements, num_warps = config
        block_r, block_h = _blocks(H, elements)
        grid = (triton.cdiv(n_out, block_r), triton.cdiv(H, block_h))
        kernel[grid](src, index, out, n_out, H, k=k, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps, **extra)
    return out


def gather_rows(src: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    return _rows(_gather_rows_kernel, src, index, k, index.numel(), _GATHER)


def sum_rows(src: torch.Tensor, index: torch.Tensor, k: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    if residual is None:   # the pointer is then never read
        return _rows(_sum_rows_kernel, src, index, k, index.numel() // k, _SUM, residual=src, HAS_RESIDUAL=False)
    return _rows(_sum_rows_kernel, src, index, k, index.numel() // k, _SUM,
                 torch.promote_types(src.dtype, residual.dtype), residual=residual.contiguous(), HAS_RESIDUAL=True)


def swiglu_backward(gate_up: torch.Tensor, scale: torch.Tensor | None, dh: torch.Tensor):
    gate_up, dh = gate_up.contiguous(), dh.contiguous()
    M, I = dh.shape
    d_gate_up = torch.empty_like(gate_up)
    d_scale = torch.empty(M, dtype=torch.float32, device=dh.device)
    if M and I:
        block_i = min(triton.next_power_of_2(I), 512)
        block_r = max(4096 // block_i, 1)
        _swiglu_backward_kernel[(triton.cdiv(M, block_r),)](
            gate_up, scale if scale is not None else d_scale, dh, d_gate_up, d_scale, M, I,
            HAS_SCALE=scale is not None, BLOCK_R=block_r, BLOCK_I=block_i, num_warps=8)
    return d_gate_up, d_scale
