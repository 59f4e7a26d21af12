"""Where a nanoseek training step spends its time: GPU time per kind of kernel and the top kernels of a few
compiled steps (torch.profiler), and the step's wall time against the GPU's busy time (kernels summed), which
says whether the step is host-bound.

    python bench/profile_train.py [--preset small|wide|...] [--batch 8] [--seq 2048] [--dtype bf16|fp32] [--fp8]
                                  [--no-compile] [--compile-mode MODE] [--step-graph] [--rows 30] [--trace]
                                  [--who REGEX]

--dtype bf16 is bench/train.py's like-for-like run (bf16 weights and moments); fp32 is the trainer's default
(fp32 master weights under bf16 autocast). --preset wide is bench/fp8.py's wide config (hidden 4096), at its
batch unless --batch is given. --trace also writes a gzipped Chrome trace of one step to $OUT. --who lists the
ops that launched the kernels whose names match REGEX, with their enclosing ops (the autograd node, in backward)
and the innermost nanoseek lines of their Python stacks; kernels replayed from a CUDA graph have no launching op
(use --compile-mode default to see inside the blocks). --step-graph profiles the step as bench/train.py's
bf16-graph run takes it (compiled blocks, the whole step one CUDA graph, shared experts on a side stream) and adds
the timeline's idle gaps: the GPU time with no kernel running, and the largest gaps with the kernels around them.
"""
import argparse
import gzip
import os
import re
import shutil
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import cuda_time_ms, median, write_json  # noqa: E402
from bench.train import (batch, build_nanoseek, nanoseek_graph_step_fn, nanoseek_optimizer,  # noqa: E402
                         nanoseek_step_fn)
from nanoseek.train.step_graph import WARMUP_STEPS  # noqa: E402
from nanoseek.config import preset  # noqa: E402

# first match wins: kernel name -> kind
KINDS = [
    ("attention", r"flash|fmha|cudnn|attention|sdpa"),
    ("grouped GEMM", r"grouped|_gmm|GroupProblemShape"),
    ("GEMM", r"gemm|nvjet|xmma|cutlass|cublas|s\d+_\w*mma|wgmma"),
    ("optimizer", r"multi_tensor|adam"),
    ("sort / top-k / scan", r"sort|radix|topk|scan|cub::"),
    ("index / scatter / gather", r"index|scatter|gather"),
    ("fused (inductor)", r"^triton_"),
    ("Triton (nanoseek)", r"^_"),
    ("copy / cast / fill", r"copy|cast|fill|memcpy|memset|to_copy"),
    ("elementwise (eager)", r"elementwise|vectorized|reduce"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=None, help="default 8, or the wide config's own (4)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--fp8", action="store_true", help="FP8 layers (fp8/convert.py), as run.precision = 'fp8'")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--who", default="", help="regex of kernel names whose launching ops to list")
    ap.add_argument("--compile-mode", default="reduce-overhead",
                    help="torch.compile mode of the blocks: reduce-overhead (CUDA graphs, the trainer's default) "
                         "or default")
    ap.add_argument("--step-graph", action="store_true", help="the whole step as one CUDA graph (bench/train.py's "
                    "bf16-graph), with the timeline's gaps")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.preset == "wide":
        from bench.fp8 import CONFIGS
        cfg, wide_batch, _ = CONFIGS["wide"]
        args.batch = args.batch or wide_batch
    else:
        cfg = preset(args.preset, num_nextn_predict_layers=0)
    args.batch = args.batch or 8
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    mode = None if args.compile_mode == "default" or args.step_graph else args.compile_mode
    model = build_nanoseek(cfg, not args.no_compile, dtype=dtype, fp8=args.fp8, compile_mode=mode)
    opt = nanoseek_optimizer(model, dtype)
    x, y = batch(cfg, args.batch, args.seq)
    torch.cuda.reset_peak_memory_stats()
    if args.step_graph:
        step = nanoseek_graph_step_fn(model, opt, x, y)
        for _ in range(WARMUP_STEPS + 1):   # the graph's warm-up steps and its capture
            step()
    else:
        step = nanoseek_step_fn(model, opt, x, y)
    step_ms = median(cuda_time_ms(step, 3, 10))
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"step {step_ms:.1f} ms (CUDA events, median of 10, no profiler), "
          f"{args.batch * args.seq / step_ms * 1e3:,.0f} tokens/s, peak {peak:.1f} GiB")
    steps = 2
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e3
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))
    # kernels only (no annotations, which nest): their sum is the time the GPU was busy, streams not overlapping
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / steps / 1e3
    by_kind, calls = defaultdict(float), defaultdict(int)
    for e in kernels:
        by_kind[kind_of(e.key)] += e.self_device_time_total / steps / 1e3
        calls[kind_of(e.key)] += e.count // steps
    print(f"\n{'kind':28s} {'ms/step':>8s} {'share':>6s} {'kernels':>8s}")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:28s} {ms:8.2f} {100 * ms / busy:5.1f}% {calls[kind]:8d}")
    print(f"step wall {wall:.1f} ms (under the profiler), GPU busy {busy:.1f} ms: "
          f"{100 * busy / wall:.0f}% busy{', host-bound' if busy < 0.8 * wall else ''}; "
          f"{sum(calls.values())} kernels per step")
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:200]
    tag = "".join([args.preset, "_", args.dtype, "_fp8" if args.fp8 else "",
                   f"_{args.compile_mode}" if not args.no_compile else "_eager"])
    write_json(f"profile_{tag}.json", {
        "args": vars(args), "step_ms": step_ms, "peak_gib": peak, "wall_ms": wall, "busy_ms": busy,
        "by_kind": by_kind,
        "top": [{"name": e.key[:200], "ms": e.self_device_time_total / steps / 1e3, "calls": e.count // steps}
                for e in top]})
    if args.step_graph:
        gaps(step, args.rows)
    if args.trace and os.environ.get("OUT"):
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as one:
            step()
            torch.cuda.synchronize()
        path = os.path.join(os.environ["OUT"], f"trace_{tag}.json")
        one.export_chrome_trace(path)
        with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
            shutil.copyfileobj(f, g)
        os.remove(path)
    if args.who:
        who(step, args.who)
    print(torch.cuda.memory_summary(abbreviated=True)[:1500])


def gaps(step, rows: int):
    """One step's kernel timeline (all streams): the time no kernel runs, by gap size, and the largest gaps with
    the kernels that end before and start after them."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    idle, end, last = [], spans[0][1], spans[0][2]
    for a, b, name in spans[1:]:
        if a > end:
            idle.append((a - end, last, name))
        if b > end:
            end, last = b, name
    total_us = (end - spans[0][0])
    idle_us = sum(g for g, _, _ in idle)
    print(f"\ntimeline {total_us / 1e3:.2f} ms, kernels running {(total_us - idle_us) / 1e3:.2f} ms, idle "
          f"{idle_us / 1e3:.2f} ms in {len(idle)} gaps")
    for lo, hi in ((0, 2), (2, 5), (5, 20), (20, 1e9)):
        sel = [g for g, _, _ in idle if lo <= g < hi]
        print(f"  gaps of {lo}-{hi if hi < 1e9 else 'inf'} us: {len(sel):5d}, {sum(sel) / 1e3:.2f} ms")
    by_pair = defaultdict(lambda: [0.0, 0])
    for g, before, after in idle:
        entry = by_pair[(kind_of(before), kind_of(after))]
        entry[0] += g
        entry[1] += 1
    print("idle by (kind before -> kind after):")
    for (a, b), (us, n) in sorted(by_pair.items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"  {us / 1e3:6.2f} ms {n:5d}x  {a} -> {b}")
    print("largest gaps:")
    for g, before, after in sorted(idle, reverse=True)[:rows]:
        print(f"  {g:7.1f} us  {before[:60]}  ->  {after[:60]}")


def who(step, pattern: str):
    """One step under the profiler with Python stacks: GPU time per launching op of the kernels matching
    `pattern`, with the op's enclosing ops (an autograd node in backward) and innermost nanoseek frames."""
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], with_stack=True) as prof:
        step()
        torch.cuda.synchronize()
    found = defaultdict(lambda: [0.0, 0, set()])
    for e in prof.events():
        hits = [k for k in e.kernels if re.search(pattern, k.name)]
        if not hits:
            continue
        parents, p = [], e.cpu_parent
        while p is not None and len(parents) < 4:
            parents.append(p.name)
            p = p.cpu_parent
        frames = [f for f in e.stack if "nanoseek" in f or "bench" in f][:3]
        entry = found[(e.name, " < ".join(parents + frames))]
        entry[0] += sum(k.duration for k in hits) / 1e3
        entry[1] += len(hits)
        entry[2].update(k.name[:80] for k in hits)
    print(f"\nkernels matching {pattern!r}, by launching op:")
    for (op, frames), (ms, n, names) in sorted(found.items(), key=lambda kv: -kv[1][0]):
        print(f"{ms:8.3f} ms {n:5d}x  {op}  [{frames}]\n{'':22s}{'; '.join(sorted(names))}")


if __name__ == "__main__":
    main()
