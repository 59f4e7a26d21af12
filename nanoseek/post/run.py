"""What SFT, distillation and GRPO runs share: the run directory, the policy and its optimizer, resumable
checkpoints, the metrics file. The pieces are the pretraining trainer's (train/): AdamW with fp32 master weights
and bf16 autocast on CUDA, the warmup + cosine schedule, atomic checkpoints that are HF checkpoint directories,
metrics.jsonl with a progress bar.

A run starts from `init` (any HF deepseek_v3 directory, training checkpoint or run directory) or resumes the
latest checkpoint in out_dir, whose saved config then wins over the command line: a resumed run continues the
run that was started, with the same data order (a function of the step) and the same RNG state.
The router's balance bias is left as pretraining set it (γ = 0, as at the end of V3's pretraining).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys

import torch

from ..data.tokenizer import Tokenizer
from ..io import load_hf
from ..train import checkpoint
from ..train.loop import pick_device
from ..train.metrics import Metrics, truncate_after
from ..train.optim import AdamW, param_groups
from ..train.schedule import learning_rate


class Run:
    def __init__(self, kind: str, config, init: str | None, out_dir: str, device: str = "auto",
                 resume: bool = False, log=print):
        """config: a dataclass with at least steps, lr, warmup_steps, min_lr_ratio, weight_decay, grad_clip, seed."""
        self.kind, self.out_dir, self.log = kind, out_dir, log
        self.device = pick_device(device)
        self.step = 0
        state = None
        if resume:
            ckpt = checkpoint.resolve(out_dir)
            self.model, meta, state, _ = checkpoint.load(ckpt, self.device)
            if meta.get("kind") != kind:
                raise ValueError(f"{ckpt} is a {meta.get('kind', 'pretraining')} checkpoint, not {kind}")
            config = type(config)(**meta["config"])
            self.step, init = meta["step"], meta["init"]
            self.tokenizer = Tokenizer.from_dir(ckpt)
            log(f"resumed {kind} from {ckpt} at step {self.step}")
        else:
            if init is None:
                raise ValueError("--init is required (the checkpoint to start from)")
            if checkpoint.checkpoints(out_dir):
                raise ValueError(f"{out_dir} already has checkpoints: pass --resume to continue that run, or "
                                 f"choose another --out")
            src = checkpoint.model_dir(init)
            self.model = load_hf(src, dtype=torch.float32, device=self.device)
            try:
                self.tokenizer = Tokenizer.from_dir(src)
            except FileNotFoundError:
                raise FileNotFoundError(f"no tokenizer files in {src}") from None
        self.config, self.init = config, init
        self.model.train()
        self.optimizer = AdamW(param_groups(self.model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng_cpu"])
            if self.device.type == "cuda" and len(state.get("rng_cuda", [])) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(state["rng_cuda"])
            checkpoint.discard_after(out_dir, self.step)
        else:
            torch.manual_seed(config.seed)
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        if resume:
            truncate_after(self.metrics_path, self.step)
        else:
            os.makedirs(out_dir, exist_ok=True)
            with open(self.metrics_path, "w") as f:
                f.write(json.dumps({"split": "meta", "step": 0, "kind": kind, "init": init,
                                    "config": dataclasses.asdict(config)}) + "\n")

    def autocast(self):
        """bf16 autocast on CUDA over fp32 master weights (as in pretraining); fp32 on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def lr(self) -> float:
        c = self.config
        return learning_rate(self.step, c.steps, c.lr, c.warmup_steps, "cosine", 0.0, c.min_lr_ratio)

    def optimizer_step(self, lr: float) -> float:
        """Clip, step, zero the gradients; -> the gradient norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, keep: int = 2) -> str:
        meta = {"kind": self.kind, "step": self.step, "init": self.init, "config": dataclasses.asdict(self.config)}
        state = {"optimizer": self.optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []}
        return checkpoint.save(self.out_dir, self.step, self.model, meta, state, None, self.tokenizer.files(),
                               keep=keep)

    def export(self) -> str:
        """The final policy as an HF checkpoint directory out_dir/final (with the tokenizer files)."""
        return checkpoint.export(self.model, os.path.join(self.out_dir, "final"), self.tokenizer.files())

    def metrics(self, fields: dict[str, str], progress: bool = True, print_every: int = 10) -> "RunMetrics":
        return RunMetrics(self.metrics_path, self.config.steps, self.step, fields, progress, print_every)


class RunMetrics(Metrics):
    """train/metrics.Metrics with this run's own fields in the progress bar: {record key: format}."""

    def __init__(self, path, total, start, fields: dict[str, str], progress=True, print_every=10):
        super().__init__(path, total, start, progress, print_every)
        self.fields = fields

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if record.get("split") != "train":
            return
        shown = {k: format(record[k], f) for k, f in self.fields.items() if record.get(k) is not None}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(record["step"] - self.bar.n)
        elif self.plain and (record["step"] % self.print_every == 0 or record["step"] == self.total):
            self.note(f"step {record['step']}/{self.total} " + " ".join(f"{k} {v}" for k, v in shown.items()))


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
