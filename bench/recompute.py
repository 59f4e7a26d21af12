"""Recomputation in backward (nanoseek/train/recompute.py): activation memory kept between forward and backward,
and the time of a forward + backward, for each run.recompute mode, against "none" in the same run.

    python bench/recompute.py [--preset small] [--batch 1] [--seq 512] [--device auto] [--iters 3] [--compile]

On CUDA: bf16 weights, memory as torch.cuda.memory_allocated after the forward minus before, CUDA-event times.
On CPU: fp32, memory as the profiler's net CPU allocation over the forward, wall times.
"""
import argparse
import gc
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import env, median, write_json  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.model import DeepSeekV3  # noqa: E402
from nanoseek.train.recompute import MODES, apply_recompute  # noqa: E402


def kept_bytes(fn, device):
    """fn()'s result, and the bytes its run left allocated."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return out, sum(e.self_cpu_memory_usage for e in prof.events())


def step_ms(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="compile each block (after recompute is applied)")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = preset(args.preset, num_nextn_predict_layers=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    x, y = ids[:, :-1], ids[:, 1:]
    rows = []
    for mode in MODES:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = DeepSeekV3(cfg).to(device, dtype).train()
        apply_recompute(model, mode)
        if args.compile:
            for block in model.layers:
                block.compile()

        def step():
            model.loss(x, y, balance_alpha=1e-4).total.backward()
            model.zero_grad(set_to_none=True)
        step()                                                        # warm-up (and compilation)
        loss, kept = kept_bytes(lambda: model.loss(x, y, balance_alpha=1e-4).total, device)
        loss.backward()
        model.zero_grad(set_to_none=True)
        del loss
        times = [step_ms(step, device) for _ in range(args.iters)]
        rows.append({"mode": mode, "kept_bytes": kept, "ms": median(times)})
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]
    print(f"\n{env()['device']}  preset={args.preset}  batch {args.batch}x{args.seq}  {dtype}  "
          f"{'compiled' if args.compile else 'eager'}")
    print(f"{'recompute':10s} {'kept MiB':>9s} {'vs none':>8s} {'fwd+bwd ms':>11s} {'vs none':>8s}")
    for r in rows:
        print(f"{r['mode']:10s} {r['kept_bytes'] / 2**20:9.1f} {r['kept_bytes'] / base['kept_bytes']:7.2f}x "
              f"{r['ms']:11.1f} {r['ms'] / base['ms']:7.2f}x")
    write_json("recompute.json", {"env": env(), "args": vars(args), "dtype": str(dtype), "rows": rows})


if __name__ == "__main__":
    main()
