"""GRPO settings on one GPU, several runs at once: SFT length × GRPO settings from the post-training demo's
pretrained model (DESIGN.md §5). Each run is `nanoseek.post.sft.sft` then `nanoseek.post.grpo.grpo`, the demo's
configs with the given fields replaced; runs sharing an SFT length share its SFT (the first one trains it).

    python bench/grpo_sweep.py [--seconds S] '{"s600_lr3e-5": {"sft": 600, "lr": 3e-5, "warmup_steps": 10}, ...}'

A run's "sft" is an SFT length from runs/demo/final (`nanoseek demo`), or its "init" names a checkpoint to start
GRPO from directly. Runs share the GPU, so their times are not one run's; held-out accuracy (greedy, every
eval_every steps) goes to each run's log and metrics.jsonl under runs/sweep/. With --seconds the runs are stopped
after S seconds (a run's own "time_limit" instead ends it like its last step, with a final evaluation); either way
each run's held-out accuracies and its mean train reward per eval interval are printed from its metrics.jsonl.
"""
import dataclasses
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanoseek.post.demo import GRPO_CFG, SFT  # noqa: E402

ROOT = "runs/sweep"


def one(name: str, spec: dict):
    from nanoseek.post.grpo import grpo
    from nanoseek.post.sft import sft
    init = spec.pop("init", None)
    if init is None:
        sft_steps = spec.pop("sft")
        sft_dir = f"{ROOT}/sft{sft_steps}"
        init = sft_dir + "/final"
        try:                                   # the first run of an SFT length trains it, the others wait for it
            os.close(os.open(sft_dir + ".lock", os.O_CREAT | os.O_EXCL))
            s = sft(dataclasses.replace(SFT, steps=sft_steps), "runs/demo/final", sft_dir, "cuda", progress=False)
            print(name, "SFT", sft_steps, "held-out", s["accuracy"], flush=True)
        except FileExistsError:
            while not os.path.exists(init + "/config.json"):
                time.sleep(2)
    t = time.time()
    r = grpo(dataclasses.replace(GRPO_CFG, checkpoint_every=0, **spec), init, f"{ROOT}/{name}", "cuda",
             progress=False)
    print(name, "GRPO", json.dumps({k: r.get(k) for k in ("start_accuracy", "accuracy", "rollout_tok_per_s",
                                                         "gen_share")}), f"{time.time() - t:.0f} s", flush=True)


def report(name: str) -> str:
    """Held-out accuracy (greedy; pass@1 when sampled) at each evaluation and the mean train reward / accuracy
    since the previous one."""
    path = f"{ROOT}/{name}/metrics.jsonl"
    if not os.path.exists(path):
        return f"{name}: no metrics"
    rows = [json.loads(line) for line in open(path) if line.strip()]
    out, train = [], []
    for r in rows:
        if r.get("split") == "train":
            train.append(r)
        elif r.get("split") == "val":
            part = f"step {r['step']}: held-out {r['exact_match']:.3f}" + (
                f", pass@1 {r['pass@1']:.3f}" if "pass@1" in r else "")
            if train:
                part += (f" (train reward {sum(t['reward'] for t in train) / len(train):.3f}, accuracy "
                         f"{sum(t['accuracy'] for t in train) / len(train):.3f}, {train[-1]['time']:.2f} s/step)")
            out.append(part)
            train = []
    if train:
        out.append(f"step {train[-1]['step']}: (train accuracy {sum(t['accuracy'] for t in train) / len(train):.3f})")
    return f"{name}: " + "; ".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and not sys.argv[1].startswith("--"):
        one(sys.argv[1], json.loads(sys.argv[2]))
        sys.exit()
    seconds = None
    if sys.argv[1] == "--seconds":
        seconds = float(sys.argv[2])
        del sys.argv[1:3]
    runs = json.loads(sys.argv[1])
    os.makedirs(ROOT, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, __file__, name, json.dumps(spec)],
                              stdout=open(f"{ROOT}/{name}.log", "w"), stderr=subprocess.STDOUT)
             for name, spec in runs.items()]
    start = time.time()
    for p in procs:
        try:
            p.wait(timeout=None if seconds is None else max(1.0, seconds - (time.time() - start)))
        except subprocess.TimeoutExpired:
            p.terminate()
            p.wait()
    for name in runs:
        with open(f"{ROOT}/{name}.log") as f:
            print("".join(line for line in f if any(k in line for k in ("SFT", "GRPO", "Error"))), end="")
        print(report(name))
