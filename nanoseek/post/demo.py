"""The post-training demo: the pretrained demo model -> SFT -> GRPO on a built-in task, held-out accuracy after
each stage.

    python -m nanoseek.post.demo [--base runs/demo] [--out runs/posttrain] [--device auto] [--fresh]
                                 [--grpo-seconds S]

  0. base   `nanoseek demo`'s model (runs/demo; pretrained here with configs/demo.toml when absent)
  1. SFT    V3's two sample kinds of the arithmetic task (plain answers, and worked solutions in <think>):
            on an H200, 600 steps take the held-out accuracy from 0% to 78% (150 steps: 7%, 300: 23%)
  2. GRPO   rule-based rewards on its own samples (G per problem, from the inference engine), from the SFT
            model, which is also the KL reference. This model is sharp along its policy gradient: lr ≥ 3e-5
            lost accuracy in every run; at 1e-5 (H200, 200 steps, from an SFT model at 86.0% greedy) held-out
            pass@1 at T = 0.6 rose 73.3% → 77.2% and greedy 86.0% → 87.4% (BENCHMARKS.md), short of +10 points.
            From a model with more room (48.8% greedy) lr 3e-5 with 4 updates per batch (`minibatches`) gained
            +12.8 points greedy in 325 steps (≈5.3 minutes alone on an H200; the demo's lr 1e-5 +7.6 in 543
            steps). --grpo-seconds S ends the stage after S seconds like its last step
Each stage is scored on the same held-out problems (greedy, reasoning prompt) and the run ends with a table,
runs/posttrain/summary.json and the GRPO curves (runs/posttrain/grpo/grpo.png). Sized for a few minutes on
one GPU. A stage that has finished is not run again (--fresh starts over).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time

from .grpo import GRPOConfig, grpo
from .sft import SFTConfig, sft

TASK = "arithmetic"
HELDOUT = 500
SFT = SFTConfig(task=TASK, problems=20000, steps=600, batch_size=32, seq_len=256, lr=1e-3, warmup_steps=10,
                eval_problems=HELDOUT, max_new_tokens=64)
GRPO_CFG = GRPOConfig(task=TASK, steps=200, prompts_per_step=64, group_size=8, max_new_tokens=64, lr=1e-5,
                      warmup_steps=10, beta=0.04, eval_every=50, eval_problems=HELDOUT, checkpoint_every=50)


def _heldout(model_path: str, device: str) -> float:
    from ..eval.gen import evaluate, prompts_of
    from ..infer.load import load
    from .rollout import make_engine
    from .tasks import get_task
    model, tok = load(model_path, device=device)
    task = get_task(TASK)
    problems = task.problems("test", HELDOUT)
    engine = make_engine(model, tok, max_batch=256,
                         max_len=max(map(len, prompts_of(tok, task, problems))) + SFT.max_new_tokens)
    return evaluate(engine, task, problems, max_tokens=SFT.max_new_tokens)["exact_match"]


def _done(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "final", "config.json"))


def main(base: str = "runs/demo", out: str = "runs/posttrain", device: str = "auto", fresh: bool = False,
         grpo_seconds: float = 0.0) -> dict:
    from ..train import checkpoint
    start = time.time()
    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    summary_path = os.path.join(out, "summary.json")
    summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else {"stages": {}}

    def stage(name, accuracy, seconds, **extra):
        summary["stages"][name] = {"heldout_accuracy": accuracy, "seconds": seconds, **extra}
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)

    try:
        init = checkpoint.model_dir(base)
    except FileNotFoundError:
        from ..train.demo import main as pretrain
        print(f"[0/3] no pretrained model in {base}: pretraining it (nanoseek demo)", flush=True)
        pretrain(out=base, device=device)
        init = checkpoint.model_dir(base)
    if "base" not in summary["stages"]:
        t = time.time()
        stage("base", _heldout(init, device), time.time() - t, model=init)
    print(f"[0/3] base model {init}: held-out accuracy {summary['stages']['base']['heldout_accuracy']:.1%}",
          flush=True)

    sft_dir = os.path.join(out, "sft")
    if not _done(sft_dir):
        print(f"[1/3] SFT on {TASK} ({SFT.steps} steps)", flush=True)
        t = time.time()
        s = sft(SFT, init, sft_dir, device, resume=bool(checkpoint.checkpoints(sft_dir)))
        stage("sft", s["accuracy"], time.time() - t, model=s["final"], config=dataclasses.asdict(SFT))
    print(f"[1/3] SFT: held-out accuracy {summary['stages']['sft']['heldout_accuracy']:.1%}", flush=True)

    grpo_dir = os.path.join(out, "grpo")
    if not _done(grpo_dir):
        print(f"[2/3] GRPO on {TASK} ({GRPO_CFG.steps} steps × {GRPO_CFG.prompts_per_step} prompts × "
              f"G={GRPO_CFG.group_size})", flush=True)
        t = time.time()
        cfg = dataclasses.replace(GRPO_CFG, time_limit=grpo_seconds)
        g = grpo(cfg, os.path.join(sft_dir, "final"), grpo_dir, device,
                 resume=bool(checkpoint.checkpoints(grpo_dir)))
        stage("grpo", g["accuracy"], time.time() - t, model=g["final"], plot=g["plot"],
              pass_at_1=[g.get("start_pass@1"), g.get("pass@1")],
              rollout_tokens_per_s=g.get("rollout_tok_per_s"), gen_share=g.get("gen_share"),
              config=dataclasses.asdict(cfg))

    st = summary["stages"]
    print(f"\n[3/3] held-out accuracy on {HELDOUT} {TASK} problems (greedy):")
    for name in ("base", "sft", "grpo"):
        print(f"  {name:5s} {st[name]['heldout_accuracy']:7.1%}   ({st[name]['seconds']:.0f} s)")
    gain = st["grpo"]["heldout_accuracy"] - st["sft"]["heldout_accuracy"]
    sampled = st["grpo"].get("pass_at_1") or [None, None]
    if None not in sampled:
        print(f"  pass@1 at T = 0.6 over GRPO: {sampled[0]:.1%} -> {sampled[1]:.1%}")
    print(f"GRPO over SFT: {gain * 100:+.1f} points greedy; "
          f"rollouts {st['grpo']['rollout_tokens_per_s']:.0f} tokens/s, "
          f"{st['grpo']['gen_share']:.0%} of GRPO step time generating; curves {st['grpo']['plot']}")
    print(f"total {time.time() - start:.0f} s this run; summary {summary_path}")
    return summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="runs/demo", help="pretrained run directory or checkpoint")
    ap.add_argument("--out", default="runs/posttrain")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages")
    ap.add_argument("--grpo-seconds", type=float, default=0.0,
                    help="end GRPO after this many seconds (evaluating and exporting as at its last step); 0: none")
    a = ap.parse_args()
    main(a.base, a.out, a.device, a.fresh, a.grpo_seconds)
