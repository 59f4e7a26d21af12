"""Can the MoE dispatch gather live inside the grouped GEMM (issue #4)? On the `small` training shapes (16,384 tokens,
top-4 of 32 experts, hidden 1024, gate_up 1024 wide), times in one run:

    gather + grouped_mm   x[rows] materialized (the model's dispatch), then torch._grouped_mm (CUTLASS)
    Triton, sorted A      a Triton grouped GEMM on the materialized rows: how far Triton is from CUTLASS here
    Triton, gathered A    the same kernel loading each tile's rows of x through the row index: no sorted copy

If "gathered" is not slower than "sorted", the gather costs nothing inside the GEMM, and what the model could save
per MoE layer is the gather kernel (and the matching traffic in backward); if Triton is far from CUTLASS, the fused
kernel would need that gap closed first. Every kernel's output is checked against x[rows] @ W_gᵀ.

    python bench/moe_gather.py              (GPU)
    TRITON_INTERPRET=1 python bench/moe_gather.py --tiny    (CPU: correctness of the kernel only)
"""
import argparse
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import cuda_time_ms, env, median, write_json  # noqa: E402
from nanoseek.kernels.fp8_quant import block_g, cdiv, group_tile  # noqa: E402


@triton.jit
def _grouped_gemm(x_ptr, stride_xm, rows_ptr, w_ptr, stride_wg, stride_wn, out_ptr, stride_om, counts_ptr, G, N, K,
                  GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_G: tl.constexpr):
    """out[i] = x[rows[i] if GATHER else i] · W_gᵀ for the rows i of group g (counts[g] consecutive rows)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g, start, end = group_tile(counts_ptr, G, pid_m, BLOCK_M, BLOCK_G)
    if g >= G:
        return
    rm = start + tl.arange(0, BLOCK_M)
    m_ok = rm < end
    src = tl.load(rows_ptr + rm, mask=m_ok, other=0) if GATHER else rm
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + src[:, None].to(tl.int64) * stride_xm + rk[None, :]
    b_ptrs = w_ptr + g.to(tl.int64) * stride_wg + rn[None, :] * stride_wn + rk[:, None]   # W_gᵀ tile (BLOCK_K, N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=rn[None, :] < N, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (rn[None, :] < N))


def grouped_gemm(x, rows, w, counts, gather: bool, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8,
                 num_stages=3):
    M, (G, N, K) = rows.numel(), w.shape
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = ((M + (BLOCK_M - 1) * G) // BLOCK_M, cdiv(N, BLOCK_N))
    _grouped_gemm[grid](x, x.stride(0), rows, w, w.stride(0), w.stride(1), out, out.stride(0), counts, G, N, K,
                        GATHER=gather, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_G=block_g(G),
                        num_warps=num_warps, num_stages=num_stages)
    return out


def routing(tokens: int, experts: int, top_k: int, device):
    """The model's dispatch (model/moe.py): (token, slot) pairs sorted by expert -> source row of each sorted row."""
    g = torch.Generator(device=device).manual_seed(0)
    expert = torch.rand(tokens, experts, generator=g, device=device).topk(top_k, dim=-1).indices.flatten()
    order = expert.argsort(stable=True)
    counts = torch.bincount(expert, minlength=experts).to(torch.int32)
    return (order // top_k).to(torch.int32), counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="small shapes, for Triton's CPU interpreter")
    args = ap.parse_args()
    dev = "cpu" if args.tiny else "cuda"
    T, E, k, H, N = (300, 4, 2, 128, 192) if args.tiny else (16384, 32, 4, 1024, 1024)
    torch.manual_seed(0)
    dtype = torch.float32 if args.tiny else torch.bfloat16   # bf16 dots gave garbage in the interpreter
    x = torch.randn(T, H, device=dev, dtype=dtype)
    w = torch.randn(E, N, H, device=dev, dtype=dtype) * H ** -0.5
    rows, counts = routing(T, E, k, dev)
    want = torch.cat([xs.float() @ w[g].float().t() for g, xs in enumerate(x[rows].split(counts.tolist()))])

    def check(out, what):
        err = ((out.float() - want).norm() / want.norm()).item()
        assert err < 1e-2, f"{what}: relative error {err:.2e}"
        return err

    configs = [dict(BLOCK_M=128, BLOCK_N=n, BLOCK_K=bk, num_warps=8, num_stages=s)
               for n, bk, s in itertools.product((128, 256), (64, 128), (3, 4))]
    if args.tiny:
        for gather in (False, True):
            check(grouped_gemm(x if gather else x[rows], rows, w, counts, gather, BLOCK_M=64, BLOCK_N=64,
                               BLOCK_K=64), f"gather={gather}")
        print("the kernel matches x[rows] · W_gᵀ, with and without the gather")
        return

    flops = 2 * rows.numel() * N * H
    offs = counts.cumsum(0).to(torch.int32)
    x_sorted = x[rows]
    results = {"env": env(), "tokens": T, "experts": E, "top_k": k, "hidden": H, "N": N}
    check(torch._grouped_mm(x_sorted, w.transpose(1, 2), offs=offs), "grouped_mm")
    gather_ms = median(cuda_time_ms(lambda: x[rows], 3, 20))
    cutlass_ms = median(cuda_time_ms(lambda: torch._grouped_mm(x_sorted, w.transpose(1, 2), offs=offs), 3, 20))
    rows_out = []
    for cfg in configs:
        for gather in (False, True):
            a = x if gather else x_sorted
            try:
                check(grouped_gemm(a, rows, w, counts, gather, **cfg), f"{cfg} gather={gather}")
                ms = median(cuda_time_ms(lambda: grouped_gemm(a, rows, w, counts, gather, **cfg), 3, 20))
            except Exception as e:   # a config that does not fit (shared memory, registers)
                print(f"{cfg} gather={gather}: {type(e).__name__}")
                continue
            rows_out.append({**cfg, "gather": gather, "ms": ms, "tflops": flops / ms / 1e9})
    best = {g: min((r for r in rows_out if r["gather"] == g), key=lambda r: r["ms"]) for g in (False, True)}
    print(f"{env()}\nsmall's gate_up dispatch: {rows.numel()} rows, {E} experts, {H} -> {N}")
    print(f"{'run':34s} {'ms':>7s} {'TFLOP/s':>8s}")
    print(f"{'gather x[rows] alone':34s} {gather_ms:7.3f}")
    print(f"{'grouped_mm on sorted rows':34s} {cutlass_ms:7.3f} {flops / cutlass_ms / 1e9:8.0f}")
    print(f"{'gather + grouped_mm (the model)':34s} {gather_ms + cutlass_ms:7.3f}")
    for g, label in ((False, "Triton, sorted A (best config)"), (True, "Triton, gathered A (best config)")):
        r = best[g]
        print(f"{label:34s} {r['ms']:7.3f} {r['tflops']:8.0f}  BLOCK_N={r['BLOCK_N']} BLOCK_K={r['BLOCK_K']} "
              f"stages={r['num_stages']}")
    print(f"fused (gathered) vs the model's gather + grouped_mm: {(gather_ms + cutlass_ms) / best[True]['ms']:.2f}x")
    results.update(gather_ms=gather_ms, grouped_mm_ms=cutlass_ms, triton=rows_out)
    write_json("moe_gather.json", results)


if __name__ == "__main__":
    main()
