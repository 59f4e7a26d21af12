"""Shared bench helpers: CUDA-event timing, CUDA-graph capture of a training step, the measured bf16 GEMM / copy
ceilings, environment line."""
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


def capture(fn, warmup: int = 2, before=lambda: None) -> torch.cuda.CUDAGraph:
    """fn() captured as a CUDA graph after `warmup` runs on a side stream (where the FP8 paths pick and verify
    their kernels); before() runs ahead of each warm-up run and of the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            before()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    before()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_time_ms(fn, reps: int = 20) -> float:
    """GPU time of one fn(): `reps` calls captured in one CUDA graph and replayed, so host launch time does not
    count (median of 10 replays)."""
    def many():
        for _ in range(reps):
            fn()
    return median(cuda_time_ms(capture(many).replay, 3, 10)) / reps


def graphed_step_fn(model, opt, x, y, doc_ids=None):
    """The whole step captured as one CUDA graph (torch.cuda.graph's whole-network recipe), returned as its
    replay: grads set to None before the capture so that its backward allocates them from the graph's pool,
    autocast without its weight-cast cache, `opt` capturable (torch's AdamW with capturable=True, or nanoseek's)."""
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = model.loss(x, y, balance_alpha=1e-4, doc_ids=doc_ids).total
        loss.backward()
        opt.step()
        return loss
    return capture(step, warmup=3, before=lambda: opt.zero_grad(set_to_none=True)).replay


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
