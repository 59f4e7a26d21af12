"""Metrics: one JSON object per line in <out_dir>/metrics.jsonl, and a progress bar with loss, tokens/s, lr and
ETA (tqdm on a terminal, a plain line every `print_every` steps otherwise, e.g. in CI logs).

Records: {"split": "train", "step", "tokens", "loss", "ce", "mtp", "balance", "lr", "mtp_lambda", "gamma",
"grad_norm", "load_ratio": [max/mean per MoE layer], "tok_per_s", "time"} every step, and
{"split": "val", "step", "tokens", "val_loss"[, "val_loss_ema"]} at each validation.
"""
import json
import os
import sys
import time

from tqdm import tqdm


def read(path: str) -> list[dict]:
    """Records of a metrics file; a torn last line (crash mid-write) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_after(path: str, step: int) -> None:
    """Keep records up to `step`: a resumed run rewrites the history after its checkpoint."""
    if os.path.exists(path):
        kept = [r for r in read(path) if r.get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)


class Metrics:
    def __init__(self, path: str, total_steps: int, start_step: int, progress: bool = True, print_every: int = 50):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "a")
        self.total, self.print_every, self.start_time = total_steps, print_every, time.time()
        self.start_step = start_step
        self.bar = None
        self.plain = progress and not sys.stderr.isatty()
        if progress and not self.plain:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.1)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if record.get("split") != "train":
            return
        ratio = max(record["load_ratio"]) if record.get("load_ratio") else None
        fields = {"loss": f"{record['ce']:.3f}", "tok/s": f"{record['tok_per_s']:.0f}", "lr": f"{record['lr']:.2e}"}
        if ratio is not None:
            fields["load"] = f"{ratio:.2f}"
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(record["step"] - self.bar.n)
        elif self.plain and (record["step"] % self.print_every == 0 or record["step"] == self.total):
            done = record["step"] - self.start_step
            eta = (time.time() - self.start_time) / max(done, 1) * (self.total - record["step"])
            self.note(f"step {record['step']}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items())
                      + f" eta {_clock(eta)}")

    def note(self, text: str) -> None:
        """A line of text that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"
