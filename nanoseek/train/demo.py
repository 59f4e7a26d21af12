"""`nanoseek demo`, the README's first command: prepare the embedded corpus, pretrain a small DeepSeek-V3 on it
with the full V3 recipe (configs/demo.toml), plot the curves, and show greedy samples from the result.

Sized to finish in under ten minutes on two CPU cores; it uses a GPU when there is one. Re-running continues an
interrupted run from its last checkpoint, or just re-plots and re-samples a finished one (--fresh starts over).
"""
import os
import shutil
import time
from pathlib import Path

from .config import load

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"


def main(out: str = "runs/demo", config: str | None = None, fresh: bool = False, device: str = "auto",
         max_new_tokens: int = 48) -> dict:
    from ..data.corpus import default_prompts
    from ..data.prepare import prepare
    from . import checkpoint
    from .loop import Trainer
    from .plot import plot
    from .sample import sample

    start = time.time()
    config = config or str(DEFAULT_CONFIG)
    if not os.path.isfile(config):
        raise FileNotFoundError(f"demo config not found: {config} (run from a source checkout, or pass --config)")
    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    data_dir = os.path.join(out, "data")
    if not os.path.isdir(data_dir):
        print(f"[1/4] preparing the embedded corpus into {data_dir}", flush=True)
        info = prepare(None, data_dir)
        print("      " + ", ".join(f"{k} {v}" for k, v in info.items() if isinstance(v, (int, float, str))))
    else:
        print(f"[1/4] using the prepared corpus in {data_dir}")

    cfg = load(config)
    cfg.run.out_dir, cfg.data.dir, cfg.run.device = out, data_dir, device
    cfg.validate()
    done = checkpoint.checkpoints(out)
    resume = out if done else None
    if done and done[-1][0] >= cfg.run.steps:
        print(f"[2/4] already trained: {done[-1][1]} (--fresh starts over)")
    else:
        print(f"[2/4] training ({'resuming' if resume else 'from scratch'}; Ctrl-C saves, re-run to continue)",
              flush=True)
    summary = Trainer(cfg, resume).fit()
    if summary["interrupted"]:
        return summary

    png = plot(out)
    print(f"[3/4] loss curves: {png}")
    print(f"[4/4] greedy samples (temperature 0, {max_new_tokens} new tokens):")
    prompts = default_prompts()
    for prompt, text in zip(prompts, sample(summary["final"], prompts, device=device,
                                            max_new_tokens=max_new_tokens, temperature=0.0)):
        print(f"  {prompt!r} -> {text!r}")
    print(f"\nfinal val loss {summary['val_loss']:.3f} after {summary['step']} steps "
          f"({summary['tokens'] / 1e6:.1f}M tokens); total time {time.time() - start:.0f}s")
    print(f"HF checkpoint: {summary['final']}   (try: nanoseek generate --ckpt {summary['final']} --prompt '...')")
    return summary
