"""GRPO for a few dozen steps, with T = 1 accuracy on fixed other training problems every few steps: a cheap
check of whether a setting moves accuracy beyond the problems it trains on, before a full run (DESIGN.md §5).

    python bench/grpo_curve.py --ckpt runs/sft300 [--device cpu] [--lr 1e-5] [--steps 40] [--prompts 32]
                               [--group 8] [--new 48] [--probe-problems 64] [--probe 8] [--every 10]

Held-out greedy accuracy and pass@1 (4 samples at T = 0.6) on --eval-problems problems at the start and the end;
in between, every --every steps, the mean rollout accuracy of those steps and the T = 1 accuracy of --probe samples
on each of --probe-problems fixed training problems (the same seeds each time, bench/grpo_probe.py). Prints the
curve and one JSON line.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import env, write_json  # noqa: E402
from bench.grpo_probe import OTHER_SEED, sampled_accuracy  # noqa: E402
from nanoseek.post.grpo import GRPO, GRPOConfig  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--probe-problems", type=int, default=64)
    ap.add_argument("--probe", type=int, default=8, help="samples per probe problem")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--eval-problems", type=int, default=200)
    args = ap.parse_args()
    cfg = GRPOConfig(task=args.task, steps=args.steps, prompts_per_step=args.prompts, group_size=args.group,
                     max_new_tokens=args.new, lr=args.lr, eval_every=0, eval_problems=args.eval_problems,
                     checkpoint_every=0)
    with tempfile.TemporaryDirectory(prefix="grpo-curve-") as out:
        g = GRPO(cfg, args.ckpt, out, device=args.device, log=lambda *a: None)
        probe = g.task.problems("train", args.probe_problems, seed=OTHER_SEED)
        start, curve, acc = g.evaluate(), [(0, None, sampled_accuracy(g, probe, args.probe, args.new))], []
        print(f"step 0: held-out greedy {start['exact_match']:.3f}, pass@1 {start.get('pass@1', float('nan')):.3f}; "
              f"probe {curve[0][2]:.3f}", flush=True)
        for i in range(1, args.steps + 1):
            acc.append(g.step()["accuracy"])
            if i % args.every == 0:
                curve.append((i, sum(acc[-args.every:]) / args.every, sampled_accuracy(g, probe, args.probe, args.new)))
                print(f"step {i}: rollout accuracy {curve[-1][1]:.3f}, probe {curve[-1][2]:.3f}", flush=True)
        end = g.evaluate()
    print(f"step {args.steps}: held-out greedy {end['exact_match']:.3f}, pass@1 {end.get('pass@1', float('nan')):.3f}")
    write_json("grpo_curve.json", {"env": env(), "args": vars(args), "start": start, "end": end,
                                   "curve": [{"step": s, "rollout_accuracy": a, "probe": p} for s, a, p in curve]})


if __name__ == "__main__":
    main()
