"""What one GRPO step does to accuracy, on the step's own problems and on others (DESIGN.md §5).

    python bench/grpo_probe.py --ckpt runs/posttrain/sft/final [--device cpu] [--prompts 64] [--group 8]
                               [--probe 24] [--steps adam:1e-5,sgd:0.005,sgd:0.02]

For each optimizer setting, from the same checkpoint: sample a GRPO step's rollouts, take that one step (β = 0,
one minibatch), and measure T = 1 accuracy before and after on (a) the step's own problems and (b) as many other
training problems, --probe samples each with the same seeds before and after (common random numbers: the
difference is the step's effect, not sampling noise). Positive on (a) and not on (b) means the step learns its own
problems without generalizing; negative on both means the step overshoots (curvature). The engine's log-
probabilities of the rollouts against the trainer's (rollout_kl) are printed too. Prints a table and one JSON line.
"""
import argparse
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import env, write_json  # noqa: E402
from nanoseek.eval.gen import prompts_of  # noqa: E402
from nanoseek.post.grpo import GRPO, GRPOConfig  # noqa: E402
from nanoseek.post.rewards import score  # noqa: E402
from nanoseek.post.rollout import sample  # noqa: E402


OTHER_SEED = 987_654_321   # training problems that no GRPO step of seed 0 is likely to draw


def sampled_accuracy(g: GRPO, problems, samples: int, max_new: int) -> float:
    """T = 1 accuracy of g's current policy over `samples` samples per problem, with fixed seeds (common random
    numbers: two calls before and after a change differ by the change, not by sampling noise)."""
    groups = sample(g.engine, prompts_of(g.tok, g.task, problems), samples, max_new, seed=99)
    return sum(score(c.text, g.task, p, 0).accuracy for grp, p in zip(groups, problems)
               for c in grp) / (samples * len(problems))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="runs/posttrain/sft/final")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--probe", type=int, default=24, help="samples per problem when measuring accuracy")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--steps", default="adam:1e-5,sgd:0.005,sgd:0.02", help="optimizer:lr, comma-separated")
    args = ap.parse_args()
    results = {"env": env(), "ckpt": args.ckpt, "task": args.task, "prompts": args.prompts, "group": args.group,
               "probe": args.probe, "runs": []}
    for spec in args.steps.split(","):
        opt, lr = spec.split(":")
        out = tempfile.mkdtemp(prefix="grpo-probe-")
        try:
            cfg = GRPOConfig(task=args.task, steps=1, prompts_per_step=args.prompts, group_size=args.group,
                             max_new_tokens=args.new, lr=float(lr), beta=0.0, minibatches=1, eval_every=0,
                             eval_problems=1, checkpoint_every=0)
            g = GRPO(cfg, args.ckpt, out, device=args.device, log=lambda *a: None)
            if opt == "sgd":
                g.run.optimizer = torch.optim.SGD(g.model.parameters(), lr=float(lr))
            elif opt != "adam":
                raise ValueError(f"optimizer must be adam or sgd, got {opt!r}")
            own = g._problems(0)
            other = g.task.problems("train", args.prompts, seed=OTHER_SEED)
            before = sampled_accuracy(g, own, args.probe, args.new), sampled_accuracy(g, other, args.probe, args.new)
            rec = g.step()
            after = sampled_accuracy(g, own, args.probe, args.new), sampled_accuracy(g, other, args.probe, args.new)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        results["runs"].append({"optimizer": opt, "lr": float(lr), "own": [before[0], after[0]],
                                "other": [before[1], after[1]], "grad_norm": rec["grad_norm"],
                                "rollout_kl": rec["rollout_kl"], "rollout_max_gap": rec["rollout_max_gap"]})
    print(f"\n{args.ckpt} {args.task}: one GRPO step of {args.prompts} prompts × G={args.group}; T=1 accuracy over "
          f"{args.probe} samples per problem, same seeds before and after")
    print(f"{'step':>12s} {'own problems':>22s} {'other problems':>22s} {'rollout_kl':>11s}")
    for r in results["runs"]:
        o, t = r["own"], r["other"]
        print(f"{r['optimizer'] + ' ' + format(r['lr'], 'g'):>12s} {o[0]:7.3f} -> {o[1]:.3f} {o[1] - o[0]:+.3f}"
              f" {t[0]:7.3f} -> {t[1]:.3f} {t[1] - t[0]:+.3f} {r['rollout_kl']:11.2e}")
    write_json("grpo_probe.json", results)


if __name__ == "__main__":
    main()
