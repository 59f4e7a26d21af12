"""FP8 training (DeepSeek-V3 §3.3) against BF16 on one GPU, in one run (issue #5):

    python3 bench/fp8.py [--parts abc] [--steps 1000] [--compile | --graph | --step-graph] [--configs small,wide]
                         [--unfolded]

(a) GEMM TFLOP/s, quantization included, for the linear layers of one training step of `small` and of a wider
    config (hidden 4096): FP8 (fp32 master weight, Fprop + Dgrad + Wgrad and every quantization) against bf16
    GEMMs on bf16 weights, per shape and weighted over the model; FP8 outputs are checked against the exact
    emulation and the path each GEMM took (cuBLAS `_scaled_mm`, Triton, emulation) is reported; each step is
    timed as one call (host work included) and replayed as a CUDA graph (GPU time only).
(b) training tokens/s, FP8 against BF16 (fp32 master weights, bf16 autocast, fused AdamW), both configs; with
    --compile both models' blocks are compiled and replayed as CUDA graphs, as the trainer does for bf16 (the FP8
    quantizations and GEMMs are custom ops traced into each block's graph); with --graph the whole eager step
    (forward, backward, AdamW) of both models is captured once as a CUDA graph and replayed, so no host work is
    left in the timed step; with --step-graph both run as the trainer's run.step_graph does (compiled blocks
    without graphs of their own, the shared experts on a side stream, the whole step one CUDA graph).
(c) ≥ 1000 steps of FP8 and of BF16 from the same init and data (a fixed random bigram source generated here),
    the relative loss difference over the last 100 steps, and a PNG of both curves.
Targets (issue #5): (a) ≥ 1.4× bf16 at the wide shapes, (b) ≥ 1.2× on the wide config, (c) < 0.25%.
Prints a table per part and writes fp8_gemm.json, fp8_train.json, fp8_loss.json and fp8_loss.png to $OUT.
"""
import argparse
import gc
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import capture, clocks_text, cuda_time_ms, env, graphed_step_fn, median  # noqa: E402
from bench.train import nanoseek_graph_step_fn, nanoseek_optimizer  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.fp8 import convert_to_fp8, hopper, paths  # noqa: E402
from nanoseek.fp8.emulate import EmulatedFP8  # noqa: E402
from nanoseek.fp8.linear import FP8Matmul  # noqa: E402
from nanoseek.info import count  # noqa: E402
from nanoseek.train.compile import compile_blocks as compile_model, overlap_shared_experts  # noqa: E402
from nanoseek.train.step_graph import WARMUP_STEPS  # noqa: E402
from nanoseek.kernels import grouped_mm  # noqa: E402
from nanoseek.fp8.experts import FP8Experts  # noqa: E402
from nanoseek.model import DeepSeekV3  # noqa: E402
from nanoseek.model.moe import Experts  # noqa: E402

_FOLDED = FP8Experts.forward_permuted

# the training shapes: `small` at DESIGN.md §4's batch, and a wider model whose GEMMs are hidden 4096
CONFIGS = {
    "small": (preset("small", num_nextn_predict_layers=0), 8, 2048),
    "wide": (preset("small", hidden_size=4096, num_hidden_layers=4, intermediate_size=11264,
                    moe_intermediate_size=1408, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                    topk_group=2, num_attention_heads=32, q_lora_rank=1536, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_nextn_predict_layers=0),
             4, 2048),
}


def linear_shapes(cfg, tokens: int) -> list[tuple[str, int, int, int, int, int]]:
    """(name, rows, N, K, groups, layers using it) of every FP8 GEMM in one forward of the model."""
    L, dense = cfg.num_hidden_layers, cfg.first_k_dense_replace
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    q = ([("q_a_proj", tokens, cfg.q_lora_rank, H, 1, L), ("q_b_proj", tokens, nh * cfg.qk_head_dim,
                                                          cfg.q_lora_rank, 1, L)]
         if cfg.q_lora_rank else [("q_proj", tokens, nh * cfg.qk_head_dim, H, 1, L)])
    rows, E, I = tokens * cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.moe_intermediate_size
    shared = I * cfg.n_shared_experts
    return q + [
        ("kv_a_proj_with_mqa", tokens, cfg.kv_lora_rank + cfg.qk_rope_head_dim, H, 1, L),
        ("kv_b_proj", tokens, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, 1, L),
        ("o_proj", tokens, H, nh * cfg.v_head_dim, 1, L),
        ("mlp.gate_proj/up_proj", tokens, cfg.intermediate_size, H, 1, 2 * dense),
        ("mlp.down_proj", tokens, H, cfg.intermediate_size, 1, dense),
        ("shared.gate_proj/up_proj", tokens, shared, H, 1, 2 * (L - dense)),
        ("shared.down_proj", tokens, H, shared, 1, L - dense),
        ("experts.gate_up_proj", rows, 2 * I, H, E, L - dense),
        ("experts.down_proj", rows, H, I, E, L - dense),
    ]


def _routing_counts(rows: int, groups: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(0)
    return torch.bincount(torch.randint(0, groups, (rows,), device="cuda", generator=g), minlength=groups)


def graph_ms(fn):
    """GPU time of fn() captured as a CUDA graph and replayed (no host work), or None when it cannot be captured."""
    try:
        return median(cuda_time_ms(capture(fn).replay, 3, 10))
    except Exception as e:
        print(f"  (no CUDA graph: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None


def bench_gemm(name, M, N, K, G, fp8):
    """ms of FP8 and bf16 for fwd (one GEMM) and fwd+bwd (three GEMMs), and FP8's error against emulation.

    Each time is one call between CUDA events after a synchronize, so host work counts: for small layers the FP8
    path's launches and allocations outweigh its GEMMs, and anything a path ran per call (an emulation) would show.
    The step is also timed replayed as a CUDA graph: its GPU time alone, what a graph-captured training step pays."""
    counts = None if G == 1 else _routing_counts(M, G)
    shape = (N, K) if G == 1 else (G, N, K)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    w32 = (torch.randn(shape, device="cuda") * K ** -0.5).requires_grad_()
    w16 = w32.detach().bfloat16().requires_grad_()

    def f8():
        return FP8Matmul.apply(x, w32, counts, fp8, torch.bfloat16, torch.is_grad_enabled())

    def b16():
        return F.linear(x, w16) if G == 1 else grouped_mm(x, w16, counts)

    out = {}
    for label, fn, w in (("fp8", f8, w32), ("bf16", b16, w16)):
        with torch.no_grad():
            out[label + "_fwd_ms"] = median(cuda_time_ms(fn, 3, 10))
        out[label + "_step_ms"] = median(cuda_time_ms(lambda: torch.autograd.grad(fn(), (x, w), dy), 3, 10))
        out[label + "_graph_ms"] = graph_ms(lambda: torch.autograd.grad(fn(), (x, w), dy))
    # all three GEMMs against the exact emulation from the same high-precision inputs: a wrong quantized operand
    # (the Wᵀ copy Dgrad reads, the token tiles Wgrad reads) shows here, not in the per-path checks
    runs = []
    for backend in (fp8, EmulatedFP8()):
        xi, wi = x.detach().clone().requires_grad_(), w32.detach().clone().requires_grad_()
        y = FP8Matmul.apply(xi, wi, counts, backend, torch.float32)
        y.backward(dy.float())
        runs.append((y.detach(), xi.grad.float(), wi.grad))
    out["rel_err_vs_emulation"] = {gemm: ((got - want).norm() / want.norm()).item()
                                   for gemm, got, want in zip(("fprop", "dgrad", "wgrad"), *runs)}
    with torch.no_grad():
        full = b16().float()
    out["rel_err_vs_bf16"] = ((runs[0][0] - full).norm() / full.norm()).item()
    out["paths"] = sorted({f"{k[0]}:{v}" for k, v in paths.used.items() if k[1:4] in ((N, K, G), (K, N, G))})
    return out


def part_a(results):
    fp8 = hopper.HopperFP8()
    for cname, (cfg, B, T) in CONFIGS.items():
        print(f"\n(a) {cname}: FP8 GEMMs with quantization vs bf16, {B * T} tokens "
              "(fwd: 1 GEMM; step: fwd + Dgrad + Wgrad)")
        print(f"{'layer':26s} {'M x N x K':>22s} {'G':>3s} {'fp8 fwd':>8s} {'bf16 fwd':>8s} {'fp8 step':>8s} "
              f"{'bf16 step':>9s} {'speedup':>7s} {'err/emul':>8s}  paths (err/emul: worst of the 3 GEMMs)")
        rows, flops, t8, t16, g8, g16 = [], 0.0, 0.0, 0.0, 0.0, 0.0
        for name, M, N, K, G, layers in linear_shapes(cfg, B * T):
            if not layers:
                continue
            r = bench_gemm(name, M, N, K, G, fp8)
            step_flops = 6 * M * N * K
            r.update(layer=name, M=M, N=N, K=K, groups=G, layers=layers,
                     fp8_step_tflops=step_flops / r["fp8_step_ms"] / 1e9,
                     bf16_step_tflops=step_flops / r["bf16_step_ms"] / 1e9)
            rows.append(r)
            flops += layers * step_flops
            t8 += layers * r["fp8_step_ms"]
            t16 += layers * r["bf16_step_ms"]
            if g8 is not None and r["fp8_graph_ms"] and r["bf16_graph_ms"]:
                g8, g16 = g8 + layers * r["fp8_graph_ms"], g16 + layers * r["bf16_graph_ms"]
            else:
                g8 = g16 = None
            print(f"{name:26s} {f'{M}x{N}x{K}':>22s} {G:3d} {r['fp8_fwd_ms']:8.3f} {r['bf16_fwd_ms']:8.3f} "
                  f"{r['fp8_step_ms']:8.3f} {r['bf16_step_ms']:9.3f} {r['bf16_step_ms'] / r['fp8_step_ms']:6.2f}x "
                  f"{max(r['rel_err_vs_emulation'].values()):8.1e}  {' '.join(r['paths'])}")
            if r["fp8_graph_ms"] and r["bf16_graph_ms"]:
                print(f"{'':26s} {'as CUDA graphs (GPU time):':>26s} fp8 step {r['fp8_graph_ms']:.3f}, bf16 step "
                      f"{r['bf16_graph_ms']:.3f}: {r['bf16_graph_ms'] / r['fp8_graph_ms']:.2f}x")
            gc.collect()
            torch.cuda.empty_cache()
        summary = {"fp8_tflops": flops / t8 / 1e9, "bf16_tflops": flops / t16 / 1e9, "speedup": t16 / t8}
        print(f"{'all FP8 GEMMs of a step':26s}  fp8 {summary['fp8_tflops']:.0f} TFLOP/s, bf16 "
              f"{summary['bf16_tflops']:.0f} TFLOP/s: {summary['speedup']:.2f}x (target >= 1.4x at wide)")
        if g8:
            summary.update(fp8_graph_tflops=flops / g8 / 1e9, bf16_graph_tflops=flops / g16 / 1e9,
                           graph_speedup=g16 / g8)
            print(f"{'same, as CUDA graphs':26s}  fp8 {summary['fp8_graph_tflops']:.0f} TFLOP/s, bf16 "
                  f"{summary['bf16_graph_tflops']:.0f} TFLOP/s: {summary['graph_speedup']:.2f}x (GPU time only)")
        results[cname] = {"shapes": rows, **summary}


def build(cfg, fp8: bool, seed: int = 0):
    """The same initial weights for BF16 and FP8: one seed, initialized on the GPU."""
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = DeepSeekV3(cfg)
    return convert_to_fp8(model) if fp8 else model


def train_step_fn(model, opt, x, y):
    def step():
        torch.compiler.cudagraph_mark_step_begin()   # compiled blocks' CUDA graphs: a new step begins
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(x, y, balance_alpha=1e-4).total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def part_b(results, compile_blocks=False, graph=False, iters=8, unfolded=False, step_graph=False):
    """unfolded: also FP8 with the experts' dispatch and combine as ops of their own (Experts.forward_permuted),
    as before they were folded into the GEMMs' quantization. step_graph: both models as the trainer runs them with
    run.step_graph (bench/train.py's bf16-graph): compiled blocks, the shared experts on a side stream, the whole
    step one CUDA graph, nanoseek's AdamW (torch's fused kernel on fp32)."""
    for cname, (cfg, B, T) in CONFIGS.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device="cuda", generator=g)
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        n_act = count(cfg)["activated"]
        runs = {}
        for label, fp8 in (("bf16", False), ("fp8", True)) + ((("fp8-unfolded", True),) if unfolded else ()):
            torch._dynamo.reset()
            FP8Experts.forward_permuted = Experts.forward_permuted if label == "fp8-unfolded" else _FOLDED
            model = build(cfg, fp8)
            if step_graph:
                overlap_shared_experts(model)
                compile_model(model, None)
            elif compile_blocks:
                compile_model(model, "reduce-overhead")
            torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                loss0 = model.loss(x, y).ce.item()
            torch.cuda.reset_peak_memory_stats()
            if step_graph:
                opt = nanoseek_optimizer(model, torch.float32)
                step = nanoseek_graph_step_fn(model, opt, x, y)
                for _ in range(WARMUP_STEPS + 1):   # its warm-up steps and the capture
                    step()
            elif graph:
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=True)
                step = graphed_step_fn(model, opt, x, y)
            else:
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
                step = train_step_fn(model, opt, x, y)
            clocks = {}
            ms = median(cuda_time_ms(step, 3, iters, clocks))
            runs[label] = {"ms": ms, "tokens_per_s": B * T / ms * 1e3, "first_loss": loss0,
                           "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                           "model_tflops": 6 * n_act * B * T / ms / 1e9, "clocks": clocks}
            del model, opt, step
            gc.collect()
            torch.cuda.empty_cache()
        speedup = runs["fp8"]["tokens_per_s"] / runs["bf16"]["tokens_per_s"]
        print(f"\n(b) {cname}: training step, batch {B}x{T}, {n_act / 1e6:.0f}M activated parameters")
        print(f"{'run':12s} {'ms/step':>9s} {'tokens/s':>10s} {'6N TFLOP/s':>10s} {'peak GiB':>9s} {'first loss':>10s}")
        for label, r in runs.items():
            print(f"{label:12s} {r['ms']:9.1f} {r['tokens_per_s']:10.0f} {r['model_tflops']:10.0f} "
                  f"{r['peak_gib']:9.1f} {r['first_loss']:10.4f}   {clocks_text(r['clocks'])}")
        print(f"FP8 / BF16 tokens/s: {speedup:.2f}x (target >= 1.2x at wide)")
        if unfolded:
            print(f"FP8, permutations folded / unfolded: {runs['fp8-unfolded']['ms'] / runs['fp8']['ms']:.3f}x")
        results[cname] = {"batch": B, "seq": T, "activated_params": n_act, "runs": runs, "speedup": speedup,
                          "compiled": compile_blocks or step_graph, "whole_step_graph": graph or step_graph,
                          "trainer_step_graph": step_graph}


# ---- (c) loss curves ---------------------------------------------------------------------------------------
LOSS_CFG = preset("tiny", vocab_size=2048, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
                  num_hidden_layers=4, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
                  qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16,
                  num_experts_per_tok=2, n_group=4, topk_group=2, num_nextn_predict_layers=0)


def bigram_source(vocab: int, successors: int, n_seq: int, seq: int, seed: int = 0):
    """A fixed random bigram chain: each token has `successors` next tokens with random probabilities.
    Returns sequences (n_seq, seq + 1) and the entropy floor (nats/token) of predicting it."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    nxt = torch.randint(0, vocab, (vocab, successors), device="cuda", generator=g)
    probs = (1.5 * torch.randn(vocab, successors, device="cuda", generator=g)).softmax(-1)
    tok = torch.randint(0, vocab, (n_seq,), device="cuda", generator=g)
    out = [tok]
    for _ in range(seq):
        pick = torch.multinomial(probs[tok], 1, generator=g).squeeze(1)
        tok = nxt[tok, pick]
        out.append(tok)
    data = torch.stack(out, 1)
    freq = torch.bincount(data[:, :-1].flatten(), minlength=vocab).float()
    row_entropy = -(probs * probs.log()).sum(-1)
    return data, (freq / freq.sum() * row_entropy).sum().item()


def train_curve(fp8: bool, data, steps: int, batch: int, lr: float = 2e-3, warmup: int = 50):
    model = build(LOSS_CFG, fp8)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    gates = model.moe_gates()
    losses = []
    torch.cuda.synchronize()
    t0 = time.time()
    for s in range(steps):
        seqs = data[s * batch:(s + 1) * batch]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.loss(seqs[:, :-1], seqs[:, 1:], balance_alpha=1e-4)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():   # aux-loss-free balancing, γ = 0.001 (V3 §2.1.2)
            for gate, c in zip(gates, out.expert_load.float()):
                gate.e_score_correction_bias.add_(torch.sign(c.mean() - c), alpha=1e-3)
        losses.append(out.ce.detach())
    torch.cuda.synchronize()
    return torch.stack(losses).float().cpu().tolist(), time.time() - t0


def part_c(results, steps: int, batch: int = 16, seq: int = 256):
    data, floor = bigram_source(LOSS_CFG.vocab_size, 16, steps * batch, seq)
    curves, secs = {}, {}
    for label, fp8 in (("bf16", False), ("fp8", True)):
        curves[label], secs[label] = train_curve(fp8, data, steps, batch)
    last = {k: sum(v[-100:]) / 100 for k, v in curves.items()}
    rel = abs(last["fp8"] - last["bf16"]) / last["bf16"]
    print(f"\n(c) {steps} steps x {batch}x{seq} tokens, bigram source (entropy floor {floor:.3f} nats)")
    for k in curves:
        print(f"{k:5s} first {curves[k][0]:.3f}  mean of last 100 {last[k]:.4f}  ({secs[k]:.0f} s)")
    print(f"relative loss difference over the last 100 steps: {100 * rel:.3f}% (target < 0.25%)")
    results.update(steps=steps, batch=batch, seq=seq, entropy_floor=floor, last100=last, rel_diff=rel,
                   run_seconds=secs, curves=curves)
    out = os.environ.get("OUT")
    if out:
        results["png"] = plot(curves, floor, os.path.join(out, "fp8_loss.png"))


def plot(curves, floor, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(v, k=20):
        return [sum(v[max(0, i - k + 1): i + 1]) / len(v[max(0, i - k + 1): i + 1]) for i in range(len(v))]

    fig, (ax, ax_rel) = plt.subplots(1, 2, figsize=(13, 4.5))
    for (label, v), color in zip(curves.items(), ("tab:blue", "tab:red")):
        ax.plot(v, color=color, alpha=0.2, lw=0.7)
        ax.plot(smooth(v), color=color, label=label.upper())
    ax.axhline(floor, color="gray", ls=":", label="entropy floor")
    ax.set(xlabel="step", ylabel="train loss (nats)", title="FP8 vs BF16 training loss", yscale="log")
    ax.legend()
    rel = [(a - b) / b * 100 for a, b in zip(smooth(curves["fp8"], 50), smooth(curves["bf16"], 50))]
    ax_rel.plot(rel, color="tab:purple")
    ax_rel.axhline(0, color="gray", lw=0.8)
    for y in (0.25, -0.25):
        ax_rel.axhline(y, color="tab:red", ls="--", lw=0.8)
    ax_rel.set(xlabel="step", ylabel="(FP8 − BF16) / BF16 (%)", title="relative loss difference (50-step means)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def save(name: str, payload: dict) -> None:
    """To $OUT only: the tables are the printed output, and the whole JSON would crowd them out of a log tail."""
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "w") as f:
            json.dump(payload, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="abc")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--compile", action="store_true", help="(b): compile both models' blocks, with CUDA graphs")
    ap.add_argument("--graph", action="store_true", help="(b): replay both models' whole steps as CUDA graphs")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="(a), (b): which of " + ", ".join(CONFIGS))
    ap.add_argument("--unfolded", action="store_true", help="(b): also FP8 with the MoE permutations unfolded")
    ap.add_argument("--step-graph", action="store_true", help="(b): both models as the trainer's run.step_graph "
                    "runs them (compiled blocks, shared experts overlapped, the step one CUDA graph)")
    args = ap.parse_args()
    chosen = args.configs.split(",")
    if set(chosen) - set(CONFIGS):
        ap.error(f"--configs: unknown {sorted(set(chosen) - set(CONFIGS))}; choose from {', '.join(CONFIGS)}")
    for cname in set(CONFIGS) - set(chosen):
        del CONFIGS[cname]
    print(env(), flush=True)
    parts = {"a": ("fp8_gemm.json", part_a, ()), "b": ("fp8_train.json", part_b, (args.compile, args.graph, 8, args.unfolded,
                                                             args.step_graph)),
             "c": ("fp8_loss.json", part_c, (args.steps,))}
    summary = {}
    for p in args.parts:
        name, fn, extra = parts[p]
        results = {"env": env()}
        t0 = time.time()
        try:
            fn(results, *extra)
        except Exception:   # one part failing still leaves the others' numbers
            traceback.print_exc()
            results["error"] = traceback.format_exc()
        results["seconds"] = time.time() - t0
        print(f"[part {p}: {results['seconds']:.0f} s]", flush=True)
        save(name, results)
        summary[p] = {k: v for k, v in results.items() if k in ("seconds", "rel_diff", "png")}
        if "error" in results:
            summary[p]["error"] = results["error"].strip().splitlines()[-1]
        for cname in CONFIGS:
            if cname in results:
                summary[p][cname] = results[cname].get("speedup")
    fallbacks = sorted({f"{k[0]} {k[1:3]}: {v}" for k, v in paths.used.items() if v == "emulated"})
    print("GEMMs that fell back to emulation:", fallbacks or "none")
    summary["emulated_gemms"] = fallbacks
    print("JSON " + json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
