"""A PNG of a GRPO run's metrics.jsonl: reward and accuracy (training samples, held-out greedy and pass@1), response
length, KL to the reference and clip fraction, rollout speed and the share of each step spent generating."""
from __future__ import annotations

import os

from ..train.metrics import read
from ..train.plot import smooth


def plot_grpo(run_dir: str, out: str | None = None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, "metrics.jsonl")
    records = read(path)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    if not train:
        raise ValueError(f"{path} has no GRPO steps to plot")
    out = out or os.path.join(run_dir, "grpo.png")
    steps = [r["step"] for r in train]
    w = 1 - 1 / max(1.0, len(train) / 20)

    def curve(ax, key, label, color):
        values = [r[key] for r in train]
        ax.plot(steps, values, color=color, alpha=0.25, lw=0.8)
        ax.plot(steps, smooth(values, w), color=color, label=label)

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    ax = axes[0, 0]
    curve(ax, "reward", "reward (accuracy + format bonus)", "tab:blue")
    curve(ax, "accuracy", "accuracy of the rollouts", "tab:green")
    if val:
        ax.plot([r["step"] for r in val], [r["exact_match"] for r in val], "o-", color="tab:red",
                label="held-out accuracy (greedy)")
        sampled = [r for r in val if "pass@1" in r]
        if sampled:
            ax.plot([r["step"] for r in sampled], [r["pass@1"] for r in sampled], "s--", color="tab:pink",
                    label="held-out pass@1 (T = 0.6)")
    ax.set(title="reward and accuracy", xlabel="step", ylim=(0, None))
    ax.legend(fontsize=8)
    curve(axes[0, 1], "length", "tokens per response", "tab:purple")
    axes[0, 1].set(title="response length", xlabel="step")
    curve(axes[0, 2], "kl", "k3 estimate, token mean", "tab:orange")
    axes[0, 2].set(title="KL(π_θ ‖ π_ref)", xlabel="step")
    curve(axes[1, 0], "clip_frac", "tokens whose clipped term won", "tab:brown")
    axes[1, 0].set(title="clip fraction", xlabel="step")
    curve(axes[1, 1], "rollout_tok_per_s", "sampled tokens / s", "tab:cyan")
    axes[1, 1].set(title="rollout speed (inference engine)", xlabel="step")
    curve(axes[1, 2], "gen_share", "generation time / step time", "tab:gray")
    axes[1, 2].set(title="share of the step spent generating", xlabel="step", ylim=(0, 1))
    for a in axes.flat[1:]:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
