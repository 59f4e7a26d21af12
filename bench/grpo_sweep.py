"""GRPO settings on one GPU, several runs at once: SFT length × GRPO settings from the post-training demo's
pretrained model (DESIGN.md §5). Each run is `nanoseek.post.sft.sft` then `nanoseek.post.grpo.grpo`, the demo's
configs with the given fields replaced; runs sharing an SFT length share its SFT (the first one trains it).

    python bench/grpo_sweep.py '{"s600_lr3e-5": {"sft": 600, "lr": 3e-5, "warmup_steps": 10}, ...}'

Needs runs/demo/final (`nanoseek demo`). Runs share the GPU, so their times are not one run's; held-out accuracy
(greedy, every eval_every steps) goes to each run's log and metrics.jsonl under runs/sweep/.
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


def one(name: str, sft_steps: int, grpo_fields: dict):
    from nanoseek.post.grpo import grpo
    from nanoseek.post.sft import sft
    sft_dir = f"{ROOT}/sft{sft_steps}"
    try:                                   # the first run of an SFT length trains it, the others wait for it
        os.close(os.open(sft_dir + ".lock", os.O_CREAT | os.O_EXCL))
        s = sft(dataclasses.replace(SFT, steps=sft_steps), "runs/demo/final", sft_dir, "cuda", progress=False)
        print(name, "SFT", sft_steps, "held-out", s["accuracy"], flush=True)
    except FileExistsError:
        while not os.path.exists(sft_dir + "/final/config.json"):
            time.sleep(2)
    t = time.time()
    r = grpo(dataclasses.replace(GRPO_CFG, checkpoint_every=0, **grpo_fields), sft_dir + "/final",
             f"{ROOT}/{name}", "cuda", progress=False)
    print(name, "GRPO", json.dumps({k: r.get(k) for k in ("start_accuracy", "accuracy", "rollout_tok_per_s",
                                                         "gen_share")}), f"{time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4:
        one(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]))
        sys.exit()
    runs = json.loads(sys.argv[1])
    os.makedirs(ROOT, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, __file__, name, str(spec.pop("sft")), json.dumps(spec)],
                              stdout=open(f"{ROOT}/{name}.log", "w"), stderr=subprocess.STDOUT)
             for name, spec in runs.items()]
    for p in procs:
        p.wait()
    for name in runs:
        with open(f"{ROOT}/{name}.log") as f:
            print("".join(line for line in f if any(k in line for k in ("SFT", "GRPO", "held-out"))), end="")
