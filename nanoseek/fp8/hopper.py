"""FP8 training arithmetic on Hopper: Triton quantization, cuBLAS block-scaled `torch._scaled_mm` for plain
linear layers, Gluon (sm90) and Triton grouped GEMMs for the experts. Same interface and numbers as
fp8/emulate.py (up to the GEMMs' summation order and the rounding of their outputs).

Each GEMM tries its paths in order (fp8/paths.py: a path that raises, or whose first result per shape disagrees
with the emulation, falls back for that shape with a one-time warning):
    plain linear:  torch._scaled_mm (cuBLAS, 1×128 · 128×128 and 1×128 · 1×128 scales) → Triton → emulation
    experts:       Gluon grouped GEMM (sm90 only) → Triton grouped GEMM → a loop of torch._scaled_mm
                   over experts → emulation
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

from typing import Optional

import torch

from ..kernels import fp8_gemm, fp8_gemm_sm90, fp8_quant
from ..kernels.fp8_quant import BLOCK, Blocks, Rows, Tokens
from .paths import first_that_runs, scaled_mm_reads


class HopperFP8:
    """The interface of fp8/emulate.py on the GPU. Each quantization and GEMM is a torch.library custom op (below):
    torch.compile traces FP8Matmul through them, so a compiled block keeps its FP8 layers inside one graph and
    its CUDA graphs replay them with no host work; the path choice runs inside the ops, where compile never looks."""
    name = "hopper"
    traceable = True

    def quant_act(self, x: torch.Tensor, counts: torch.Tensor | None, transposed: bool,
                  index: torch.Tensor | None = None, k: int = 1):
        """The operand x, or x[index // k] gathered as it is quantized (kernels/fp8_quant.py)."""
        rows = x.shape[0] if index is None else index.numel()
        counts = (torch.full((1,), rows, dtype=torch.int32, device=x.device) if counts is None
                  else counts.to(torch.int32))
        q, s, qt, st = torch.ops.nanoseek.fp8_act_quant(x, counts, transposed, index, k)
        return Rows(q, s, x.shape[1]), (Tokens(qt, st, x.shape[1], counts) if transposed else None)

    def quant_weight(self, w: torch.Tensor) -> Blocks:
        return Blocks(*torch.ops.nanoseek.fp8_weight_quant(w), w.shape[-2], w.shape[-1])

    @staticmethod
    def for_dgrad(w: Blocks) -> Blocks:
        """What backward keeps of the quantized weight: Wᵀ's copy and scales (W's, one byte per weight, is freed)."""
        return w._replace(q=None, scale_inv=None)

    def fprop(self, x: Rows, w: Blocks, counts, out_dtype: torch.dtype) -> torch.Tensor:
        """x Wᵀ per group: A = x 1×128, B = W 128×128."""
        return torch.ops.nanoseek.fp8_gemm_rows("fprop", x.q, x.scale_inv, x.cols, w.q, w.scale_inv, w.rows, counts,
                                                out_dtype)

    def dgrad(self, dy: Rows, w: Blocks, counts, out_dtype: torch.dtype) -> torch.Tensor:
        """dy W per group: A = dy 1×128 along N, B = Wᵀ's blocks (the transposed copy)."""
        return torch.ops.nanoseek.fp8_gemm_rows("dgrad", dy.q, dy.scale_inv, dy.cols, w.qt, w.scale_inv_t, w.cols,
                                                counts, out_dtype)

    def wgrad(self, dy_t: Tokens, x_t: Tokens, counts, out_dtype: torch.dtype) -> torch.Tensor:
        """dyᵀ x per group, inner dim = that group's tokens."""
        return torch.ops.nanoseek.fp8_gemm_tokens(dy_t.q, dy_t.scale_inv, dy_t.cols, x_t.q, x_t.scale_inv, x_t.cols,
                                                  dy_t.counts, counts is not None, out_dtype)


# ---- the custom ops: real kernels, and fake ones that give torch.compile the output shapes and strides ----------
@torch.library.custom_op("nanoseek::fp8_act_quant", mutates_args=())
def _act_quant_op(x: torch.Tensor, counts: torch.Tensor, tokens: bool, index: Optional[torch.Tensor], k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, t = fp8_quant.act_quant(x, counts, tokens, index, k)
    empty = fp8_quant.act_buffers(0, x.shape[1], 1, False, x.device)[2:]   # what an unused token operand is
    return (rows.q, rows.scale_inv, *((t.q, t.scale_inv) if tokens else empty))


@_act_quant_op.register_fake
def _(x, counts, tokens, index, k):
    rows = x.shape[0] if index is None else index.numel()
    return fp8_quant.act_buffers(rows, x.shape[1], counts.numel(), tokens, x.device)


@torch.library.custom_op("nanoseek::fp8_weight_quant", mutates_args=())
def _weight_quant_op(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(fp8_quant.weight_quant(w)[:4])


@_weight_quant_op.register_fake
def _(w):
    G, (N, K) = (w.shape[0] if w.dim() == 3 else 1), w.shape[-2:]
    q, s, st = fp8_quant.weight_buffers(G, N, K, w.device)
    out = (q, q.transpose(1, 2).contiguous(), s, st)
    return out if w.dim() == 3 else tuple(t[0] for t in out)


@torch.library.custom_op("nanoseek::fp8_gemm_rows", mutates_args=())
def _gemm_rows_op(op: str, a_q: torch.Tensor, a_scale: torch.Tensor, a_cols: int, b: torch.Tensor,
                  b_scale: torch.Tensor, n: int, counts: Optional[torch.Tensor], out_dtype: torch.dtype,
                  ) -> torch.Tensor:   # typing.Optional: the spelling torch.library's schema inference has read longest
    return _rows_gemm(op, Rows(a_q, a_scale, a_cols), b, b_scale, n, counts, out_dtype).contiguous()


@_gemm_rows_op.register_fake
def _(op, a_q, a_scale, a_cols, b, b_scale, n, counts, out_dtype):
    return a_q.new_empty(a_q.shape[0], n, dtype=out_dtype)


@torch.library.custom_op("nanoseek::fp8_gemm_tokens", mutates_args=())
def _gemm_tokens_op(a_q: torch.Tensor, a_scale: torch.Tensor, a_cols: int, b_q: torch.Tensor, b_scale: torch.Tensor,
                    b_cols: int, counts: torch.Tensor, grouped: bool, out_dtype: torch.dtype) -> torch.Tensor:
    return _tokens_gemm(Tokens(a_q, a_scale, a_cols, counts), Tokens(b_q, b_scale, b_cols, counts), grouped,
                        out_dtype).contiguous()


@_gemm_tokens_op.register_fake
def _(a_q, a_scale, a_cols, b_q, b_scale, b_cols, counts, grouped, out_dtype):
    return a_q.new_empty(*((counts.numel(),) if grouped else ()), a_cols, b_cols, dtype=out_dtype)


# ---- each GEMM's paths, in order (fp8/paths.py) ------------------------------------------------------------
def _tokens_gemm(dy_t: Tokens, x_t: Tokens, grouped: bool, out_dtype) -> torch.Tensor:
    key = ("wgrad", dy_t.cols, x_t.cols, dy_t.counts.numel(), out_dtype)
    if not grouped:
        return first_that_runs(key, [("scaled_mm", lambda: _scaled_mm_tokens(dy_t, x_t, out_dtype)),
                                     ("triton", lambda: fp8_gemm.gemm_tokens(dy_t, x_t, out_dtype)[0]),
                                     ("emulated", lambda: _emulated_tokens(dy_t, x_t, out_dtype)[0])])
    return first_that_runs(key, [
        *([("gluon", lambda: fp8_gemm_sm90.gemm_tokens(dy_t, x_t, out_dtype))] if _sm90(dy_t.q) else []),
        ("triton", lambda: fp8_gemm.gemm_tokens(dy_t, x_t, out_dtype)),
        ("scaled_mm loop", lambda: _scaled_mm_tokens_loop(dy_t, x_t, out_dtype)),
        ("emulated", lambda: _emulated_tokens(dy_t, x_t, out_dtype))])


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
        *([("gluon", lambda: fp8_gemm_sm90.gemm_rows(a, b, b_scale, counts, n, out_dtype))] if _sm90(a.q) else []),
        ("triton", lambda: fp8_gemm.gemm_rows(a, b, b_scale, BLOCK, counts, n, out_dtype)),
        ("scaled_mm loop", lambda: _scaled_mm_rows_loop(a, b, b_scale, counts, n, out_dtype)),
        ("emulated", lambda: _emulated_rows(a, b, b_scale, counts, n, out_dtype))])


def _sm90(t: torch.Tensor) -> bool:
    """The Gluon kernels are written for Hopper (sm90) alone."""
    return t.is_cuda and torch.cuda.get_device_capability(t.device) == (9, 0)


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
