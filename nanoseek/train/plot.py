"""`nanoseek plot`: a PNG of a run's metrics.jsonl: train/val loss, MTP loss, and expert load balance."""
import os

from .metrics import read


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential smoothing with bias correction, so the first points are not pulled toward zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def plot(run: str, out: str | None = None) -> str:
    """run: a run directory or a metrics.jsonl file. Writes <run>/loss.png unless `out` is given."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    path = run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file at {path}")
    records = read(path)
    names = next((r["routers"] for r in records if r.get("split") == "meta"), [])
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    if not train:
        raise ValueError(f"{path} has no training steps to plot")
    out = out or os.path.join(os.path.dirname(os.path.abspath(path)), "loss.png")
    w = 1 - 1 / max(1.0, len(train) / 100)  # smooth over ~1% of the run
    steps = [r["step"] for r in train]

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    fig, (ax_loss, ax_mtp, ax_load) = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_loss.plot(steps, [r["ce"] for r in train], color="tab:blue", alpha=0.25, lw=0.8)
    ax_loss.plot(steps, smooth([r["ce"] for r in train], w), color="tab:blue", label="train (next token)")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:red", label="val")
        if "val_loss_ema" in val[0]:
            ax_loss.plot([r["step"] for r in val], [r["val_loss_ema"] for r in val], "s--", color="tab:purple",
                         label="val (EMA weights)")
    ax_loss.set(title="cross-entropy loss", xlabel="step", ylabel="nats / token", yscale="log")
    ax_loss.legend()

    mtp = [(r["step"], r["mtp"]) for r in train if "mtp" in r]
    if mtp:
        ax_mtp.plot(*zip(*mtp), color="tab:green", alpha=0.25, lw=0.8)
        ax_mtp.plot([s for s, _ in mtp], smooth([v for _, v in mtp], w), color="tab:green", label="MTP depth-1")
        ax_mtp.plot(steps, smooth([r["ce"] for r in train], w), color="tab:blue", ls=":", label="main (next token)")
        ax_mtp.legend()
    ax_mtp.set(title="multi-token prediction loss", xlabel="step", ylabel="nats / token", yscale="log")

    loads = [(r["step"], r["load_ratio"]) for r in train if r.get("load_ratio")]
    if loads:
        for layer in range(len(loads[0][1])):
            ax_load.plot([s for s, _ in loads], smooth([lr[layer] for _, lr in loads], w), lw=1,
                         label=names[layer] if layer < len(names) else f"router {layer}")
        ax_load.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax_load.legend(fontsize=7)
    ax_load.set(title="expert load balance (max / mean load)", xlabel="step", ylabel="ratio (1 = balanced)")
    for ax in (ax_loss, ax_mtp):  # plain numbers on the log axes, not powers of ten
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
