"""The experts' FP8 GEMMs written for Hopper in Gluon (Triton's tile-level language with explicit layouts, shared
memory, TMA and warpgroup MMA): the arithmetic of `fp8_gemm.gemm_rows` (Fprop, Dgrad) and `fp8_gemm.gemm_tokens`
(Wgrad) (reference: fp8/emulate.py), with the schedule that Triton's compiler does not find for that loop (0.6-0.8×
bf16's grouped GEMM, BENCHMARKS.md).

Per 128-deep K block the tensor cores compute a fresh partial product P_kb = A_kb · B_kbᵀ and the FP32 accumulator
takes P_kb · sa[:, kb] · sb[kb] (V3 §3.3.2's promotion, N_C = 128): sb[kb] is one weight block's scale in Fprop
and Dgrad, and in Wgrad, where K is the tokens, a row of scales, one per output column (the 128×1 token tiles of x).
To keep the tensor cores busy through each promotion, the product of block kb+1 is issued (asynchronous wgmma)
before block kb's is waited for and scaled, so two partial products live in registers; TMA loads run STAGES blocks
ahead through a ring of mbarriers. Tiles are BM × 128, one warpgroup per 64 rows (BM: Fprop / Dgrad 128, Wgrad
64), ordered so that the CTAs that run together share one tile of A and one expert's B (Wgrad: one group's xᵀ) in
L2.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .fp8_quant import BLOCK, Rows, Tokens, block_g, cdiv

BLOCK_M = BLOCK_N = 128    # Fprop / Dgrad tiles
WGRAD_BLOCK_M = 64         # Wgrad tiles: rows of dW (see gemm_tokens)
SCALES_LAYOUT = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2))   # TMA rows


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _group_tile(counts_ptr, G, pid, BLOCK_ROWS: gl.constexpr, BLOCK_G: gl.constexpr, num_warps: gl.constexpr):
    """fp8_quant.group_tile in Gluon: (group, first row, end row of the group) of row tile `pid`."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    idx = gl.arange(0, BLOCK_G, layout=layout)
    counts = gl.load(counts_ptr + idx, mask=idx < G, other=0)
    tiles = (counts + BLOCK_ROWS - 1) // BLOCK_ROWS
    tile_end = gl.associative_scan(tiles, 0, _add)
    row_end = gl.associative_scan(counts, 0, _add)
    g = gl.sum((tile_end <= pid).to(gl.int32), axis=0)
    this = idx == g
    first_tile = gl.sum(gl.where(this, tile_end - tiles, 0), axis=0)
    end = gl.sum(gl.where(this, row_end, 0), axis=0)
    start = gl.sum(gl.where(this, row_end - counts, 0), axis=0) + (pid - first_tile) * BLOCK_ROWS
    return g, start, end


@gluon.jit
def _store_rows(acc, c_smem, c_ptr, stride_cm, start, end, col0, N, num_warps: gl.constexpr):
    """acc (BM, BN) -> c[start + i, col0 + j] for the rows before `end` and columns before N, through shared memory
    in 32-row chunks (a few registers of addresses per thread, coalesced 16-byte stores; a TMA store would also
    write the next group's rows)."""
    BM: gl.constexpr = acc.shape[0]
    BN: gl.constexpr = acc.shape[1]
    CHUNK: gl.constexpr = 32
    c_smem.store(acc.to(c_ptr.dtype.element_ty))
    gl.thread_barrier()
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    cols = col0 + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    for r in gl.static_range(0, BM, CHUNK):
        rows = start + r + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
        ptrs = c_ptr + gl.expand_dims(rows.to(gl.int64) * stride_cm, 1) + gl.expand_dims(cols, 0)
        mask = gl.expand_dims(rows < end, 1) & gl.expand_dims(cols < N, 0)
        gl.store(ptrs, c_smem.slice(r, CHUNK).load(layout), mask=mask)


@gluon.jit
def _load_block(a_desc, b_desc, sb_src, a_smem, b_smem, sb_smem, ready, kb, Kt, a_row, b_row, k0,
                COLS: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of K block kb (if kb < Kt; block k0 + kb of the operands) into its stage of the ring, signalling
    ready[stage]; with COLS also the block's column scales (row k0 + kb of sb from column b_row)."""
    BK: gl.constexpr = a_desc.block_type.shape[1]
    stage = kb % STAGES
    bar = ready.index(stage)
    if COLS:
        mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes + sb_src.block_type.nbytes,
                        pred=kb < Kt)
        tma.async_copy_global_to_shared(sb_src, [k0 + kb, b_row], bar, sb_smem.index(stage), pred=kb < Kt)
    else:
        mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=kb < Kt)
    tma.async_copy_global_to_shared(a_desc, [a_row, (k0 + kb) * BK], bar, a_smem.index(stage), pred=kb < Kt)
    tma.async_copy_global_to_shared(b_desc, [b_row, (k0 + kb) * BK], bar, b_smem.index(stage), pred=kb < Kt)


@gluon.jit
def _issue(a_smem, b_smem, ready, kb, into, STAGES: gl.constexpr):
    """Once K block kb has landed: start its partial product A_kb · B_kbᵀ (asynchronous; `into` only names the
    registers, use_acc=False)."""
    stage = kb % STAGES
    mbarrier.wait(ready.index(stage), (kb // STAGES) & 1)
    return warpgroup_mma(a_smem.index(stage), b_smem.index(stage).permute((1, 0)), into, use_acc=False,
                         is_async=True)


@gluon.jit
def _scales(sa_ptrs, sa_ok, stride_sak, sb_src, stride_sbk, kb, COLS: gl.constexpr):
    """Block kb's row scales sa (M,), loaded ahead of its promotion, and its B scale: one scalar, or with COLS the
    block's index (its column scales wait in shared memory: a thread holds 32 columns, too many registers to load
    ahead beside two partial products)."""
    sa = gl.load(sa_ptrs + kb * stride_sak, mask=sa_ok, other=0.0)
    if COLS:
        sb = kb
    else:
        sb = gl.load(sb_src + kb * stride_sbk)
    return sa, sb


@gluon.jit
def _scaled(p, scales, sb_smem, COLS: gl.constexpr, STAGES: gl.constexpr):
    """P · sa[row] · sb (sb[col] if COLS)."""
    sa, sb = scales
    if COLS:
        s = gl.expand_dims(sa, 1) * sb_smem.index(sb % STAGES).load(p.type.layout)   # (M, 1) · (1, N)
    else:
        s = gl.expand_dims(sa * sb, 1)
    return p * s


@gluon.jit
def _promote(acc, p, scales, sb_smem, COLS: gl.constexpr, STAGES: gl.constexpr):
    """acc + P · scales, then a wgmma wait that returns at once (one product is in flight) on the result: it pins
    the FMAs here, before the next wgmma is issued, instead of letting the compiler sink them past it with P kept
    alive (registers for a third partial product, and ptxas then serializes the wgmmas)."""
    return warpgroup_mma_wait(num_outstanding=1, deps=(acc + _scaled(p, scales, sb_smem, COLS, STAGES), ))


@gluon.jit
def _mainloop(a_desc, b_desc, a_row, b_row, k0, Kt, sa_ptrs, sa_ok, stride_sak, sb_src, stride_sbk, acc,
              COLS: gl.constexpr, STAGES: gl.constexpr):
    """Σ_kb (A_kb · B_kbᵀ) · scales of blocks k0 .. k0 + Kt - 1 (Kt ≥ 1) of the BM × BN tile whose A rows start at
    a_row and B rows at b_row. sb_src: B's per-block scales (pointer, stride_sbk apart) or with COLS a descriptor
    of the per-column ones. Block kb+1's product runs while block kb's is promoted (two partial products, P and Q,
    alternate: the loop is unrolled by two so that no register copy touches a product in flight)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, a_desc.block_type.shape[1]], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, b_desc.block_type.shape[1]], b_desc.layout)
    sb_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BN], SCALES_LAYOUT)   # unused without COLS
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    for i in gl.static_range(STAGES):
        _load_block(a_desc, b_desc, sb_src, a_smem, b_smem, sb_smem, ready, i, Kt, a_row, b_row, k0, COLS, STAGES)

    zero = gl.zeros_like(acc)
    p = _issue(a_smem, b_smem, ready, 0, zero, STAGES)
    sp = _scales(sa_ptrs, sa_ok, stride_sak, sb_src, stride_sbk, 0, COLS)
    for j in range(0, (Kt - 1) // 2):
        kb = 1 + 2 * j
        q = _issue(a_smem, b_smem, ready, kb, zero, STAGES)
        sq = _scales(sa_ptrs, sa_ok, stride_sak, sb_src, stride_sbk, kb, COLS)
        p = warpgroup_mma_wait(num_outstanding=1, deps=(p, ))   # block kb-1's product; kb's still runs
        acc = _promote(acc, p, sp, sb_smem, COLS, STAGES)
        gl.thread_barrier()   # both warpgroups are past block kb-1: its stage takes block kb-1+STAGES
        _load_block(a_desc, b_desc, sb_src, a_smem, b_smem, sb_smem, ready, kb - 1 + STAGES, Kt, a_row, b_row, k0,
                    COLS, STAGES)
        p = _issue(a_smem, b_smem, ready, kb + 1, zero, STAGES)
        sp = _scales(sa_ptrs, sa_ok, stride_sak, sb_src, stride_sbk, kb + 1, COLS)
        q = warpgroup_mma_wait(num_outstanding=1, deps=(q, ))
        acc = _promote(acc, q, sq, sb_smem, COLS, STAGES)
        gl.thread_barrier()
        _load_block(a_desc, b_desc, sb_src, a_smem, b_smem, sb_smem, ready, kb + STAGES, Kt, a_row, b_row, k0,
                    COLS, STAGES)
    if Kt % 2 == 0:   # one block left to issue
        q = _issue(a_smem, b_smem, ready, Kt - 1, zero, STAGES)
        sq = _scales(sa_ptrs, sa_ok, stride_sak, sb_src, stride_sbk, Kt - 1, COLS)
        done = warpgroup_mma_wait(num_outstanding=1, deps=(p, ))
        acc = _promote(acc, done, sp, sb_smem, COLS, STAGES)
        done = warpgroup_mma_wait(num_outstanding=0, deps=(q, ))
        acc = acc + _scaled(done, sq, sb_smem, COLS, STAGES)
    else:
        done = warpgroup_mma_wait(num_outstanding=0, deps=(p, ))
        acc = acc + _scaled(done, sp, sb_smem, COLS, STAGES)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
    return acc


@gluon.jit
def _gemm_rows_kernel(a_desc, sa_ptr, stride_sam, stride_sak, b_desc, sb_ptr, stride_sbg, stride_sbn, stride_sbk,
                      c_ptr, stride_cm, counts_ptr, G, N, Np, Kt, n_blocks,
                      BLOCK_G: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """Fprop / Dgrad: BM × 128 tiles of rows grouped by expert, each times its expert's B (one scale per block)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    pid = gl.program_id(0)
    pid_n = pid % n_blocks
    g, start, end = _group_tile(counts_ptr, G, pid // n_blocks, BM, BLOCK_G, num_warps)
    if g >= G:
        return
    mma: gl.constexpr = _mma_layout(BN, a_desc.dtype.primitive_bitwidth, num_warps)
    rows = start + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    sb_ptrs = sb_ptr + g.to(gl.int64) * stride_sbg + pid_n * stride_sbn   # one 128×128 block of B per K block
    acc = _mainloop(a_desc, b_desc, start, g * Np + pid_n * BN, 0, Kt,
                    sa_ptr + rows.to(gl.int64) * stride_sam, rows < end, stride_sak, sb_ptrs, stride_sbk,
                    gl.zeros([BM, BN], gl.float32, mma), False, STAGES)
    c_smem = gl.allocate_shared_memory(c_ptr.dtype.element_ty, [BM, BN],
                                       gl.SwizzledSharedLayout(8, 1, 8, order=[1, 0]))
    _store_rows(acc, c_smem, c_ptr, stride_cm, start, end, pid_n * BN, N, num_warps)


@gluon.jit
def _gemm_tokens_kernel(a_desc, sa_ptr, stride_sat, b_desc, sb_desc, c_ptr, stride_cg, stride_cn,
                        counts_ptr, G, N, K, Np, Kp, n_blocks, k_blocks,
                        BLOCK_G: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """Wgrad: dW_g (N, K) = Σ over group g's token tiles of dyᵀ_t · (xᵀ_t)ᵀ, BM × 128 output tiles taken K-fastest
    (the CTAs that run together share a tile of dyᵀ and the group's xᵀ in L2). A group without tokens writes 0."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    pid = gl.program_id(0)
    g = pid // (n_blocks * k_blocks)
    pid_n = pid // k_blocks % n_blocks
    pid_k = pid % k_blocks
    t0, n_t = _token_tiles(counts_ptr, G, g, a_desc.block_type.shape[1], BLOCK_G, num_warps)
    mma: gl.constexpr = _mma_layout(BN, a_desc.dtype.primitive_bitwidth, num_warps)
    rn = pid_n * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    acc = gl.zeros([BM, BN], gl.float32, mma)
    if n_t > 0:
        acc = _mainloop(a_desc, b_desc, pid_n * BM, pid_k * BN, t0, n_t,
                        sa_ptr + t0.to(gl.int64) * stride_sat + rn, rn < Np, stride_sat, sb_desc, 0, acc, True, STAGES)
    c_smem = gl.allocate_shared_memory(c_ptr.dtype.element_ty, [BM, BN],
                                       gl.SwizzledSharedLayout(8, 1, 8, order=[1, 0]))
    _store_rows(acc, c_smem, c_ptr + g.to(gl.int64) * stride_cg, stride_cn, pid_n * BM, N, pid_k * BN, K, num_warps)


@gluon.jit
def _token_tiles(counts_ptr, G, g, TILE: gl.constexpr, BLOCK_G: gl.constexpr, num_warps: gl.constexpr):
    """(first token tile, number of token tiles) of group g, each group's tiles of TILE tokens starting a new one."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    idx = gl.arange(0, BLOCK_G, layout=layout)
    tiles = (gl.load(counts_ptr + idx, mask=idx < G, other=0) + TILE - 1) // TILE
    tile_end = gl.associative_scan(tiles, 0, _add)
    this = idx == g
    n_t = gl.sum(gl.where(this, tiles, 0), axis=0)
    return gl.sum(gl.where(this, tile_end, 0), axis=0) - n_t, n_t


@gluon.constexpr_function
def _mma_layout(BN, bits, num_warps):
    """Hopper's warpgroup MMA accumulator: warps stacked along M, one instruction 16 × BN × (32 bytes of K)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 256 // bits])


def warps_for(block_m: int) -> int:
    """One warpgroup (4 warps) per 64 rows of a tile: each issues its own 64-row wgmma."""
    return block_m // 16


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for([rows, BLOCK], gl.float8e4nv)
    return TensorDescriptor.from_tensor(t, [rows, BLOCK], layout)


def gemm_rows(a: Rows, b: torch.Tensor, b_scale: torch.Tensor, counts: torch.Tensor, n: int,
              out_dtype: torch.dtype, stages: int = 4, block_m: int = BLOCK_M) -> torch.Tensor:
    """`fp8_gemm.gemm_rows` with B in 128×128 blocks: out[rows of g] = deq(a)[rows of g] · deq(b[g])ᵀ -> (M, n).

    a: Rows (M, Kp); b: (G, Np, Kp) fp8 contiguous, Np a multiple of 128; b_scale: (G, Np / 128, Kp / 128);
    counts: (G,) int32 on the device."""
    M = a.q.shape[0]
    G, Np, Kp = b.shape
    out = torch.empty(M, n, dtype=out_dtype, device=a.q.device)
    if M == 0:
        return out
    n_blocks = cdiv(Np, BLOCK_N)
    grid = ((M + (block_m - 1) * G) // block_m * n_blocks,)   # a bound on the row tiles, × the column blocks
    _gemm_rows_kernel[grid](_descriptor(a.q, block_m), a.scale_inv, a.scale_inv.stride(0), a.scale_inv.stride(1),
                            _descriptor(b.view(G * Np, Kp), BLOCK_N), b_scale, b_scale.stride(0), b_scale.stride(1),
                            b_scale.stride(2), out, out.stride(0), counts, G, n, Np, Kp // BLOCK, n_blocks,
                            BLOCK_G=block_g(G), STAGES=stages, num_warps=warps_for(block_m))
    return out


def gemm_tokens(a: Tokens, b: Tokens, out_dtype: torch.dtype, stages: int = 4, block_m: int = WGRAD_BLOCK_M
                ) -> torch.Tensor:
    """`fp8_gemm.gemm_tokens`: dW_g = deq(a_g) · deq(b_g)ᵀ over the token tiles of group g -> (G, a.cols, b.cols).

    a: Tokens of dy (Np, T·128), b: Tokens of x (Kp, T·128), with the same counts. Tiles of 64 rows of dW (one
    warpgroup, 128 threads) by default: a group's Wgrad is only its ~16 token tiles deep, so each tile's prologue
    and epilogue weigh, and at 64 rows two CTAs share an SM (a thread holds ~255 registers), one's loads and stores
    overlapping the other's products (1.0-1.24× the 128-row tiles' speed on wide's shapes, bench/fp8_sm90.py)."""
    G = a.counts.numel()
    (Np, T), Kp = a.q.shape, b.q.shape[0]
    out = torch.empty(G, a.cols, b.cols, dtype=out_dtype, device=a.q.device)
    if T == 0:   # no token tile at all (a descriptor needs one to describe)
        return out.zero_()
    n_blocks, k_blocks = cdiv(Np, block_m), cdiv(Kp, BLOCK_N)
    _gemm_tokens_kernel[(G * n_blocks * k_blocks,)](
        _descriptor(a.q, block_m), a.scale_inv, a.scale_inv.stride(0), _descriptor(b.q, BLOCK_N),
        TensorDescriptor.from_tensor(b.scale_inv, [1, BLOCK_N], SCALES_LAYOUT.value), out, out.stride(0),
        out.stride(1), a.counts, G, a.cols, b.cols, Np, Kp, n_blocks, k_blocks, BLOCK_G=block_g(G), STAGES=stages,
        num_warps=warps_for(block_m))
    return out
