"""Shared bench helpers: CUDA-event timing, CUDA-graph capture of a training step, the measured bf16 GEMM / copy
ceilings, environment line."""
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def cuda_time_ms(fn, warmup: int = 3, iters: int = 10, clocks: dict | None = None) -> list[float]:
    """Per-iteration times (ms) of fn() with CUDA events, after warm-up. `clocks`, a dict, gets the SM clock and
    power over the timed iterations (gpu_clocks)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    with gpu_clocks() if clocks is not None else contextlib.nullcontext({}) as sampled:
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    if clocks is not None:
        clocks.update(sampled)
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


# clocks_event_reasons bits (nvidia-smi --help-query-gpu): why the SM clock is below its maximum
POWER_CAP, THERMAL = 0x4 | 0x80, 0x20 | 0x40


@contextlib.contextmanager
def gpu_clocks(every_ms: int = 50):
    """Samples the GPU's SM clock and power draw with nvidia-smi while the block runs. Yields a dict that gets
    mean_sm_mhz, min_sm_mhz, mean_w, max_w, capped and thermal (the shares of samples with a power-cap or a
    thermal slowdown active) and samples.
    The H200 here draws up to its 700 W limit in a training step and lowers its clock to stay under it, so step
    times depend on how long it ran flat out before (BENCHMARKS.md); the dict stays empty without nvidia-smi."""
    stats: dict = {}
    if shutil.which("nvidia-smi") is None:
        yield stats
        return
    index = torch.cuda.current_device()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(["nvidia-smi", f"--id={index}", "--query-gpu=clocks.sm,power.draw,"
                                 "clocks_event_reasons.active", "--format=csv,noheader,nounits", f"-lms={every_ms}"],
                                stdout=log, stderr=subprocess.DEVNULL)
        try:
            yield stats
        finally:
            proc.terminate()
            proc.wait()
            log.seek(0)
            rows = []
            for line in log:
                try:
                    mhz, watts, reasons = (f.strip() for f in line.split(","))
                    rows.append((float(mhz), float(watts), int(reasons, 16)))
                except ValueError:   # a header, or N/A where the board does not report a field
                    continue
            if rows:
                stats.update(mean_sm_mhz=statistics.mean(r[0] for r in rows), min_sm_mhz=min(r[0] for r in rows),
                             mean_w=statistics.mean(r[1] for r in rows), max_w=max(r[1] for r in rows),
                             capped=sum(bool(r[2] & POWER_CAP) for r in rows) / len(rows),
                             thermal=sum(bool(r[2] & THERMAL) for r in rows) / len(rows), samples=len(rows))


def clocks_text(stats: dict) -> str:
    if not stats:
        return "-"
    return (f"{stats['mean_sm_mhz']:.0f} MHz (min {stats['min_sm_mhz']:.0f}), {stats['mean_w']:.0f} W "
            f"(max {stats['max_w']:.0f}), power-capped {100 * stats['capped']:.0f}%")


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
