"""The chunked head's cross-entropy step alone (kernels/cross_entropy.py): from a chunk of logits to the summed
loss and G = softmax − onehot, Triton against inductor's kernel for the same PyTorch reference, at small's
vocabulary (32000) and V3's (129280), bf16, as many rows as model/loss.py's budget allows in a chunk (16,777 and
4,152). GPU time of 20 calls replayed as one CUDA graph; bytes = one read of the logits and one write of G.
--sweep times the Triton kernel's launch configurations too (elements per step of its loops, warps).

    python3 bench/cross_entropy.py [--rows N] [--sweep]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import copy_tb_s, env, graph_time_ms, write_json  # noqa: E402
from nanoseek.kernels import cross_entropy, cross_entropy_triton  # noqa: E402
from nanoseek.model.loss import CHUNK_BYTES  # noqa: E402

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=None, help="default: model/loss.py's chunk")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    results = {"env": env(), "copy_tb_s": copy_tb_s(), "runs": []}
    configs = [("Triton (default: 2048, 8 warps)", {})]
    if args.sweep:
        configs += [(f"Triton {b}, {w} warps", dict(block=b, num_warps=w))
                    for b, w in ((1024, 4), (2048, 4), (4096, 8), (8192, 8), (8192, 16))]
    print(f"{'vocab':>7s} {'rows':>6s} {'kernel':36s} {'ms':>8s} {'TB/s':>6s} {'vs inductor':>11s}")
    for V in (32000, 129280):
        rows = args.rows or CHUNK_BYTES // (2 * V)
        g = torch.Generator(device="cuda").manual_seed(0)
        logits = (torch.randn(rows, V, device="cuda", generator=g) * 3).bfloat16()
        labels = torch.randint(0, V, (rows,), device="cuda", generator=g)
        labels[::9] = -100
        nbytes = 2 * logits.numel() * logits.element_size()
        ref_loss, ref_g = cross_entropy._reference_compiled(logits, labels, -100, True)
        base = graph_time_ms(lambda: cross_entropy._reference_compiled(logits, labels, -100, True))
        runs = [("inductor (the reference, compiled)", base, 0.0)]
        for name, kw in configs:
            loss, gr = cross_entropy_triton.loss_and_grad(logits, labels, -100, True, **kw)
            err = max(((loss - ref_loss).abs() / ref_loss.abs()).item(),
                      (gr.float() - ref_g.float()).abs().max().item())
            ms = graph_time_ms(lambda: cross_entropy_triton.loss_and_grad(logits, labels, -100, True, **kw))
            runs.append((name, ms, err))
        for name, ms, err in runs:
            results["runs"].append({"vocab": V, "rows": rows, "kernel": name, "ms": ms, "tb_s": nbytes / ms / 1e9,
                                    "max_err": err})
            print(f"{V:7d} {rows:6d} {name:36s} {ms:8.4f} {nbytes / ms / 1e9:6.2f} {base / ms:10.2f}x  (err {err:.1e})")
        del logits, labels, ref_g
        torch.cuda.empty_cache()
    print(f"copy {results['copy_tb_s']:.2f} TB/s")
    write_json("cross_entropy.json", results)


if __name__ == "__main__":
    main()
