"""FP8 training arithmetic on Hopper: Triton quantization, cuBLAS block-scaled `torch._scaled_mm` for plain
linear layers, Triton grouped GEMMs for the experts. Same interface and numbers as fp8/emulate.py (up to the
GEMMs' summation order and the rounding of their outputs).

Each GEMM tries its paths in order (fp8/paths.py: a path that raises, or whose first result per shape disagrees
with the emulation, falls back for that shape with a one-time warning):
    plain linear:  torch._scaled_mm (cuBLAS, 1×128 · 128×128 and 1×128 · 1×128 scales) → Triton → emulation
    experts:       Triton grouped GEMM → a loop of torch._scaled_mm over experts → emulation
`torch._scaled_grouped_mm` is not used: on sm90 it takes tensor-wise or row-wise scales only, not V3's blocks.

`_scaled_mm` layouts (torch 2.11, sm90): A (M, K) row-major with scale (M, K/128) column-major, strides exactly
(1, M); B passed as Bᵀ of a row-major (N, K) fp8 matrix, with scale (K/128, N/128) the transpose of a contiguous
(N/128, K/128) tensor for 128×128 blocks, or a contiguous (K/128, N) tensor for 1×128 tiles. 128×128 scales are
read right only when K/128 is a multiple of 4 or N ≤ 128 (`paths.scaled_mm_reads`): other shapes pass the same
scales per 1×128 tile of each row of W (a (K/128, N) tensor), which cuBLAS reads right at any K.
K must be a multiple of 128: the quantization kernels write zero-padded operands (zeros add nothing to a dot
product), and outputs are sliced back.
"""
from __future__ import annotations

import torch

from ..kernels import fp8_gemm, fp8_quant
from ..kernels.fp8_quant import BLOCK, Blocks, Rows, Tokens
from .paths import first_that_runs, scaled_mm_reads


class HopperFP8:
    name = "hopper"

    def quant_act(self, x: torch.Tensor, counts: torch.Tensor | None, transposed: bool):
        return fp8_quant.act_quant(x, counts, rows=True, tokens=transposed)

    def quant_weight(self, w: torch.Tensor) -> Blocks:
        return fp8_quant.weight_quant(w)

    def fprop(self, x: Rows, w: Blocks, counts, out_dtype: torch.dtype) -> torch.Tensor:
        """x Wᵀ per group: A = x 1×128, B = W 128×128."""
        return self._rows_gemm("fprop", x, w.q, w.scale_inv, w.rows, counts, out_dtype)

    def dgrad(self, dy: Rows, w: Blocks, counts, out_dtype: torch.dtype) -> torch.Tensor:
        """dy W per group: A = dy 1×128 along N, B = Wᵀ's blocks (the transposed copy)."""
        return self._rows_gemm("dgrad", dy, w.qt, w.scale_inv_t, w.cols, counts, out_dtype)

    def wgrad(self, dy_t: Tokens, x_t: Tokens, counts, out_dtype: torch.dtype) -> torch.Tensor:
        """dyᵀ x per group, inner dim = that group's tokens."""
        key = ("wgrad", dy_t.cols, x_t.cols, dy_t.counts.numel(), out_dtype)
        if counts is None:
            return first_that_runs(key, [("scaled_mm", lambda: _scaled_mm_tokens(dy_t, x_t, out_dtype)),
                                         ("triton", lambda: fp8_gemm.gemm_tokens(dy_t, x_t, out_dtype)[0]),
                                         ("emulated", lambda: _emulated_tokens(dy_t, x_t, out_dtype)[0])])
        return first_that_runs(key, [("triton", lambda: fp8_gemm.gemm_tokens(dy_t, x_t, out_dtype)),
                                     ("scaled_mm loop", lambda: _scaled_mm_tokens_loop(dy_t, x_t, out_dtype)),
                                     ("emulated", lambda: _emulated_tokens(dy_t, x_t, out_dtype))])

    @staticmethod
    def _rows_gemm(op, a: Rows, b, b_scale, n, counts, out_dtype):
        key = (op, n, a.cols, 1 if counts is None else counts.numel(), out_dtype)
        if counts is None:
            return first_that_runs(key, [
                ("scaled_mm", lambda: _scaled_mm_rows(a, b, b_scale, n, out_dtype)),
                ("triton", lambda: fp8_gemm.gemm_rows(a, b[None], b_scale[None], BLOCK, _one_group(a), n,
                                                      out_dtype)),
                ("emulated", lambda: _emulated_rows(a, b[None], b_scale[None], _one_group(a), n, out_dtype))])
        counts = counts.to(torch.int32)
        return first_that_runs(key, [
            ("triton", lambda: fp8_gemm.gemm_rows(a, b, b_scale, BLOCK, counts, n, out_dtype)),
            ("scaled_mm loop", lambda: _scaled_mm_rows_loop(a, b, b_scale, counts, n, out_dtype)),
            ("emulated", lambda: _emulated_rows(a, b, b_scale, counts, n, out_dtype))])


def _one_group(a: Rows) -> torch.Tensor:
    """counts of a plain layer for the grouped kernels: all rows in one group."""
    return torch.full((1,), a.q.shape[0], dtype=torch.int32, device=a.q.device)


# ---- cuBLAS: torch._scaled_mm with DeepSeek-style block scales -------------------------------------------------
def _col_major(s: torch.Tensor) -> torch.Tensor:
    """(M, Kt) with strides (1, M) from a 16-byte aligned start, as `_scaled_mm` takes 1×128 scales (a row slice
    of act_quant's is not)."""
    if s.stride(0) == 1 and (s.shape[1] == 1 or s.stride(1) == s.shape[0]) and s.data_ptr() % 16 == 0:
        return s
    return s.t().contiguous().t()


def _scaled_mm_rows(a: Rows, b: torch.Tensor, b_scale: torch.Tensor, n: int, out_dtype) -> torch.Tensor:
    """a (M, Kp) · b (Np, Kp)ᵀ with b in 128×128 blocks, b_scale (Np/128, Kp/128) row-major."""
    if scaled_mm_reads(b_scale):
        scale_b = b_scale.t()
    else:   # each block's scale repeated for its 128 rows of W: 1×128 tiles, a layout read right at any K
        scale_b = b_scale.repeat_interleave(BLOCK, 0).t().contiguous()
    out = torch._scaled_mm(a.q, b.t(), scale_a=_col_major(a.scale_inv), scale_b=scale_b, out_dtype=out_dtype)
    return out if out.shape[1] == n else out[:, :n]


def _scaled_mm_tokens(a: Tokens, b: Tokens, out_dtype) -> torch.Tensor:
    """One group: a (Np, Tp) · b (Kp, Tp)ᵀ, both 1×128 along tokens; scale_a column-major (Np, T), scale_b the
    row-major (T, Kp) tensor itself."""
    out = torch._scaled_mm(a.q, b.q.t(), scale_a=a.scale_inv.t(), scale_b=b.scale_inv, out_dtype=out_dtype)
    return out[: a.cols, : b.cols]


def _group_bounds(counts: torch.Tensor, block: int) -> list[tuple[int, int, int, int]]:
    """Per group: (first row, end row, first 128-token tile, end tile). Synchronizes with the device."""
    c = counts.tolist()
    rows, tiles, out = 0, 0, []
    for n in c:
        t = -(-n // block)
        out.append((rows, rows + n, tiles, tiles + t))
        rows, tiles = rows + n, tiles + t
    return out


def _scaled_mm_rows_loop(a: Rows, b, b_scale, counts, n, out_dtype) -> torch.Tensor:
    out = torch.empty(a.q.shape[0], n, dtype=out_dtype, device=a.q.device)
    for g, (r0, r1, _, _) in enumerate(_group_bounds(counts, BLOCK)):
        if r1 > r0:
            out[r0:r1] = _scaled_mm_rows(Rows(a.q[r0:r1], a.scale_inv[r0:r1], a.cols), b[g], b_scale[g], n,
                                         out_dtype)
    return out


def _scaled_mm_tokens_loop(a: Tokens, b: Tokens, out_dtype) -> torch.Tensor:
    out = torch.zeros(a.counts.numel(), a.cols, b.cols, dtype=out_dtype, device=a.q.device)
    for g, (_, _, t0, t1) in enumerate(_group_bounds(a.counts, BLOCK)):
        if t1 > t0:
            cols = slice(t0 * BLOCK, t1 * BLOCK)
            ag = Tokens(a.q[:, cols].contiguous(), a.scale_inv[t0:t1], a.cols, a.counts)
            bg = Tokens(b.q[:, cols].contiguous(), b.scale_inv[t0:t1], b.cols, b.counts)
            out[g] = _scaled_mm_tokens(ag, bg, out_dtype)
    return out


# ---- last resort: dequantize the padded operands and multiply in fp32 ---------------------------------------
def _deq(q: torch.Tensor, scale_inv: torch.Tensor, block_rows: int) -> torch.Tensor:
    return q.float() * scale_inv.repeat_interleave(block_rows, 0).repeat_interleave(BLOCK, 1)


def _emulated_rows(a: Rows, b, b_scale, counts, n, out_dtype) -> torch.Tensor:
    x = _deq(a.q, a.scale_inv, 1)
    parts = x.split([r1 - r0 for r0, r1, _, _ in _group_bounds(counts, BLOCK)])
    return torch.cat([p @ _deq(b[g], b_scale[g], BLOCK).t() for g, p in enumerate(parts)])[:, :n].to(out_dtype)


def _emulated_tokens(a: Tokens, b: Tokens, out_dtype) -> torch.Tensor:
    out = []
    for _, _, t0, t1 in _group_bounds(a.counts, BLOCK):
        cols = slice(t0 * BLOCK, t1 * BLOCK)
        out.append(_deq(a.q[:, cols], a.scale_inv[t0:t1].t(), 1) @ _deq(b.q[:, cols], b.scale_inv[t0:t1].t(), 1).t())
    return torch.stack(out)[:, : a.cols, : b.cols].to(out_dtype)
