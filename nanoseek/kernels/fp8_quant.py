"""Triton FP8 quantization kernels (CUDA only; the PyTorch reference is nanoseek/fp8/quant.py).

Same arithmetic as the reference, bit for bit: with a = max(amax, 1e-12), scale_inv = a / 448 and q =
E4M3_rne(clamp(x · (448 / a), ±448)), the two quotients per tile in IEEE round-to-nearest division (`div_rn`:
Triton's `/` is an approximate divide on CUDA) and one multiply per element.
The outputs are laid out for the GEMMs (fp8/hopper.py): inner dims zero-padded to multiples of 128 and scales in
the layouts `torch._scaled_mm` takes, so no copy is needed between quantization and GEMM. Transposing an fp8 tile
inside a kernel is fragile on sm90 with Triton 3.6: `tl.trans` gave rows of one repeated byte, and storing the tile
at transposed addresses after also storing it row-major (the weight kernel) permuted bytes within groups of four,
10% of Wᵀ wrong (tests/test_fp8_gpu.py, H200); mlc-ai/pith-train#74 reports the first on H100 with Triton 3.7.
So the weight kernel loads each block a second time at transposed addresses (from L2) and quantizes that copy for
Wᵀ, so no fp8 tile is transposed or stored twice (4-5× faster than a PyTorch transpose-copy of W's fp8 bytes), and
only the token tiles, whose one store per tile is transposed and bit-exact on the H200, are transposed in a kernel.

* `act_quant`: one read of x (M, K) gives both operands the recipe needs from an activation:
    rows   1×128 tiles along K (Fprop's x, Dgrad's dy):  q (M, Kp), scale_inv (M, Kt) column-major;
    tokens 128×1 tiles along M, transposed (Wgrad's xᵀ, dyᵀ): q (Kp, T·128), scale_inv (T, Kp) row-major.
  Rows may be grouped (MoE: counts[g] rows per expert): token tiles then restart at each group's first row and
  group g owns the 128-column slices [tile_start_g, tile_end_g) of the transposed output. Given `index`, the
  rows are gathered as they are loaded, row j being x[index[j] // k]: the MoE dispatch (and its adjoint's
  backward) quantizes the tokens in expert order without writing and reading back a bf16 copy of them.
* `weight_quant`: 128×128 blocks of W (N, K) or stacked (G, N, K), returned both ways round (W for Fprop, Wᵀ for
  Dgrad: a 128×128 block quantization of Wᵀ is the transpose of W's, so one quantization gives both).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

BLOCK = 128


class Rows(NamedTuple):
    """1×128 tiles along the last dim: q (M, Kp), scale_inv (M, Kt) column-major; cols = the real K."""
    q: torch.Tensor
    scale_inv: torch.Tensor
    cols: int


class Tokens(NamedTuple):
    """128×1 tiles along tokens, stored transposed: q (Kp, T·128), scale_inv (T, Kp); cols = the real K;
    counts (G,) int32 rows per group, on the device."""
    q: torch.Tensor
    scale_inv: torch.Tensor
    cols: int
    counts: torch.Tensor


class Blocks(NamedTuple):
    """128×128 blocks of (…, N, K): q (…, Np, Kp), qt = its transpose (…, Kp, Np), scale_inv (…, Nt, Kt) and
    its transpose scale_inv_t (…, Kt, Nt), all contiguous; rows, cols = the real N, K."""
    q: torch.Tensor
    qt: torch.Tensor
    scale_inv: torch.Tensor
    scale_inv_t: torch.Tensor
    rows: int
    cols: int


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def token_tiles(rows: int, groups: int) -> int:
    """Upper bound on 128-row tiles when each of `groups` groups starts a new tile: Σ ceil(c_g/128) ≤
    (Σ c_g + 127·G) / 128. Exact for one group."""
    return (rows + (BLOCK - 1) * groups) // BLOCK


@triton.jit
def group_tile(counts_ptr, G, pid, BLOCK_ROWS: tl.constexpr, BLOCK_G: tl.constexpr):
    """Tile `pid` of rows grouped by counts, each group cut into BLOCK_ROWS-row tiles from its first row:
    returns (group, first row of the tile, end row of the group). group >= G for a tile past the last one."""
    idx = tl.arange(0, BLOCK_G)
    counts = tl.load(counts_ptr + idx, mask=idx < G, other=0)
    tiles = (counts + BLOCK_ROWS - 1) // BLOCK_ROWS
    tile_end = tl.cumsum(tiles, axis=0)
    row_end = tl.cumsum(counts, axis=0)
    g = tl.sum((tile_end <= pid).to(tl.int32), axis=0)   # tile_end is non-decreasing: the groups wholly before pid
    this = idx == g
    first_tile = tl.sum(tl.where(this, tile_end - tiles, 0), axis=0)
    end = tl.sum(tl.where(this, row_end, 0), axis=0)
    start = tl.sum(tl.where(this, row_end - counts, 0), axis=0) + (pid - first_tile) * BLOCK_ROWS
    return g, start, end


@triton.jit
def _act_quant_kernel(x_ptr, stride_xm, stride_xk, K, counts_ptr, G, index_ptr, k,
                      q_ptr, stride_qm, s_ptr, stride_sm, stride_sk,
                      qt_ptr, stride_qtk, st_ptr, stride_stt,
                      TOKENS: tl.constexpr, GATHER: tl.constexpr, BLOCK_G: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    g, start, end = group_tile(counts_ptr, G, pid_t, 128, BLOCK_G)
    if g >= G:
        return
    r = tl.arange(0, 128)
    rows = (start + r).to(tl.int64)
    cols = pid_k * 128 + r
    row_ok = rows < end
    src = rows
    if GATHER:
        src = (tl.load(index_ptr + rows, mask=row_ok, other=0) // k).to(tl.int64)
    x = tl.load(x_ptr + src[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=row_ok[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)
    ax = tl.abs(x)
    # 1×128 along K: one scale per row of the tile
    a = tl.maximum(tl.max(ax, axis=1), 1e-12)
    q = tl.clamp(x * tl.math.div_rn(448.0, a)[:, None], -448.0, 448.0).to(tl.float8e4nv)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=row_ok[:, None])
    tl.store(s_ptr + rows * stride_sm + pid_k * stride_sk, tl.math.div_rn(a, 448.0), mask=row_ok)
    if TOKENS:  # 128×1 along tokens: one scale per column of the tile, written transposed
        a = tl.maximum(tl.max(ax, axis=0), 1e-12)
        q = tl.clamp(x * tl.math.div_rn(448.0, a)[None, :], -448.0, 448.0).to(tl.float8e4nv)
        tokens = pid_t.to(tl.int64) * 128 + r
        tl.store(qt_ptr + cols[None, :].to(tl.int64) * stride_qtk + tokens[:, None], q)   # q[r, c] -> qt[c, r]
        tl.store(st_ptr + pid_t * stride_stt + cols, tl.math.div_rn(a, 448.0))


@triton.jit
def _weight_quant_kernel(w_ptr, stride_wg, stride_wn, stride_wk, N, K, Np, Kp,
                         q_ptr, qt_ptr, s_ptr, stride_sg, stride_sn, st_ptr, stride_stg, stride_stk):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    r = tl.arange(0, 128)
    rows = pid_n * 128 + r
    cols = pid_k * 128 + r
    w = tl.load(w_ptr + g * stride_wg + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0).to(tl.float32)
    a = tl.maximum(tl.max(tl.abs(w)), 1e-12)
    scale, scale_inv = tl.math.div_rn(448.0, a), tl.math.div_rn(a, 448.0)
    tl.store(q_ptr + g * Np * Kp + rows[:, None] * Kp + cols[None, :],
             tl.clamp(w * scale, -448.0, 448.0).to(tl.float8e4nv))
    tl.store(s_ptr + g * stride_sg + pid_n * stride_sn + pid_k, scale_inv)
    tl.store(st_ptr + g * stride_stg + pid_k * stride_stk + pid_n, scale_inv)
    # Wᵀ's block (pid_k, pid_n), element [c, n] = W[n, c]: the same block loaded again (from L2) at transposed
    # addresses, in fp32, and quantized with the same scale (see the module docstring for why not a transpose)
    wt = tl.load(w_ptr + g * stride_wg + rows[None, :] * stride_wn + cols[:, None] * stride_wk,
                 mask=(rows[None, :] < N) & (cols[:, None] < K), other=0.0).to(tl.float32)
    tl.store(qt_ptr + g * Np * Kp + cols[:, None] * Np + rows[None, :],
             tl.clamp(wt * scale, -448.0, 448.0).to(tl.float8e4nv))


def block_g(groups: int) -> int:
    return max(16, triton.next_power_of_2(groups))


def act_buffers(M: int, K: int, groups: int, tokens: bool, device) -> tuple[torch.Tensor, ...]:
    """The outputs act_quant writes for x (M, K) in `groups` groups: q, scale_inv (rows) and qt, scale_inv_t
    (token tiles; empty unless `tokens`). Also the shapes and strides that torch.compile is told (fp8/hopper.py)."""
    Kt = cdiv(K, BLOCK)
    Kp, T = Kt * BLOCK, (token_tiles(M, groups) if tokens else 0)
    fp8 = torch.float8_e4m3fn
    return (torch.empty(M, Kp, dtype=fp8, device=device),
            # (M, Kt) column-major with stride exactly M: the only 1×128 layout torch._scaled_mm accepts
            torch.empty(Kt, M, dtype=torch.float32, device=device).t(),
            torch.empty(Kp, T * BLOCK, dtype=fp8, device=device),
            torch.empty(T, Kp, dtype=torch.float32, device=device))


def act_quant(x: torch.Tensor, counts: torch.Tensor | None = None, tokens: bool = False,
              index: torch.Tensor | None = None, k: int = 1):
    """x (M, K) -> (Rows, Tokens or None). counts: (G,) rows per group (None: one group of M). With index (M',),
    the operand is x[index // k] (M' rows), gathered on load."""
    M, K = (x.shape[0] if index is None else index.numel()), x.shape[1]
    counts = (torch.full((1,), M, dtype=torch.int32, device=x.device) if counts is None
              else counts.to(torch.int32))
    G = counts.numel()
    q, s, qt, st = act_buffers(M, K, G, tokens, x.device)
    if M:
        _act_quant_kernel[(token_tiles(M, G), cdiv(K, BLOCK))](
            x, x.stride(0), x.stride(1), K, counts, G, index, k, q, q.stride(0), s, s.stride(0), s.stride(1),
            *((qt, qt.stride(0), st, st.stride(0)) if tokens else (None, 0, None, 0)),   # unused: null pointers
            TOKENS=tokens, GATHER=index is not None, BLOCK_G=block_g(G),
            num_warps=4 if tokens else 8)   # the faster of 4, 8, 16 (H200)
    return Rows(q, s, K), (Tokens(qt, st, K, counts) if tokens else None)


def weight_buffers(G: int, N: int, K: int, device) -> tuple[torch.Tensor, ...]:
    """q (G, Np, Kp), scale_inv (G, Nt, Kt) and its transpose (G, Kt, Nt) that weight_quant writes."""
    Nt, Kt = cdiv(N, BLOCK), cdiv(K, BLOCK)
    return (torch.empty(G, Nt * BLOCK, Kt * BLOCK, dtype=torch.float8_e4m3fn, device=device),
            torch.empty(G, Nt, Kt, dtype=torch.float32, device=device),
            torch.empty(G, Kt, Nt, dtype=torch.float32, device=device))


def weight_quant(w: torch.Tensor) -> Blocks:
    """w (N, K) or (G, N, K) -> Blocks (with the same leading dims)."""
    w3 = w if w.dim() == 3 else w[None]
    G, N, K = w3.shape
    q, s, st = weight_buffers(G, N, K, w.device)
    (_, Np, Kp), (_, Nt, Kt) = q.shape, s.shape
    qt = torch.empty(G, Kp, Np, dtype=q.dtype, device=q.device)
    _weight_quant_kernel[(Nt, Kt, G)](w3, w3.stride(0), w3.stride(1), w3.stride(2), N, K, Np, Kp,
                                      q, qt, s, s.stride(0), s.stride(1), st, st.stride(0), st.stride(1),
                                      num_warps=8)
    if w.dim() == 2:
        q, qt, s, st = q[0], qt[0], s[0], st[0]
    return Blocks(q, qt, s, st, N, K)
