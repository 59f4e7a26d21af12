"""The experts' FP8 Fprop and Dgrad GEMM written for Hopper in Gluon (Triton's tile-level language with explicit
layouts, shared memory, TMA and warpgroup MMA): the arithmetic of `fp8_gemm.gemm_rows` (reference:
fp8/emulate.py), with the schedule that Triton's compiler does not find for that loop (0.6-0.8× bf16's grouped
GEMM, BENCHMARKS.md).

Per 128-deep K block the tensor cores compute a fresh partial product P_kb = A_kb · B_kbᵀ and the FP32 accumulator
takes P_kb · sa[:, kb] · sb[kb] (V3 §3.3.2's promotion, N_C = 128). To keep the tensor cores busy through each
promotion, the product of block kb+1 is issued (asynchronous wgmma) before block kb's is waited for and scaled, so
two partial products live in registers; TMA loads run STAGES blocks ahead through a ring of mbarriers. Tiles are
128 × 128 (two warpgroups of 64 rows), taken N-fastest: the CTAs that run together share one tile of A and one
expert's B in L2.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .fp8_quant import BLOCK, Rows, block_g, cdiv

BLOCK_M = BLOCK_N = 128
NUM_WARPS = 8


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
def _load_block(a_desc, b_desc, a_smem, b_smem, ready, kb, Kt, start, b_row, STAGES: gl.constexpr):
    """TMA loads of K block kb (if kb < Kt) into its stage of the ring, signalling ready[stage]."""
    BK: gl.constexpr = a_desc.block_type.shape[1]
    stage = kb % STAGES
    bar = ready.index(stage)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=kb < Kt)
    tma.async_copy_global_to_shared(a_desc, [start, kb * BK], bar, a_smem.index(stage), pred=kb < Kt)
    tma.async_copy_global_to_shared(b_desc, [b_row, kb * BK], bar, b_smem.index(stage), pred=kb < Kt)


@gluon.jit
def _issue(a_smem, b_smem, ready, kb, into, STAGES: gl.constexpr):
    """Once K block kb has landed: start its partial product A_kb · B_kbᵀ (asynchronous; `into` only names the
    registers, use_acc=False)."""
    stage = kb % STAGES
    mbarrier.wait(ready.index(stage), (kb // STAGES) & 1)
    return warpgroup_mma(a_smem.index(stage), b_smem.index(stage).permute((1, 0)), into, use_acc=False,
                         is_async=True)


@gluon.jit
def _promote(acc, p, scale):
    """acc + P · scale[row], then a wgmma wait that returns at once (one product is in flight) on the result: it
    pins the FMAs here, before the next wgmma is issued, instead of letting the compiler sink them past it with P
    kept alive (registers for a third partial product, and ptxas then serializes the wgmmas)."""
    acc = acc + p * gl.expand_dims(scale, 1)
    return warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))


@gluon.jit
def _gemm_rows_kernel(a_desc, sa_ptr, stride_sam, stride_sak, b_desc, sb_ptr, stride_sbg, stride_sbn, stride_sbk,
                      c_ptr, stride_cm, counts_ptr, G, N, Np, Kt, n_blocks,
                      BLOCK_G: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """128 × 128 tiles; block kb+1's product runs while block kb's is promoted (two partial products, P and Q,
    alternate: the loop is unrolled by two so that no register copy touches a product in flight)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    pid = gl.program_id(0)
    pid_n = pid % n_blocks
    g, start, end = _group_tile(counts_ptr, G, pid // n_blocks, BM, BLOCK_G, num_warps)
    if g >= G:
        return
    b_row = g * Np + pid_n * BN

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BN, 256 // a_desc.dtype.primitive_bitwidth])
    rows = start + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    row_ok = rows < end
    sa_ptrs = sa_ptr + rows.to(gl.int64) * stride_sam
    sb_ptrs = sb_ptr + g.to(gl.int64) * stride_sbg + pid_n * stride_sbn   # one 128×128 block of B per K block

    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, a_desc.block_type.shape[1]], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, b_desc.block_type.shape[1]], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    for i in gl.static_range(STAGES):
        _load_block(a_desc, b_desc, a_smem, b_smem, ready, i, Kt, start, b_row, STAGES)

    zero = gl.zeros([BM, BN], gl.float32, mma)
    acc = gl.zeros([BM, BN], gl.float32, mma)
    p = _issue(a_smem, b_smem, ready, 0, zero, STAGES)
    sp = gl.load(sa_ptrs, mask=row_ok, other=0.0) * gl.load(sb_ptrs)
    for j in range(0, (Kt - 1) // 2):
        kb = 1 + 2 * j
        q = _issue(a_smem, b_smem, ready, kb, zero, STAGES)
        sq = gl.load(sa_ptrs + kb * stride_sak, mask=row_ok, other=0.0) * gl.load(sb_ptrs + kb * stride_sbk)
        p = warpgroup_mma_wait(num_outstanding=1, deps=(p, ))   # block kb-1's product; kb's still runs
        acc = _promote(acc, p, sp)
        gl.thread_barrier()   # both warpgroups are past block kb-1: its stage takes block kb-1+STAGES
        _load_block(a_desc, b_desc, a_smem, b_smem, ready, kb - 1 + STAGES, Kt, start, b_row, STAGES)
        p = _issue(a_smem, b_smem, ready, kb + 1, zero, STAGES)
        sp = gl.load(sa_ptrs + (kb + 1) * stride_sak, mask=row_ok, other=0.0) * gl.load(
            sb_ptrs + (kb + 1) * stride_sbk)
        q = warpgroup_mma_wait(num_outstanding=1, deps=(q, ))
        acc = _promote(acc, q, sq)
        gl.thread_barrier()
        _load_block(a_desc, b_desc, a_smem, b_smem, ready, kb + STAGES, Kt, start, b_row, STAGES)
    if Kt % 2 == 0:   # one block left to issue
        q = _issue(a_smem, b_smem, ready, Kt - 1, zero, STAGES)
        sq = gl.load(sa_ptrs + (Kt - 1) * stride_sak, mask=row_ok, other=0.0) * gl.load(
            sb_ptrs + (Kt - 1) * stride_sbk)
        done = warpgroup_mma_wait(num_outstanding=1, deps=(p, ))
        acc = _promote(acc, done, sp)
        done = warpgroup_mma_wait(num_outstanding=0, deps=(q, ))
        acc = acc + done * gl.expand_dims(sq, 1)
    else:
        done = warpgroup_mma_wait(num_outstanding=0, deps=(p, ))
        acc = acc + done * gl.expand_dims(sp, 1)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))

    c_smem = gl.allocate_shared_memory(c_ptr.dtype.element_ty, [BM, BN],
                                       gl.SwizzledSharedLayout(8, 1, 8, order=[1, 0]))
    _store_rows(acc, c_smem, c_ptr, stride_cm, start, end, pid_n * BN, N, num_warps)


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for([rows, BLOCK], gl.float8e4nv)
    return TensorDescriptor.from_tensor(t, [rows, BLOCK], layout)


def gemm_rows(a: Rows, b: torch.Tensor, b_scale: torch.Tensor, counts: torch.Tensor, n: int,
              out_dtype: torch.dtype, stages: int = 4) -> torch.Tensor:
    """`fp8_gemm.gemm_rows` with B in 128×128 blocks: out[rows of g] = deq(a)[rows of g] · deq(b[g])ᵀ -> (M, n).

    a: Rows (M, Kp); b: (G, Np, Kp) fp8 contiguous, Np a multiple of 128; b_scale: (G, Np / 128, Kp / 128);
    counts: (G,) int32 on the device."""
    M = a.q.shape[0]
    G, Np, Kp = b.shape
    out = torch.empty(M, n, dtype=out_dtype, device=a.q.device)
    if M == 0:
        return out
    n_blocks = cdiv(Np, BLOCK_N)
    grid = ((M + (BLOCK_M - 1) * G) // BLOCK_M * n_blocks,)   # a bound on the row tiles, × the column blocks
    _gemm_rows_kernel[grid](_descriptor(a.q, BLOCK_M), a.scale_inv, a.scale_inv.stride(0), a.scale_inv.stride(1),
                            _descriptor(b.view(G * Np, Kp), BLOCK_N), b_scale, b_scale.stride(0), b_scale.stride(1),
                            b_scale.stride(2), out, out.stride(0), counts, G, n, Np, Kp // BLOCK, n_blocks,
                            BLOCK_G=block_g(G), STAGES=stages, num_warps=NUM_WARPS)
    return out
