"""Training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM on identical weights (DESIGN.md §5).

    python bench/train.py [--preset small] [--batch 8] [--seq 2048] [--no-compile] [--no-cuda-graphs]
                          [--variants bf16,bf16-graph,fp32,eager] [--scaling] [--inductor NAME=VALUE,...]
                          [--doc-len N [--dense-mask]] [--no-overlap] [--rounds R]

Both models start from the same checkpoint; their first-step losses must agree. transformers runs as in
DESIGN.md §4 (bf16 weights, sdpa, torch's fused AdamW); nanoseek runs like for like (bf16 weights and moments)
and as its trainer does by default (fp32 master weights, bf16 autocast), with compiled blocks replayed as CUDA
graphs (the trainer's run.compile and run.cuda_graphs), and eager; bf16-graph is the like-for-like run with the
whole step (forward, backward, AdamW) captured as one CUDA graph by the trainer's run.step_graph machinery
(train/step_graph.py), its blocks compiled without graphs of their own. nanoseek steps with its own AdamW
(train/optim.py: torch's fused kernel on fp32, a Triton kernel on bf16) with torch's defaults (β = 0.9, 0.999,
weight decay 0.01). Prints tokens/s, the ratio, "6N" MFU on activated parameters against the bf16 GEMM rate
measured in the same run, and peak memory; then, with --scaling, tokens/s as n_routed_experts grows at fixed
activated parameters. --doc-len N times nanoseek with document masking
(data.document_mask) over documents of N tokens: FlexAttention, or with --dense-mask SDPA with a dense mask.
Under each run: the SM clock and power draw while it was timed (nvidia-smi), since the GPU lowers its clock at
its power limit and the steps' times move with it.
"""
import argparse
import ast
import functools
import gc
import os
import sys
import tempfile

import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import bf16_gemm_tflops, clocks_text, cuda_time_ms, env, median, write_json  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.fp8 import convert_to_fp8  # noqa: E402
from nanoseek.info import count  # noqa: E402
from nanoseek.io import save_hf  # noqa: E402
from nanoseek.model import DeepSeekV3, transformer  # noqa: E402
from nanoseek.model.mla import document_mask  # noqa: E402
from nanoseek.train.compile import compile_blocks as compile_model, overlap_shared_experts  # noqa: E402
from nanoseek.train.optim import AdamW  # noqa: E402
from nanoseek.train.recompute import apply_recompute  # noqa: E402
from nanoseek.train.step_graph import WARMUP_STEPS, StepGraph  # noqa: E402


def batch(cfg, B, T, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device="cuda", generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def nanoseek_step_fn(model, opt, x, y, mtp_lambda=0.0, doc_ids=None):
    def step():
        torch.compiler.cudagraph_mark_step_begin()   # as the trainer does with run.cuda_graphs
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(x, y, mtp_lambda=mtp_lambda, balance_alpha=1e-4, doc_ids=doc_ids).total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def nanoseek_graph_step_fn(model, opt, x, y, doc_ids=None):
    """The step as the trainer runs it with run.step_graph (train/step_graph.py): warm-up steps, the capture, then
    replays, the batch copied into the graph's inputs and the learning rate read from a device scalar."""
    def step(batches, mtp_lambda, autocast_cache=True):
        ((xb, yb, docs),) = batches
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=autocast_cache):
            loss = model.loss(xb, yb, balance_alpha=1e-4, doc_ids=docs).total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    graph = StepGraph(step, opt, x.device)
    return lambda: graph.run([(x, y, doc_ids)], 1e-4, None)


def hf_step_fn(model, opt, x, y):
    def step():
        loss = _hf_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def _hf_loss(model, x, y):
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def nanoseek_optimizer(model, dtype):
    """nanoseek's AdamW with torch's defaults, moments in the weights' dtype (as torch keeps them for transformers)."""
    return AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01, moment_dtype=dtype)


def measure(step, iters, warmup, reset=True, clocks=None, resident=0):
    """(median ms, peak GiB); `clocks`, a dict, gets the SM clock and power over the timed steps (gpu_clocks).
    resident: bytes held by other models kept alive (--rounds), left out of the peak."""
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return median(cuda_time_ms(step, warmup, iters, clocks)), (torch.cuda.max_memory_allocated() - resident) / 2**30


def build_nanoseek(cfg, compile_blocks, state=None, dtype=torch.float32, fp8=False, compile_mode=None,
                   recompute="none", overlap=True):
    torch._dynamo.reset()  # each model compiles afresh (shared code objects would pile up guards across models)
    torch.manual_seed(0)
    model = DeepSeekV3(cfg).cuda()
    if state is not None:
        model.load_state_dict(state)
    model.to(dtype)
    if fp8:
        convert_to_fp8(model)
    apply_recompute(model, recompute)
    if overlap and recompute == "none" and not (compile_blocks and compile_mode):   # as the trainer does
        overlap_shared_experts(model)
    if compile_blocks:
        compile_model(model, compile_mode)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="compiled blocks without CUDA graphs")
    ap.add_argument("--variants", default="bf16,bf16-graph,fp32,eager", help="nanoseek runs: bf16 (like for like), "
                    "bf16-graph (the same, the whole step one CUDA graph), fp32 (fp32 master weights + autocast), "
                    "eager (fp32 masters, not compiled); a suffix :MODE adds run.recompute MODE (e.g. bf16:v3)")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--no-overlap", action="store_true", help="the shared experts in line with the routed ones "
                    "(run.overlap_shared_experts = false)")
    ap.add_argument("--doc-len", type=int, default=0, help="nanoseek runs with data.document_mask over documents of "
                    "this many tokens (needs --no-hf: transformers runs unmasked)")
    ap.add_argument("--dense-mask", action="store_true", help="with --doc-len: SDPA with a dense (B, T, T) mask "
                    "instead of FlexAttention's block mask")
    ap.add_argument("--rounds", type=int, default=1, help="time every run this many times, in turn (transformers, "
                    "then each variant, then again), all models kept alive: the ratio of each round and their "
                    "median, so that a change of the GPU's clock or power state during the run reaches both sides")
    ap.add_argument("--inductor", default="", help="torch._inductor.config settings for nanoseek's compiled blocks, "
                    "e.g. coordinate_descent_tuning=True,triton.multi_kernel=1 (comma-separated NAME=PYTHON_VALUE)")
    args = ap.parse_args()
    if args.doc_len and not args.no_hf:
        raise SystemExit("--doc-len: compare against nanoseek's unmasked runs, with --no-hf")
    if args.rounds < 1 or (args.rounds > 1 and not all("-graph" in v for v in args.variants.split(","))):
        raise SystemExit("--rounds: >= 1, and above 1 only with step-graph variants (a graph replays as captured; "
                         "a compiled model would recompile after the next model's dynamo reset)")
    for setting in filter(None, args.inductor.split(",")):
        name, _, value = setting.partition("=")
        *parents, last = name.split(".")   # nested settings too: triton.multi_kernel=1
        section = inductor_config
        for parent in parents:
            section = getattr(section, parent, None)
        if not hasattr(section, last):
            raise SystemExit(f"--inductor: torch._inductor.config has no setting {name!r}")
        setattr(section, last, ast.literal_eval(value))
    mode = None if args.no_cuda_graphs else "reduce-overhead"
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = preset(args.preset, num_nextn_predict_layers=0)
    B, T = args.batch, args.seq
    tokens = B * T
    gemm = bf16_gemm_tflops()
    n_act = count(cfg)["activated"]
    flops_per_token = 6 * n_act
    results = {"env": env(), "preset": args.preset, "batch": B, "seq": T, "bf16_gemm_tflops": gemm,
               "activated_params": n_act}
    x, y = batch(cfg, B, T)
    doc_ids = (torch.arange(T, device="cuda") // args.doc_len).expand(B, T) if args.doc_len else None
    if args.dense_mask:
        transformer.document_mask = functools.partial(document_mask, flex=False)
    rows, kept = [], []   # kept: the steps of the runs timed again in later rounds, in the order of rows

    # -- identical weights: nanoseek's random init, saved as an HF checkpoint, loaded by transformers
    torch.manual_seed(0)
    ref = DeepSeekV3(cfg)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    hf_loss0 = None
    if not args.no_hf:
        import transformers
        with tempfile.TemporaryDirectory() as d:
            save_hf(ref, d)
            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.bfloat16,
                                                                    attn_implementation="sdpa").cuda()
        hf.train()
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
        step = hf_step_fn(hf, opt, x, y)
        with torch.no_grad():
            hf_loss0 = _hf_loss(hf, x, y).item()
        clocks = {}
        ms, mem = measure(step, args.iters, args.warmup, clocks=clocks)
        rows.append(("transformers (bf16, sdpa)", ms, mem, clocks))
        if args.rounds > 1:
            kept.append(step)
        del hf, opt, step
        gc.collect()
        torch.cuda.empty_cache()
    del ref

    # like for like with transformers (bf16 weights and moments), then as nanoseek's trainer runs by default
    kinds = {"bf16": ("bf16 weights", not args.no_compile, torch.bfloat16),
             "bf16-graph": ("bf16 weights", not args.no_compile, torch.bfloat16),
             "fp32": ("fp32 master, autocast", not args.no_compile, torch.float32),
             "eager": ("fp32 master, autocast", False, torch.float32)}
    for variant in args.variants.split(","):
        key, _, recompute = variant.partition(":")
        weights, comp, dtype = kinds[key]
        graph = key.endswith("-graph")
        how = ("compiled, step as one CUDA graph" if graph else ("compiled, CUDA graphs" if mode else "compiled")
               if comp else "eager")
        name = (f"nanoseek ({weights}, {how}" + (f", recompute {recompute}" if recompute else "")
                + (f", documents of {args.doc_len} ({'dense' if args.dense_mask else 'flex'} mask)"
                   if args.doc_len else "") + ")")
        resident = torch.cuda.memory_allocated()   # the models --rounds keeps alive
        model = build_nanoseek(cfg, comp, state, dtype, compile_mode=None if graph else mode,
                               recompute=recompute or "none", overlap=not args.no_overlap)
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss0 = model.loss(x, y, doc_ids=doc_ids).ce.item()
        opt = nanoseek_optimizer(model, dtype)
        if graph:
            torch.cuda.reset_peak_memory_stats()   # the graph's memory pool is taken while capturing
            step = nanoseek_graph_step_fn(model, opt, x, y, doc_ids)
        else:
            step = nanoseek_step_fn(model, opt, x, y, doc_ids=doc_ids)
        warmup = args.warmup + (WARMUP_STEPS + 1 if graph else 0)   # past the graph's warm-ups and its capture
        clocks = {}
        ms, mem = measure(step, args.iters, warmup, reset=not graph, clocks=clocks, resident=resident)
        rows.append((name, ms, mem, clocks))
        results.setdefault("first_loss", {})[name] = loss0
        if args.rounds > 1:
            kept.append(step)
        del model, opt, step
        gc.collect()
        torch.cuda.empty_cache()
    results["first_loss"]["transformers"] = hf_loss0
    rounds = [[ms] for _, ms, *_ in rows]   # ms/step of each round, per row
    for _ in range(args.rounds - 1):   # every step warmed up already: one untimed step re-enters its state
        for times, step in zip(rounds, kept):
            times.append(measure(step, args.iters, 1, reset=False)[0])
    kept.clear()

    print(f"\n{torch.cuda.get_device_name()}  preset={args.preset}  batch {B}x{T}  activated {n_act / 1e6:.0f}M  "
          f"bf16 GEMM {gemm:.0f} TFLOP/s")
    print(f"first-step loss: {results['first_loss']}")
    print(f"{'run':40s} {'ms/step':>9s} {'tokens/s':>10s} {'MFU':>6s} {'peak GiB':>9s} {'vs HF':>7s}")
    base = rows[0][1] if not args.no_hf else None
    for (name, ms, mem, clocks), times in zip(rows, rounds):
        tps = tokens / (ms * 1e-3)
        mfu = tps * flops_per_token / (gemm * 1e12)
        ratio = f"{base / ms:.2f}x" if base else "-"
        print(f"{name:40s} {ms:9.1f} {tps:10.0f} {100 * mfu:5.1f}% {mem:9.1f} {ratio:>7s}")
        print(f"{'':40s} while timed: {clocks_text(clocks)}")
        results.setdefault("runs", []).append({"name": name, "ms": ms, "tokens_per_s": tps, "mfu": mfu,
                                               "peak_gib": mem, "clocks": clocks, "rounds_ms": times})
    if args.rounds > 1:
        print(f"\n{args.rounds} rounds, in turn (ms/step of each round; ratio to transformers of the same round):")
        for i, ((name, *_), times) in enumerate(zip(rows, rounds)):
            line = "  ".join(f"{t:.1f}" for t in times)
            if base and i > 0:
                ratios = [h / t for h, t in zip(rounds[0], times)]
                line += (f"   ratios {'  '.join(f'{r:.2f}x' for r in ratios)}, median {median(ratios):.2f}x "
                         f"(min {min(ratios):.2f}x)")
                results["runs"][i]["round_ratios"] = ratios
            print(f"{name:40s} {line}")

    if args.scaling:
        # bf16 weights and moments here (not fp32 masters) so that 256 experts (6.1B parameters) fit in 80 GB
        print("\nscaling at fixed activated parameters (top-4 of E experts, moe_intermediate 512; bf16 weights):")
        print(f"{'experts':>8s} {'total':>8s} {'activated':>10s} {'tokens/s':>10s} {'peak GiB':>9s}")
        for E in (8, 32, 64, 128, 256):
            c = cfg.replace(n_routed_experts=E)
            model = build_nanoseek(c, not args.no_compile, dtype=torch.bfloat16, compile_mode=mode)
            opt = nanoseek_optimizer(model, torch.bfloat16)
            ms, mem = measure(nanoseek_step_fn(model, opt, x, y), args.iters, args.warmup)
            n = count(c)
            tps = tokens / (ms * 1e-3)
            print(f"{E:8d} {n['total'] / 1e9:7.2f}B {n['activated'] / 1e6:9.0f}M {tps:10.0f} {mem:9.1f}")
            results.setdefault("scaling", []).append({"experts": E, "total": n["total"],
                                                      "activated": n["activated"], "tokens_per_s": tps,
                                                      "peak_gib": mem})
            del model, opt
            gc.collect()
            torch.cuda.empty_cache()
    write_json("train.json", results)


if __name__ == "__main__":
    main()
