"""The MoE row kernels (kernels/moe_rows_triton.py) against the same step compiled by inductor from the PyTorch
reference, at small's shapes (16K tokens, top-4, hidden 1024, expert width 512), GPU time from CUDA-graph
replays, and the bandwidth each reaches against a plain copy measured in the same run. --sweep also times each
kernel at other block shapes.

    python3 bench/moe_rows.py [--tokens 16384] [--k 4] [--hidden 1024] [--inter 512] [--sweep]
"""
import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import copy_tb_s, env, graph_time_ms, write_json  # noqa: E402
from nanoseek.kernels import moe_rows, moe_rows_triton  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    N, K, H, I = args.tokens, args.k, args.hidden, args.inter
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, rows = torch.randn(N, H, **bf16), torch.randn(N * K, H, **bf16)
    order = torch.randint(0, 32, (N * K,), device="cuda").argsort(stable=True)   # expert-sorted (token, slot)s
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device="cuda"))
    gate_up, dh = torch.randn(N * K, 2 * I, **bf16), torch.randn(N * K, I, **bf16)
    scale = torch.rand(N * K, device="cuda")
    cases = {   # name: (ours, inductor's, bytes moved)
        "gather_rows (dispatch)": (lambda: moe_rows_triton.gather_rows(x, order, K),
                                   torch.compile(moe_rows.gather_rows_reference), (x, order, K),
                                   (N + N * K) * H * 2),
        "sum_rows (combine)": (lambda: moe_rows_triton.sum_rows(rows, inverse, K),
                               torch.compile(moe_rows.sum_rows_reference), (rows, inverse, K),
                               (N * K + N) * H * 2),
        "swiglu_backward": (lambda: moe_rows_triton.swiglu_backward(gate_up, scale, dh),
                            torch.compile(moe_rows.swiglu_backward_reference), (gate_up, scale, dh),
                            N * K * (2 * I + I + 2 * I) * 2),
    }
    copy = copy_tb_s()
    results = {"env": env(), "shape": vars(args), "copy_tb_s": copy, "runs": []}
    print(f"{'kernel':24s} {'triton ms':>10s} {'TB/s':>6s} {'inductor ms':>12s} {'TB/s':>6s} {'speedup':>8s}")
    for name, (ours, ref_fn, ref_args, nbytes) in cases.items():
        a, b = graph_time_ms(ours), graph_time_ms(lambda: ref_fn(*ref_args))
        results["runs"].append({"kernel": name, "triton_ms": a, "inductor_ms": b, "bytes": nbytes})
        print(f"{name:24s} {a:10.4f} {nbytes / a / 1e9:6.2f} {b:12.4f} {nbytes / b / 1e9:6.2f} {b / a:7.2f}x")
    print(f"copy {copy:.2f} TB/s")
    if args.sweep:
        out_g, out_s = torch.empty(N * K, H, **bf16), torch.empty(N, H, **bf16)
        print("\nblock shapes (elements per program, warps): gather / sum ms")
        for elements in (4096, 8192, 16384):
            for warps in (4, 8, 16):
                bh = min(H, 1024)
                br = max(elements // bh, 1)
                grid_g, grid_s = (triton.cdiv(N * K, br), triton.cdiv(H, bh)), (triton.cdiv(N, br), triton.cdiv(H, bh))
                g = graph_time_ms(lambda: moe_rows_triton._gather_rows_kernel[grid_g](
                    x, order, out_g, N * K, H, K, BLOCK_R=br, BLOCK_H=bh, num_warps=warps))
                s = graph_time_ms(lambda: moe_rows_triton._sum_rows_kernel[grid_s](
                    rows, inverse, out_s, N, H, rows, K, False, BLOCK_R=br, BLOCK_H=bh, num_warps=warps))
                results["runs"].append({"sweep": [br, bh, warps], "gather_ms": g, "sum_ms": s})
                print(f"  {br:3d} x {bh:4d}, {warps:2d} warps: {g:.4f} / {s:.4f}")
    write_json("moe_rows.json", results)


if __name__ == "__main__":
    main()
