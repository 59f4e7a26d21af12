"""FP8 quantization kernels alone (kernels/fp8_quant.py) on the wide config's training shapes: GB/s against the copy
rate measured in the same run, and each output checked bit for bit against the PyTorch reference (fp8/quant.py).

    python bench/fp8_quant.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import copy_tb_s, env, graph_time_ms, write_json  # noqa: E402
from nanoseek.fp8 import quant  # noqa: E402
from nanoseek.kernels import fp8_quant  # noqa: E402


def counts_for(rows, groups):
    g = torch.Generator().manual_seed(0)
    w = torch.rand(groups, generator=g) + 0.5
    c = (w / w.sum() * rows).floor().to(torch.int32)
    c[0] += rows - int(c.sum())
    return c.cuda()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def main():
    torch.manual_seed(0)
    copy = copy_tb_s()
    print(env())
    print(f"copy {copy:.2f} TB/s")
    results = {"env": env(), "copy_tb_s": copy, "act": [], "weight": []}
    acts = [("x (attn/shared in)", 8192, 4096, 1), ("dy kv_b", 8192, 8192, 1), ("dy q_a", 8192, 1536, 1),
            ("experts gate_up in", 32768, 4096, 16), ("experts down in", 32768, 1408, 16),
            ("dy experts gate_up", 32768, 2816, 16)]
    print(f"\n{'activation':22s} {'tokens':>6s} {'us':>8s} {'GB/s':>7s} {'of copy':>7s} {'= reference':>11s}")
    for name, M, K, G in acts:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * torch.rand(M, 1, device="cuda").bfloat16()
        counts = counts_for(M, G)
        for tokens in (False, True):
            us = graph_time_ms(lambda: fp8_quant.act_quant(x, counts, tokens)) * 1e3
            rows, t = fp8_quant.act_quant(x, counts, tokens)
            q, s = quant.act_quant(x)
            exact = same_bytes(rows.q[:, :K], q) and torch.equal(rows.scale_inv, s)
            if tokens:   # the first group's token tiles: the reference's act_quant of x_0ᵀ
                c0 = int(counts[0])
                qt, st = quant.act_quant_t(x[:c0])[0]
                exact = exact and same_bytes(t.q[:K, :c0], qt) and torch.equal(t.scale_inv[: -(-c0 // 128), :K].t(),
                                                                              st)
            nbytes = M * K * (2 + 1 + (1 if tokens else 0))
            gbs = nbytes / us / 1e3
            print(f"{name:22s} {str(tokens):>6s} {us:8.1f} {gbs:7.0f} {gbs / copy / 1e3:7.0%} {str(exact):>11s}")
            results["act"].append({"name": name, "M": M, "K": K, "G": G, "tokens": tokens, "us": us, "gb_s": gbs,
                                   "exact": exact})
    weights = [("experts gate_up", (16, 2816, 4096)), ("experts down", (16, 4096, 1408)),
               ("dense gate/up", (11264, 4096)), ("q_b", (6144, 1536)), ("kv_a", (576, 4096))]
    print(f"\n{'weight (fp32 -> W, Wᵀ)':24s} {'us':>8s} {'GB/s':>7s} {'of copy':>7s} {'= reference':>11s}")
    for name, shape in weights:
        w = torch.randn(*shape, device="cuda") * 0.02
        us = graph_time_ms(lambda: fp8_quant.weight_quant(w)) * 1e3
        b = fp8_quant.weight_quant(w)
        w0, q0, qt0 = (w, b.q, b.qt) if w.dim() == 2 else (w[0], b.q[0], b.qt[0])
        q, s = quant.weight_quant(w0)
        N, K = w0.shape
        exact = (same_bytes(q0[:N, :K], q) and same_bytes(qt0[:K, :N], q.t())
                 and torch.equal((b.scale_inv if w.dim() == 2 else b.scale_inv[0]), s))
        nbytes = w.numel() * 6
        gbs = nbytes / us / 1e3
        print(f"{name:24s} {us:8.1f} {gbs:7.0f} {gbs / copy / 1e3:7.0%} {str(exact):>11s}")
        results["weight"].append({"name": name, "shape": shape, "us": us, "gb_s": gbs, "exact": exact})
    write_json("fp8_quant.json", results)


if __name__ == "__main__":
    main()
