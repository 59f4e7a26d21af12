"""GRPO rollouts: the inference engine against its peers, and where a GRPO step's time goes (DESIGN.md §5).

    python bench/grpo.py [--ckpt runs/posttrain/sft/final] [--prompts 32] [--group 8] [--new 96] [--steps 3]

One checkpoint (default: the post-training demo's SFT model, the GRPO starting point; else the pretraining demo
model), the same reasoning prompts of the arithmetic task, G samples each at temperature 1:
  * engine        nanoseek's continuous-batching engine (latent cache, CUDA graphs), as GRPO uses it
  * static        nanoseek's simple batched `generate_ids` (one static batch, eager): the engine's reference
  * transformers  DeepseekV3ForCausalLM.generate on the same weights (sampling, num_return_sequences = G)
Sampled tokens/s end to end (prefill included, each sequence counted to its EOS), the same bf16 weights for all.
Then a few real GRPO steps (fp32 master weights, bf16 autocast) report the step time split: rollouts,
π_old/π_ref log-probabilities + updates, and the rollout tokens/s and generation share that the demo logs.
Prints a table and one JSON line (also $OUT/grpo.json when OUT is set).
"""
import argparse
import gc
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import env, timed, write_json  # noqa: E402
from nanoseek.eval.gen import prompts_of  # noqa: E402
from nanoseek.infer.generate import generate_ids  # noqa: E402
from nanoseek.infer.load import load  # noqa: E402
from nanoseek.infer.sample import SamplingParams  # noqa: E402
from nanoseek.post.grpo import GRPO, GRPOConfig  # noqa: E402
from nanoseek.post.rollout import Timing, make_engine, sample  # noqa: E402
from nanoseek.post.tasks import get_task  # noqa: E402
from nanoseek.train.checkpoint import model_dir  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--steps", type=int, default=3, help="GRPO steps to time (after one warm-up step)")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    ckpt = args.ckpt or next(p for p in ("runs/posttrain/sft/final", "runs/demo") if os.path.exists(p))
    src = model_dir(ckpt)
    model, tok = load(src, device="cuda", dtype="bfloat16")
    task = get_task(args.task)
    problems = task.problems("train", args.prompts, seed=12345)
    prompts = prompts_of(tok, task, problems)
    B, G, new = args.prompts, args.group, args.new
    results = {"env": env(), "ckpt": src, "task": task.name, "prompts": B, "group": G, "max_new_tokens": new,
               "rollouts": {}}

    engine = make_engine(model, tok, max_batch=B * G, max_len=max(map(len, prompts)) + new)
    sample(engine, prompts, G, new, seed=0)                                  # warm-up: captures the CUDA graphs
    timing = Timing()
    _, s = timed(lambda: sample(engine, prompts, G, new, seed=1, timing=timing))
    results["rollouts"]["engine"] = {"tokens": timing.tokens, "seconds": s, "tokens_per_s": timing.tokens / s}
    del engine
    gc.collect()

    flat = [p for p in prompts for _ in range(G)]
    params = [SamplingParams(max_tokens=new, temperature=1.0, seed=i) for i in range(len(flat))]
    generate_ids(model, flat[:8], params[:8], tok.eos_id)                    # warm-up
    out, s = timed(lambda: generate_ids(model, flat, params, tok.eos_id))
    n = sum(len(o) + (len(o) < new) for o in out)                            # + the EOS of finished rows
    results["rollouts"]["static"] = {"tokens": n, "seconds": s, "tokens_per_s": n / s}

    if not args.no_hf:
        import transformers
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(src, dtype=torch.bfloat16,
                                                                attn_implementation="sdpa").cuda().eval()
        pad = tok.pad_id
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device="cuda")   # left-padded
        mask = (torch.arange(width, device="cuda")[None] >= (width - torch.tensor([len(p) for p in prompts],
                                                                                    device="cuda"))[:, None]).long()

        def hf_rollouts():
            return hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               num_return_sequences=G, max_new_tokens=new, eos_token_id=tok.eos_id,
                               pad_token_id=pad)
        hf_rollouts()
        seqs, s = timed(hf_rollouts)
        gen = seqs[:, width:].tolist()
        n = sum(next((i + 1 for i, t in enumerate(row) if t == tok.eos_id), len(row)) for row in gen)
        results["rollouts"]["transformers"] = {"tokens": n, "seconds": s, "tokens_per_s": n / s}
        del hf
    del model
    gc.collect()
    torch.cuda.empty_cache()

    out_dir = tempfile.mkdtemp(prefix="bench-grpo-")
    try:
        cfg = GRPOConfig(task=args.task, steps=args.steps + 1, prompts_per_step=B, group_size=G, max_new_tokens=new,
                         eval_every=0, eval_problems=8, checkpoint_every=0, lr=1e-5)
        trainer = GRPO(cfg, src, out_dir, device="cuda", log=lambda *a: None)
        trainer.step()                                                       # warm-up
        steps = [trainer.step() for _ in range(args.steps)]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    total = sum(r["time"] for r in steps)
    gen_s = sum(r["gen_share"] * r["time"] for r in steps)
    results["grpo_step"] = {"seconds": total / len(steps), "generation_seconds": gen_s / len(steps),
                            "gen_share": gen_s / total,
                            "rollout_tokens_per_s": sum(r["rollout_tokens"] for r in steps) / gen_s,
                            "response_length": sum(r["length"] for r in steps) / len(steps)}

    print(f"\n{torch.cuda.get_device_name()}  {src}  {task.name}: {B} prompts × G={G}, ≤{new} new tokens, T=1")
    print(f"{'rollouts':>14s} {'tokens':>8s} {'seconds':>8s} {'tokens/s':>10s} {'vs engine':>10s}")
    base = results["rollouts"]["engine"]["tokens_per_s"]
    for name, r in results["rollouts"].items():
        print(f"{name:>14s} {r['tokens']:8d} {r['seconds']:8.2f} {r['tokens_per_s']:10.0f} "
              f"{base / r['tokens_per_s']:9.1f}x")
    g = results["grpo_step"]
    print(f"GRPO step: {g['seconds']:.2f} s, generating {g['generation_seconds']:.2f} s ({g['gen_share']:.0%}), "
          f"rollouts {g['rollout_tokens_per_s']:.0f} tokens/s, mean response {g['response_length']:.1f} tokens")
    write_json("grpo.json", results)


if __name__ == "__main__":
    main()
