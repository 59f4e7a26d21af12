"""Triton block-scaled FP8 GEMMs with grouped rows (CUDA only; reference: nanoseek/fp8/emulate.py).

Both operands are E4M3 with their scales along the inner dim K in 128-deep tiles (kernels/fp8_quant.py layouts).
Each 128-deep partial product runs on the tensor cores and is promoted to an FP32 accumulator with its scales,
V3's fine-grained accumulation (§3.3.2, promotion interval N_C = 128):

    C[m, n] = Σ_kb  (A_kb · B_kbᵀ)[m, n] · sa[m, kb] · sb[n, kb]

* `gemm_rows`: rows of A grouped (counts[g] consecutive rows use weight g): Fprop and Dgrad of the experts, and
  of a plain linear layer as one group. B's scale is per 128×128 block (weights) via B_ROWS_PER_SCALE = 128.
* `gemm_tokens`: the inner dim grouped (Wgrad: dW_g = dy_gᵀ x_g over the tokens of group g), both operands in
  the transposed token-tile layout, each group's tiles starting at a 128 boundary.

No host synchronization: the tile → group map is computed in the kernel from the counts on the device, so
routing stays static-shaped. Both kernels can load their fp8 tiles through TMA tensor descriptors (`TMA` in
their configs) instead of pointer arithmetic: on an H200 (bench/fp8_tune.py, BENCHMARKS.md) that makes Wgrad
13% faster and Fprop / Dgrad 4-12% slower, so only the Wgrad kernel uses it by default.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .fp8_quant import BLOCK, Rows, Tokens, block_g, cdiv, group_tile


@triton.jit
def _gemm_rows_kernel(a_ptr, stride_am, sa_ptr, stride_sam, stride_sak,
                      b_ptr, stride_bg, stride_bn, sb_ptr, stride_sbg, stride_sbn, stride_sbk,
                      c_ptr, stride_cm, counts_ptr, G, N, Np, Kt,
                      B_ROWS_PER_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_G: tl.constexpr, TMA: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g, start, end = group_tile(counts_ptr, G, pid_m, BLOCK_M, BLOCK_G)
    if g >= G:
        return
    g = g.to(tl.int64)
    rm = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < end
    n_ok = rn < Np
    if not TMA:
        rk = tl.arange(0, 128)
        a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :]
        b_ptrs = b_ptr + g * stride_bg + rn[None, :].to(tl.int64) * stride_bn + rk[:, None]   # (128, BLOCK_N)
    sa_ptrs = sa_ptr + rm * stride_sam
    sb_ptrs = sb_ptr + g * stride_sbg + (rn // B_ROWS_PER_SCALE) * stride_sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, Kt):
        if TMA:   # a_ptr, b_ptr are tensor descriptors: A rows past the group (next group's, or zeros past M)
            # and B rows past this expert's Np add nothing, as their scales below load as 0
            a = a_ptr.load([start, kb * 128])
            b = b_ptr.load([(g * Np + pid_n * BLOCK_N).to(tl.int32), kb * 128]).T
        else:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
            a_ptrs += 128
            b_ptrs += 128
        sa = tl.load(sa_ptrs + kb * stride_sak, mask=m_ok, other=0.0)
        sb = tl.load(sb_ptrs + kb * stride_sbk, mask=n_ok, other=0.0)
        acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (rn[None, :] < N))


@triton.jit
def _gemm_tokens_kernel(a_ptr, stride_an, sa_ptr, stride_sat, b_ptr, stride_bk, sb_ptr, stride_sbt,
                        c_ptr, stride_cg, stride_cn, counts_ptr, G, N, K, Np, Kp,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, TMA: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2)
    idx = tl.arange(0, BLOCK_G)
    counts = tl.load(counts_ptr + idx, mask=idx < G, other=0)
    tiles = (counts + 127) // 128
    tile_end = tl.cumsum(tiles, axis=0)
    t_end = tl.sum(tl.where(idx == g, tile_end, 0), axis=0)
    t_start = t_end - tl.sum(tl.where(idx == g, tiles, 0), axis=0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rt = t_start.to(tl.int64) * 128 + tl.arange(0, 128)
    n_ok = rn < Np
    k_ok = rk < Kp
    if not TMA:
        a_ptrs = a_ptr + rn[:, None].to(tl.int64) * stride_an + rt[None, :]      # dyᵀ (BLOCK_N, 128 tokens)
        b_ptrs = b_ptr + rk[None, :].to(tl.int64) * stride_bk + rt[:, None]      # xᵀ as (128 tokens, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t in range(t_start, t_end):
        if TMA:   # descriptors over dyᵀ and xᵀ; rows past Np, Kp load as zeros
            a = a_ptr.load([pid_n * BLOCK_N, t * 128])
            b = b_ptr.load([pid_k * BLOCK_K, t * 128]).T
        else:
            a = tl.load(a_ptrs, mask=n_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[None, :], other=0.0)
            a_ptrs += 128
            b_ptrs += 128
        sa = tl.load(sa_ptr + t * stride_sat + rn, mask=n_ok, other=0.0)
        sb = tl.load(sb_ptr + t * stride_sbt + rk, mask=k_ok, other=0.0)
        acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
    tl.store(c_ptr + g.to(tl.int64) * stride_cg + rn[:, None] * stride_cn + rk[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=(rn[:, None] < N) & (rk[None, :] < K))


def rows_config(M: int, G: int) -> dict:
    """Tile shape and pipelining of `gemm_rows` (bench/fp8_tune.py times alternatives)."""
    block_m = 64 if M < 256 * G else 128    # small groups waste less of a 64-row tile
    return dict(BLOCK_M=block_m, BLOCK_N=128, num_warps=4 if block_m == 64 else 8, num_stages=3, TMA=False)


TOKENS_CONFIG = dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, TMA=True)


def gemm_rows(a: Rows, b: torch.Tensor, b_scale: torch.Tensor, b_rows_per_scale: int, counts: torch.Tensor,
              n: int, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """out[rows of g] = deq(a)[rows of g] · deq(b[g])ᵀ  ->  (M, n).

    a: Rows (M, Kp); b: (G, Np, Kp) fp8 contiguous; b_scale: (G, Np / b_rows_per_scale, Kt);
    counts: (G,) int32 on the device; n: the real output width (≤ Np); config: rows_config's keys."""
    M = a.q.shape[0]
    G, Np, Kp = b.shape
    out = torch.empty(M, n, dtype=out_dtype, device=a.q.device)
    if M == 0:
        return out
    config = {**rows_config(M, G), **(config or {})}
    grid = ((M + (config["BLOCK_M"] - 1) * G) // config["BLOCK_M"], cdiv(Np, config["BLOCK_N"]))
    a_in, b_in = a.q, b
    if config["TMA"]:   # Hopper's tensor memory accelerator loads the fp8 tiles (b as one (G·Np, Kp) matrix)
        a_in = TensorDescriptor.from_tensor(a.q, [config["BLOCK_M"], BLOCK])
        b_in = TensorDescriptor.from_tensor(b.view(G * Np, Kp), [config["BLOCK_N"], BLOCK])
    _gemm_rows_kernel[grid](a_in, a.q.stride(0), a.scale_inv, a.scale_inv.stride(0), a.scale_inv.stride(1),
                            b_in, b.stride(0), b.stride(1),
                            b_scale, b_scale.stride(0), b_scale.stride(1), b_scale.stride(2),
                            out, out.stride(0), counts, G, n, Np, Kp // BLOCK,
                            B_ROWS_PER_SCALE=b_rows_per_scale, BLOCK_G=block_g(G), **config)
    return out


def gemm_tokens(a: Tokens, b: Tokens, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """dW_g = deq(a_g) · deq(b_g)ᵀ over the token tiles of group g -> (G, a.cols, b.cols).

    a: Tokens of dy (Np, T·128), b: Tokens of x (Kp, T·128), with the same counts; config: TOKENS_CONFIG's keys."""
    G = a.counts.numel()
    Np, Kp = a.q.shape[0], b.q.shape[0]
    config = {**TOKENS_CONFIG, **(config or {})}
    out = torch.empty(G, a.cols, b.cols, dtype=out_dtype, device=a.q.device)
    grid = (cdiv(Np, config["BLOCK_N"]), cdiv(Kp, config["BLOCK_K"]), G)
    a_in, b_in = a.q, b.q
    config["TMA"] = config["TMA"] and a.q.shape[1] > 0   # (a descriptor needs a token tile to describe)
    if config["TMA"]:
        a_in = TensorDescriptor.from_tensor(a.q, [config["BLOCK_N"], BLOCK])
        b_in = TensorDescriptor.from_tensor(b.q, [config["BLOCK_K"], BLOCK])
    _gemm_tokens_kernel[grid](a_in, a.q.stride(0), a.scale_inv, a.scale_inv.stride(0),
                              b_in, b.q.stride(0), b.scale_inv, b.scale_inv.stride(0),
                              out, out.stride(0), out.stride(1), a.counts, G, a.cols, b.cols, Np, Kp,
                              BLOCK_G=block_g(G), **config)
    return out
