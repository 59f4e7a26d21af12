"""Tile shapes, pipelining and TMA loads of the Triton FP8 grouped GEMMs (kernels/fp8_gemm.py) on the wide
config's expert shapes: every config's TFLOP/s (GEMM only, operands quantized beforehand) against bf16
`torch._grouped_mm` on the same shapes in the same run, with each config's output checked equal to the default
config's.

    python bench/fp8_tune.py [--tokens 32768]

Prints one table per GEMM (Fprop / Dgrad rows kernel, Wgrad tokens kernel) and one JSON line.
"""
import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import cuda_time_ms, env, median, write_json  # noqa: E402
from nanoseek.kernels import fp8_gemm, fp8_quant  # noqa: E402

# the earlier sweep over BLOCK_M 64/128 and 4/8 warps landed all configs within 0.69-0.78x bf16 (BENCHMARKS.md),
# so the grid now spans what changes the kernel's structure: TMA loads (and, 2026-12-02, a promotion deferred by
# one K step so the next MMA could overlap it: 0-9% slower everywhere, removed; and Triton's warp specialization
# of the K loop, `tl.range(..., warp_specialize=True)` with TMA: 4-warp configs fail in its Hopper pass, 8-warp
# ones ran at 0.6-0.8x bf16 like the rest, removed)
ROWS_GRID = [dict(BLOCK_M=128, BLOCK_N=n, num_warps=8, num_stages=s, TMA=t)
             for n, s, t in itertools.product((128, 256), (3, 4), (False, True))]
TOKENS_GRID = [dict(BLOCK_N=128, BLOCK_K=k, num_warps=8, num_stages=s, TMA=t)
               for k, s, t in itertools.product((128, 256), (3, 4), (False, True))]


def peer_time(fn) -> float:
    """bf16 grouped GEMM time in ms (nan if this torch rejects the layout)."""
    try:
        return median(cuda_time_ms(fn, 2, 10))
    except RuntimeError as e:
        print(f"bf16 peer failed: {str(e).splitlines()[0]}")
        return float("nan")


def time_configs(name, flops, run, grid, default, peer_ms):
    want = run(default)
    rows = []
    for cfg in grid:
        try:
            out = run(cfg)
            same = torch.equal(out, want)
            ms = median(cuda_time_ms(lambda: run(cfg), 2, 10))
        except Exception as e:   # a config the compiler cannot fit (registers, shared memory) or lower
            msg = (str(e).strip().splitlines() or [""])[0][:150]
            print(f"{name}: {cfg}: {type(e).__name__}: {msg}", flush=True)
            rows.append({**cfg, "error": f"{type(e).__name__}: {msg}"})
            continue
        rows.append({**cfg, "ms": ms, "tflops": flops / ms / 1e9, "same": same})
    ok = [r for r in rows if "ms" in r]
    best = min(ok, key=lambda r: r["ms"])
    base = next(r for r in ok if all(r[k] == v for k, v in default.items()))
    print(f"\n{name}: bf16 grouped_mm {peer_ms:.3f} ms ({flops / peer_ms / 1e9:.0f} TFLOP/s)")
    print(f"{'config':48s} {'ms':>7s} {'TFLOP/s':>8s} {'vs bf16':>8s} same")
    top = sorted(ok, key=lambda r: r["ms"])[:6]
    for r in top + ([base] if all(r is not base for r in top) else []):
        tag = " (default)" if r is base else ""
        cfg = ", ".join(f"{k}={r[k]}" for k in default)
        print(f"{cfg + tag:48s} {r['ms']:7.3f} {r['tflops']:8.0f} {peer_ms / r['ms']:7.2f}x {r['same']}")
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"{len(failed)} configs did not compile or run")
    return {"peer_ms": peer_ms, "default": base, "best": best, "all": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768, help="routed rows (tokens × top-k)")
    args = ap.parse_args()
    torch.manual_seed(0)
    G, H, I = 16, 4096, 1408   # the wide config of bench/fp8.py: 16 experts, hidden 4096, moe_intermediate 1408
    M = args.tokens
    counts = torch.full((G,), M // G, dtype=torch.int32, device="cuda")
    offs = counts.cumsum(0).to(torch.int32)
    results = {"env": env(), "tokens": M, "experts": G}
    for name, N, K in (("gate_up", 2 * I, H), ("down", H, I)):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(G, N, K, device="cuda") * 0.02
        wb = w.to(torch.bfloat16)
        xr, xt = fp8_quant.act_quant(x, counts, tokens=True)
        dyr, dyt = fp8_quant.act_quant(dy, counts, tokens=True)
        wq = fp8_quant.weight_quant(w)
        flops = 2 * M * N * K
        default = fp8_gemm.rows_config(M, G)
        fprop_peer = peer_time(lambda: torch._grouped_mm(x, wb.transpose(1, 2), offs=offs))
        results[f"{name} fprop"] = time_configs(
            f"{name} Fprop {M}x{N}x{K}, {G} groups", flops,
            lambda c: fp8_gemm.gemm_rows(xr, wq.q, wq.scale_inv, 128, counts, N, torch.bfloat16, c),
            ROWS_GRID, default, fprop_peer)
        dgrad_peer = peer_time(lambda: torch._grouped_mm(dy, wb, offs=offs))
        results[f"{name} dgrad"] = time_configs(
            f"{name} Dgrad {M}x{K}x{N}, {G} groups", flops,
            lambda c: fp8_gemm.gemm_rows(dyr, wq.qt, wq.scale_inv_t, 128, counts, K, torch.bfloat16, c),
            ROWS_GRID, default, dgrad_peer)
        wgrad_peer = peer_time(lambda: torch._grouped_mm(dy.t(), x, offs=offs))
        results[f"{name} wgrad"] = time_configs(
            f"{name} Wgrad {G}x{N}x{K} over {M} rows", flops,
            lambda c: fp8_gemm.gemm_tokens(dyt, xt, torch.float32, c),
            TOKENS_GRID, fp8_gemm.TOKENS_CONFIG, wgrad_peer)
    write_json("fp8_tune.json", {k: ({kk: vv for kk, vv in v.items() if kk != "all"} if isinstance(v, dict)
                                     and "all" in v else v) for k, v in results.items()})


if __name__ == "__main__":
    main()
