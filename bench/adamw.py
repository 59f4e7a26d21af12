"""AdamW step time on the parameters of a preset (default small, 885M): torch's fused kernel against nanoseek's
Triton kernel (kernels/adamw_triton.py), for bf16 parameters and moments (bench/train.py's like-for-like run), fp32
parameters and moments, and fp32 parameters with bf16 moments (V3). Random gradients; times with CUDA events,
eager (host launches included) and replayed as a CUDA graph (GPU time only); bytes moved per step / time.

    python3 bench/adamw.py [--preset small] [--sweep]

--sweep also times the Triton kernel's launch configurations (elements per program, warps) on bf16 / bf16.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import capture, copy_tb_s, cuda_time_ms, env, median, write_json  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.kernels.adamw_triton import adamw_step  # noqa: E402
from nanoseek.model import DeepSeekV3  # noqa: E402

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def tensors(cfg, p_dtype, m_dtype):
    with torch.device("meta"):
        shapes = [p.shape for p in DeepSeekV3(cfg).parameters()]
    g = torch.Generator(device="cuda").manual_seed(0)
    ps = [torch.randn(s, device="cuda", generator=g).to(p_dtype) for s in shapes]
    gs = [torch.randn(s, device="cuda", generator=g).to(p_dtype) for s in shapes]
    ms = [torch.zeros(s, device="cuda", dtype=m_dtype) for s in shapes]
    vs = [torch.zeros(s, device="cuda", dtype=m_dtype) for s in shapes]
    return ps, gs, ms, vs


def torch_fused(ps, gs, ms, vs):
    steps = [torch.zeros((), device="cuda") for _ in ps]

    def step():
        torch._foreach_add_(steps, 1)
        torch._fused_adamw_(ps, gs, ms, vs, [], steps, lr=HYPER["lr"], beta1=HYPER["beta1"], beta2=HYPER["beta2"],
                            weight_decay=HYPER["weight_decay"], eps=HYPER["eps"], amsgrad=False, maximize=False)
    return step


def triton_loop(ps, gs, ms, vs, **launch):
    t = torch.zeros((), device="cuda")

    def step():
        t.add_(1)
        for p, g, m, v in zip(ps, gs, ms, vs):
            adamw_step(p, g, m, v, t, HYPER["lr"], HYPER["beta1"], HYPER["beta2"], HYPER["eps"],
                       HYPER["weight_decay"], **launch)
    return step


def sweep(cfg, results):
    ps, gs, ms, vs = tensors(cfg, torch.bfloat16, torch.bfloat16)
    nbytes = sum(p.numel() for p in ps) * 14
    print(f"\n{'BLOCK':>6s} {'warps':>5s} {'graph ms':>9s} {'TB/s':>6s}   (Triton, bf16 / bf16)")
    for block, warps in ((4096, 8), (2048, 4), (4096, 4), (8192, 8), (8192, 16), (16384, 16), (1024, 4)):
        graph = median(cuda_time_ms(capture(triton_loop(ps, gs, ms, vs, block=block, num_warps=warps)).replay, 3,
                                    10))
        results["sweep"].append({"block": block, "num_warps": warps, "graph_ms": graph, "tb_s": nbytes / graph / 1e9})
        print(f"{block:6d} {warps:5d} {graph:9.3f} {nbytes / graph / 1e9:6.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    cfg = preset(args.preset, num_nextn_predict_layers=0)
    results = {"env": env(), "preset": args.preset, "copy_tb_s": copy_tb_s(), "runs": []}
    print(f"{'storage (p / m, v)':22s} {'kernel':8s} {'eager ms':>9s} {'graph ms':>9s} {'TB/s':>6s} {'vs torch':>9s}")
    for p_dtype, m_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                             (torch.float32, torch.bfloat16)):
        label = f"{str(p_dtype)[6:]} / {str(m_dtype)[6:]}"
        finals, base = {}, None
        for name, make in (("torch", torch_fused), ("triton", triton_loop)):
            if name == "torch" and p_dtype != m_dtype:
                continue   # torch's fused kernel keeps moments in the parameters' dtype
            ps, gs, ms, vs = tensors(cfg, p_dtype, m_dtype)
            n = sum(p.numel() for p in ps)
            nbytes = n * (2 * p_dtype.itemsize + p_dtype.itemsize + 4 * m_dtype.itemsize)
            step = make(ps, gs, ms, vs)
            step()
            finals[name] = torch.cat([p.float().flatten() for p in ps[:8]])   # after one step, for the check
            eager = median(cuda_time_ms(step, 3, 10))
            graph = median(cuda_time_ms(capture(step).replay, 3, 10))
            base = base or graph
            r = {"storage": label, "kernel": name, "eager_ms": eager, "graph_ms": graph,
                 "tb_s": nbytes / graph / 1e9, "params": n}
            results["runs"].append(r)
            print(f"{label:22s} {name:8s} {eager:9.2f} {graph:9.2f} {r['tb_s']:6.2f} {base / graph:8.2f}x")
            del ps, gs, ms, vs, step
            torch.cuda.empty_cache()
        if len(finals) == 2:
            diff = ((finals["triton"] - finals["torch"]).norm() / finals["torch"].norm()).item()
            print(f"{'':22s} first-step parameters, triton vs torch: relative difference {diff:.1e}")
            results["runs"][-1]["rel_diff_vs_torch"] = diff
    if args.sweep:
        results["sweep"] = []
        sweep(cfg, results)
    print(f"copy {results['copy_tb_s']:.2f} TB/s")
    write_json("adamw.json", results)


if __name__ == "__main__":
    main()
