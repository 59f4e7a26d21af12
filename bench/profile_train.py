"""Where a nanoseek training step spends its GPU time: top kernels of a few compiled steps (torch.profiler).

    python bench/profile_train.py [--preset small] [--batch 8] [--seq 2048]
"""
import argparse
import os
import sys

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
    args = ap.parse_args()
    cfg = preset(args.preset, num_nextn_predict_layers=0)
    model = build_nanoseek(cfg, not args.no_compile)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, y = batch(cfg, args.batch, args.seq)
    step = nanoseek_step_fn(model, opt, x, y)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    print(torch.cuda.memory_summary(abbreviated=True)[:1500])


if __name__ == "__main__":
    main()
