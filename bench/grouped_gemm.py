"""The experts' bf16 grouped GEMMs: torch._grouped_mm (CUTLASS, the kernel the model runs) against inductor's
Triton grouped-GEMM template chosen by max-autotune (inductor also times CUTLASS among its choices and keeps the
faster), at a config's shapes: Fprop, Dgrad and Wgrad of the experts' gate/up and down projections, rows routed
unevenly over the experts. GPU time from CUDA-graph replays; outputs compared with CUTLASS's.

    python3 bench/grouped_gemm.py [--tokens 16384] [--k 4] [--experts 32] [--hidden 1024] [--inter 512]
                                  [--only "gate_up fprop,down wgrad"]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import env, graph_time_ms, write_json  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--only", default="", help="comma-separated GEMM names to run (default: all six)")
    args = ap.parse_args()
    E, M, H, I = args.experts, args.tokens * args.k, args.hidden, args.inter
    torch.manual_seed(0)
    probs = torch.rand(E) + 0.5   # uneven loads, as routing gives
    counts = torch.distributions.Multinomial(M, probs / probs.sum()).sample().long()
    offs = counts.cumsum(0).to(torch.int32).cuda()

    def grouped(a, b):
        return torch._grouped_mm(a, b, offs=offs)

    autotuned = torch.compile(grouped, mode="max-autotune-no-cudagraphs", dynamic=False)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    cases = []
    for name, N, K in (("gate_up", 2 * I, H), ("down", H, I)):   # weight (E, N, K), nn.Linear layout
        w, x, dy = torch.randn(E, N, K, **bf16) * 0.02, torch.randn(M, K, **bf16), torch.randn(M, N, **bf16)
        # the layouts autograd hands torch._grouped_mm: y = x Wᵀ, dx = dy W, dW = dyᵀ x (K ragged)
        cases += [(f"{name} fprop", x, w.transpose(-2, -1)), (f"{name} dgrad", dy, w), (f"{name} wgrad", dy.t(), x)]
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    print(f"{torch.cuda.get_device_name()}, {M} rows in {E} groups ({counts.min()}-{counts.max()} per group)")
    print(f"{'GEMM':14s} {'shape':>20s} {'CUTLASS us':>10s} {'TFLOP/s':>8s} {'autotuned us':>12s} {'TFLOP/s':>8s} "
          f"{'CUTLASS/autotuned':>17s} {'max rel diff':>12s} {'compile s':>9s}")
    rows = []
    for label, a, b in cases:
        if only and label not in only:
            continue
        flops = 2 * M * H * I * 2 if label.startswith("gate_up") else 2 * M * H * I
        t0 = time.time()
        ref, out = grouped(a, b), autotuned(a, b)
        compile_s = time.time() - t0
        diff = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        t_cutlass, t_tuned = graph_time_ms(lambda: grouped(a, b)), graph_time_ms(lambda: autotuned(a, b))
        shape = "x".join(map(str, (*a.shape, b.shape[-1])))
        print(f"{label:14s} {shape:>20s} {t_cutlass * 1e3:10.1f} {flops / t_cutlass / 1e9:8.0f} "
              f"{t_tuned * 1e3:12.1f} {flops / t_tuned / 1e9:8.0f} {t_cutlass / t_tuned:16.2f}x {diff:12.1e} "
              f"{compile_s:9.0f}", flush=True)
        rows.append({"gemm": label, "cutlass_ms": t_cutlass, "autotuned_ms": t_tuned, "flops": flops,
                     "max_rel_diff": diff, "compile_s": compile_s})
        torch._dynamo.reset()
    write_json("grouped_gemm.json", {"env": env(), "args": vars(args), "counts": counts.tolist(), "rows": rows})


if __name__ == "__main__":
    main()
