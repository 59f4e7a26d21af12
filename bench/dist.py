"""Scale-out benchmarks: EPLB balance (CPU) and FSDP2 + expert-parallel training throughput (GPUs).

    python bench/dist.py eplb                                   # CPU: GPU-load imbalance before/after EPLB
    python bench/dist.py throughput [--gpus 1,2,4] [--preset small] [--batch 4] [--seq 2048]
                                                                # launches torchrun per GPU count, ±overlap

eplb: per-logical-expert loads drawn from Zipf's law (expert popularity rank r gets load ∝ r^-s, shuffled per
layer), placed (a) as plain EP places them (expert e on GPU e // (E/G), no replicas) and (b) by EPLB with the
redundant-slot budget; prints max/mean GPU load (1.0 = perfect), averaged and worst over layers.
throughput: one training step (bf16 autocast over fp32 master weights, AdamW, FSDP2 for dense parameters, EP
over all GPUs for the routed experts) on a fixed per-GPU batch (weak scaling), median of ≥10 steps after
warm-up; tokens/s per GPU, with and without the two-micro-batch all-to-all overlap. Ideal scaling keeps
tokens/s per GPU constant. Also runs on CPU/gloo (`--device cpu --preset tiny`) as a smoke test of the path.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanoseek.dist.eplb import gpu_loads, identity_placement, imbalance, rebalance_experts  # noqa: E402


# ---- EPLB ---------------------------------------------------------------------------------------------------
def zipf_loads(layers: int, experts: int, s: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = 1.0 / torch.arange(1, experts + 1).double() ** s
    return torch.stack([base[torch.randperm(experts, generator=g)] for _ in range(layers)]) * 1e6


EPLB_CASES = [  # name, experts, groups, nodes, gpus, physical
    ("V3 prefill: 256 experts, 8 groups, 4 nodes x 8 GPUs, 32 redundant", 256, 8, 4, 32, 288),
    ("256 experts, 8 groups, 3 nodes (global policy), 32 GPUs, 64 redundant", 256, 8, 3, 32, 320),
    ("small: 32 experts, 4 groups, 1 node x 8 GPUs, 8 redundant", 32, 4, 1, 8, 40),
    ("small: 32 experts, 4 groups, 2 nodes x 4 GPUs, 0 redundant", 32, 4, 2, 8, 32),
]


def bench_eplb(layers: int = 8):
    rows = []
    for s in (0.6, 1.0, 1.4):
        for name, E, groups, nodes, gpus, P in EPLB_CASES:
            w = zipf_loads(layers, E, s)
            t0 = time.perf_counter()
            phy2log, _, counts = rebalance_experts(w, P, groups, nodes, gpus)
            dt = time.perf_counter() - t0
            before = imbalance(gpu_loads(w, *identity_placement(layers, E)[::2], gpus))
            after = imbalance(gpu_loads(w, phy2log, counts, gpus))
            rows.append({"zipf_s": s, "case": name, "before_mean": before.mean().item(),
                         "before_max": before.max().item(), "after_mean": after.mean().item(),
                         "after_max": after.max().item(), "seconds": dt})
    print(f"{'s':>4} {'case':<72} {'before mean/worst':>18} {'after mean/worst':>17} {'time':>7}")
    for r in rows:
        print(f"{r['zipf_s']:>4} {r['case']:<72} {r['before_mean']:>8.3f} / {r['before_max']:<7.3f} "
              f"{r['after_mean']:>7.3f} / {r['after_max']:<7.3f} {r['seconds']:>6.2f}s")
    print("JSON " + json.dumps({"bench": "eplb", "layers": layers, "rows": rows}))
    return rows


# ---- throughput -------------------------------------------------------------------------------------------------
def worker(a):
    """One torchrun rank: time training steps of an FSDP2 + EP model."""
    import torch.distributed as dist

    from nanoseek.config import preset
    from nanoseek.dist import parallel
    from nanoseek.model import DeepSeekV3
    from nanoseek.train.optim import AdamW

    env = parallel.init(ep_size=0, device=a.device)
    overrides = {"num_hidden_layers": a.layers} if a.layers else {}
    cfg = preset(a.preset, num_nextn_predict_layers=0, **overrides)
    torch.manual_seed(0)
    model = parallel.parallelize(DeepSeekV3(cfg).to(env.device), env, overlap=a.overlap)
    opt = AdamW(parallel.param_groups(model, 0.1), lr=1e-4)
    g = torch.Generator().manual_seed(env.rank)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=g).to(env.device)
    x, y = ids[:, :-1], ids[:, 1:]
    cuda = env.device.type == "cuda"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model.loss(x, y, balance_alpha=1e-4).total
        loss.backward()
        parallel.reduce_expert_grads(model, env)
        parallel.clip_grad_norm(model, env, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(a.warmup + a.iters):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    t = torch.tensor(statistics.median(times))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)        # the slowest rank sets the pace
    if env.is_main:
        tok = a.batch * a.seq / t.item()
        print("JSON " + json.dumps({"bench": "dist_train", "world": env.world, "overlap": a.overlap,
                                    "preset": a.preset, "batch_per_gpu": a.batch, "seq": a.seq,
                                    "step_ms": t.item() * 1e3, "tokens_per_s_per_gpu": tok,
                                    "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}),
              flush=True)
    dist.destroy_process_group()


def bench_throughput(a):
    results = []
    for n in [int(v) for v in a.gpus.split(",")]:
        for overlap in (False, True):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), os.path.abspath(__file__),
                   "_worker", "--preset", a.preset, "--batch", str(a.batch), "--seq", str(a.seq),
                   "--layers", str(a.layers), "--device", a.device, "--warmup", str(a.warmup),
                   "--iters", str(a.iters)] + (["--overlap"] if overlap else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("JSON ")]
            if out.returncode or not lines:
                print(out.stdout[-2000:], out.stderr[-4000:])
                raise SystemExit(f"{n} ranks failed")
            results.append(json.loads(lines[-1][5:]))
            r = results[-1]
            print(f"{n} GPU(s) overlap={overlap!s:<5}: {r['step_ms']:9.1f} ms/step  "
                  f"{r['tokens_per_s_per_gpu']:10.0f} tokens/s per GPU", flush=True)
    print("JSON " + json.dumps({"bench": "dist_train", "rows": results}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["eplb", "throughput", "_worker"])
    p.add_argument("--gpus", default="1,2,4")
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: the preset's)")
    p.add_argument("--batch", type=int, default=4, help="sequences per GPU")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--overlap", action="store_true")
    a = p.parse_args()
    if a.what == "eplb":
        bench_eplb()
    elif a.what == "throughput":
        bench_throughput(a)
    else:
        worker(a)


if __name__ == "__main__":
    main()
