"""Where a nanoseek training step spends its time: top kernels of a few compiled steps (torch.profiler), and
the step's wall time against the GPU's busy time (kernels summed), which says whether the step is host-bound.

    python bench/profile_train.py [--preset small] [--batch 8] [--seq 2048] [--fp8] [--rows 30]
"""
import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.train import batch, build_nanoseek, nanoseek_step_fn  # noqa: E402
from nanoseek.config import preset  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--fp8", action="store_true", help="FP8 layers (fp8/convert.py), as run.precision = 'fp8'")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    cfg = preset(args.preset, num_nextn_predict_layers=0)
    model = build_nanoseek(cfg, not args.no_compile, fp8=args.fp8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, y = batch(cfg, args.batch, args.seq)
    step = nanoseek_step_fn(model, opt, x, y)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    steps = 2
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e3
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    # kernels only (no annotations, which nest): their sum is the time the GPU was busy, streams not overlapping
    busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / steps / 1e3
    print(f"step wall {wall:.1f} ms (under the profiler), GPU busy {busy:.1f} ms: "
          f"{100 * busy / wall:.0f}% busy{', host-bound' if busy < 0.8 * wall else ''}")
    print(torch.cuda.memory_summary(abbreviated=True)[:1500])


if __name__ == "__main__":
    main()
