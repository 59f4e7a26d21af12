"""The Gluon FP8 grouped GEMMs (kernels/fp8_gemm_sm90.py) against the Triton ones (kernels/fp8_gemm.py) and bf16
`torch._grouped_mm` on the experts' Fprop, Dgrad and Wgrad shapes of the wide and small configs (GEMM only,
operands quantized beforehand; uneven groups with an empty one). Each Gluon output is checked against the emulation's
(fp8/hopper.py's fp32 dequantize-and-multiply) on the same FP8 operands before it is timed (relative error in
parentheses; a variant above 1e-3 is not timed).

    python bench/fp8_sm90.py

Prints a table and one JSON line.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import cuda_time_ms, env, median, write_json  # noqa: E402
from nanoseek.fp8 import hopper  # noqa: E402
from nanoseek.kernels import fp8_gemm, fp8_gemm_sm90, fp8_quant  # noqa: E402

SHAPES = [   # (config, GEMM, rows, N, K, groups): wide = 16 experts of 1408 on hidden 4096, small = 32 of 512 on 1024
    ("wide", "gate_up Fprop", 32768, 2816, 4096, 16), ("wide", "gate_up Dgrad", 32768, 4096, 2816, 16),
    ("wide", "down Fprop", 32768, 4096, 1408, 16), ("wide", "down Dgrad", 32768, 1408, 4096, 16),
    ("small", "gate_up Fprop", 65536, 1024, 1024, 32), ("small", "gate_up Dgrad", 65536, 1024, 1024, 32),
    ("small", "down Fprop", 65536, 1024, 512, 32), ("small", "down Dgrad", 65536, 512, 1024, 32),
    # Wgrad: dW (G, N, K) = dyᵀ x over each group's rows: N = dy's width, K = x's
    ("wide", "gate_up Wgrad", 32768, 2816, 4096, 16), ("wide", "down Wgrad", 32768, 4096, 1408, 16),
    ("small", "gate_up Wgrad", 65536, 1024, 1024, 32), ("small", "down Wgrad", 65536, 1024, 512, 32),
]


def uneven(M: int, G: int) -> torch.Tensor:
    """G group sizes summing to M, ±50% around M/G, group 1 empty."""
    w = torch.rand(G, generator=torch.Generator().manual_seed(G)) + 0.5
    w[1] = 0
    c = (w / w.sum() * M).floor().to(torch.int32)
    c[0] += M - c.sum()
    return c.cuda()


def rows_gemms(M: int, N: int, K: int, counts: torch.Tensor) -> dict:
    """Fprop / Dgrad: x (M, K) in groups times each group's W (N, K) in 128×128 blocks; bf16 output."""
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(counts.numel(), N, K, device="cuda") * 0.02
    wb, offs = w.to(torch.bfloat16).transpose(1, 2), counts.cumsum(0).to(torch.int32)
    xr, _ = fp8_quant.act_quant(x, counts, tokens=False)
    wq = fp8_quant.weight_quant(w)
    return dict(bf16=lambda: torch._grouped_mm(x, wb, offs=offs),
                triton=lambda: fp8_gemm.gemm_rows(xr, wq.q, wq.scale_inv, 128, counts, N, torch.bfloat16),
                gluon=lambda dtype, **kw: fp8_gemm_sm90.gemm_rows(xr, wq.q, wq.scale_inv, counts, N, dtype, **kw),
                want=hopper._emulated_rows(xr, wq.q, wq.scale_inv, counts, N, torch.float32), out_dtype=torch.bfloat16)


def wgrad_gemms(M: int, N: int, K: int, counts: torch.Tensor) -> dict:
    """Wgrad: dW_g (N, K) = dy_gᵀ x_g over each group's rows, both in 128×1 token tiles; fp32 output (the
    gradient of fp32 master weights)."""
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    offs = counts.cumsum(0).to(torch.int32)
    dyt, xt = fp8_quant.act_quant(dy, counts, tokens=True)[1], fp8_quant.act_quant(x, counts, tokens=True)[1]
    return dict(bf16=lambda: torch._grouped_mm(dy.t(), x, offs=offs),
                triton=lambda: fp8_gemm.gemm_tokens(dyt, xt, torch.float32),
                gluon=lambda dtype, **kw: fp8_gemm_sm90.gemm_tokens(dyt, xt, dtype, **kw),
                want=hopper._emulated_tokens(dyt, xt, torch.float32), out_dtype=torch.float32)


# (a 128 × 256 tile, computing its two halves in turn for want of registers for two partial products, was
# 0.95-1.25x slower than 128 × 128 on the wide shapes, 1.04-1.24x faster on small's down projection: removed)
VARIANTS = {f"{rows} rows, {stages} stages": dict(block_m=rows, stages=stages)
            for rows in (128, 64) for stages in (3, 4)}


def main():
    torch.manual_seed(0)
    rows, results = [], {"env": env()}
    print(f"{'config':6s} {'GEMM':14s} {'bf16 ms':>8s} {'Triton':>8s}  Gluon variants: ms (rel. error)  "
          f"{'best vs bf16':>12s} {'vs Triton':>9s}")
    for config, name, M, N, K, G in SHAPES:
        counts = uneven(M, G)
        gemms = (wgrad_gemms if name.endswith("Wgrad") else rows_gemms)(M, N, K, counts)
        flops = 2 * M * N * K
        t = {path: median(cuda_time_ms(gemms[path], 3, 20)) for path in ("bf16", "triton")}
        errs = {}
        for v, kw in VARIANTS.items():
            got = gemms["gluon"](torch.float32, **kw)
            errs[v] = ((got - gemms["want"]).norm() / gemms["want"].norm()).item()
            t[v] = (median(cuda_time_ms(lambda: gemms["gluon"](gemms["out_dtype"], **kw), 3, 20))
                    if errs[v] < 1e-3 else float("nan"))
        best = min((t[v] for v in VARIANTS if t[v] == t[v]), default=float("nan"))
        cells = " ".join(f"{v}: {t[v]:.3f} ({errs[v]:.1e})" for v in VARIANTS)
        print(f"{config:6s} {name:14s} {t['bf16']:8.3f} {t['triton']:8.3f}  {cells}  {t['bf16'] / best:11.2f}x "
              f"{t['triton'] / best:8.2f}x", flush=True)
        rows.append({"config": config, "gemm": name, "M": M, "N": N, "K": K, "groups": G, "ms": t,
                     "tflops": {k: flops / v / 1e9 for k, v in t.items()}, "rel_err_vs_emulation": errs})
        del gemms, got
    results["rows"] = rows
    write_json("fp8_sm90.json", results)


if __name__ == "__main__":
    main()
