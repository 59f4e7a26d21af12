"""Shared bench helpers: CUDA-event timing, the measured bf16 GEMM / copy ceilings, environment line."""
import json
import os
import statistics
import sys
import time

import torch


def cuda_time_ms(fn, warmup: int = 3, iters: int = 10) -> list[float]:
    """Per-iteration times (ms) of fn() with CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def timed(fn):
    """(fn(), wall seconds) with the GPU synchronized on both sides: for end-to-end timings such as generation."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def median(xs):
    return statistics.median(xs)


def bf16_gemm_tflops(n: int = 8192) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda",
                                                                              dtype=torch.bfloat16)
    return 2 * n**3 / (median(cuda_time_ms(lambda: a @ b, 3, 10)) * 1e-3) / 1e12


def copy_tb_s(nbytes: int = 4 * 2**30) -> float:
    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (median(cuda_time_ms(lambda: dst.copy_(src), 3, 10)) * 1e-3) / 1e12


def env() -> dict:
    import transformers
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {"device": device, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0]}


def write_json(name: str, payload: dict):
    line = json.dumps(payload)
    print("JSON " + line)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "w") as f:
            f.write(line + "\n")
