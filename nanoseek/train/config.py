"""TrainConfig: every knob of a pretraining run, read from a TOML or YAML file, documented field by field.

A file has one table per section ([run], [model], [data], ...). A key that is not a field is an error naming
the nearest valid key; values are checked with messages naming the field. `nanoseek train --print-config`
writes every field with its default and its documentation (configs/reference.toml is that output).
The defaults follow DeepSeek-V3's recipe (§4.2) where it has one.
"""
import dataclasses
import difflib
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ..config import PRESETS, ModelConfig, preset
from .recompute import MODES


def knob(default, doc: str):
    """A field with its documentation attached, so the docs and `--print-config` can never disagree."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class Run:
    out_dir: str = knob("runs/default", "directory of the run: checkpoints/, metrics.jsonl, final/ (HF export)")
    steps: int = knob(1000, "optimizer steps to train")
    seed: int = knob(0, "seed of the initialization and of the data order")
    device: str = knob("auto", "'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    precision: str = knob("bf16", "'bf16': bf16 autocast on CUDA over fp32 master weights (CPU trains in fp32); "
                          "'fp32'; 'fp8': DeepSeek-V3's FP8 GEMMs (1x128 / 128x128 scales) in the attention "
                          "projections, dense MLPs and experts, bf16 autocast elsewhere; on CPU an exact emulation "
                          "(slow: for tests)")
    compile: bool = knob(True, "torch.compile each transformer block on CUDA (the first steps compile; with fp8 "
                               "the FP8 kernels are custom ops inside the compiled graph); CPU runs stay eager")
    cuda_graphs: bool = knob(True, "with compile: replay each compiled block as CUDA graphs (torch.compile's "
                                   "'reduce-overhead' mode), so the step is not bound by the host launching "
                                   "kernels (bench/train.py, `small` on an H200: 71 ms/step with them, 87 "
                                   "without); costs graph memory and a longer first step")
    step_graph: bool = knob(False, "with compile on one GPU: capture the whole optimizer step (forwards, backwards, "
                                   "clipping, AdamW) as one CUDA graph after 3 warm-up steps and replay it, the "
                                   "batch, learning rate and MTP λ fed through device buffers "
                                   "(train/step_graph.py; the blocks then compile without graphs of their own). "
                                   "bench/train.py, `small` on an H200: 61.2 ms/step against 62.5 with block graphs. "
                                   "Not with torchrun yet")
    overlap_shared_experts: bool = knob(True, "on CUDA, run each MoE layer's shared experts on a side stream, "
                                              "concurrently with its routed experts, forward and backward "
                                              "(model/moe.py MoE._overlapped; `small` on an H200: 58.2 ms/step "
                                              "against 59.3 with run.step_graph). Not with per-block CUDA graphs "
                                              "(run.cuda_graphs without run.step_graph), run.recompute or torchrun")
    recompute: str = knob("none", "activation recomputation in backward (train/recompute.py, V3 §3.2.3): 'none'; "
                                  "'cheap' keeps only GEMM and attention outputs (norms, RoPE, SwiGLU output, MoE "
                                  "permutations recomputed); 'v3' also recomputes the MLA up-projections; 'full' "
                                  "reruns each block")
    threads: int = knob(0, "CPU threads for torch; 0 keeps torch's default")


@dataclass
class Model:
    preset: str = knob("tiny", f"starting point: a preset of nanoseek.config ({', '.join(PRESETS)})")
    config: str = knob("", "or: an HF config.json (or its directory) to start from instead of the preset")
    overrides: dict = knob({}, "any other key of [model] is a ModelConfig field (HF deepseek_v3 name) that "
                               "overrides the starting point; vocab_size defaults to the tokenizer's")


@dataclass
class Data:
    dir: str = knob("runs/default/data", "a directory written by `nanoseek prepare` (token shards + tokenizer)")
    batch_size: int = knob(16, "sequences per micro-batch")
    seq_len: int = knob(256, "tokens per sequence")
    document_mask: bool = knob(False, "attend only within each document of a packed sequence (documents end at "
                                      "eos); V3 packs without masking (§4.1). The (batch, seq, seq) mask rules out "
                                      "the fused causal attention kernels on CUDA, so it costs speed")


@dataclass
class Optim:
    lr: float = knob(3e-4, "peak learning rate (V3: 2.2e-4)")
    weight_decay: float = knob(0.1, "decoupled weight decay on matrices; norms and the router bias get none (V3: 0.1)")
    beta1: float = knob(0.9, "AdamW β1 (V3: 0.9)")
    beta2: float = knob(0.95, "AdamW β2 (V3: 0.95)")
    eps: float = knob(1e-8, "AdamW ε")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this; 0 disables (V3: 1.0)")
    grad_accum: int = knob(1, "micro-batches per optimizer step")
    bf16_moments: bool = knob(False, "keep AdamW's moments in bf16 (V3); the update itself is computed in fp32")


@dataclass
class Schedule:
    kind: str = knob("cosine", "'cosine': warmup then cosine decay to min_lr_ratio·lr; 'wsd': warmup, stable "
                               "at lr, then cosine decay over the last decay_fraction of the steps (V3's shape)")
    warmup_steps: int = knob(100, "linear warmup from lr/warmup_steps to lr")
    decay_fraction: float = knob(0.2, "wsd only: fraction of run.steps spent decaying")
    min_lr_ratio: float = knob(0.1, "final lr as a fraction of lr (V3: 2.2e-5 / 2.2e-4 = 0.1)")


@dataclass
class MTP:
    lambda_start: float = knob(0.3, "MTP loss weight λ at the start (V3: 0.3); 0 trains without the MTP modules")
    lambda_end: float = knob(0.1, "λ after lambda_switch (V3: 0.1)")
    lambda_switch: float = knob(0.7, "fraction of run.steps after which lambda_end applies (V3: 10T of 14.8T tokens)")


@dataclass
class Balance:
    alpha: float = knob(1e-4, "weight α of the sequence-wise balance loss (V3: 1e-4); 0 disables it")
    gamma_start: float = knob(1e-3, "bias update speed γ of aux-loss-free balancing (V3: 0.001); 0 disables it")
    gamma_end: float = knob(0.0, "γ after gamma_switch (V3: 0)")
    gamma_switch: float = knob(0.97, "fraction of run.steps after which gamma_end applies (V3: 14.3T of 14.8T)")


@dataclass
class Eval:
    every: int = knob(100, "optimizer steps between validation passes; 0: only at the end")
    batches: int = knob(8, "validation batches (of data.batch_size × data.seq_len) per pass")


@dataclass
class Checkpoint:
    every: int = knob(500, "optimizer steps between checkpoints; 0: only at the end and on interruption")
    keep: int = knob(3, "checkpoints kept in out_dir/checkpoints; older ones are deleted")


@dataclass
class EMA:
    enabled: bool = knob(False, "keep an exponential moving average of the weights in CPU memory (V3 §3.2.3), "
                                "updated on a background thread; exported to out_dir/final-ema")
    decay: float = knob(0.999, "EMA decay per update (warmed up as min(decay, (1+n)/(10+n)))")
    every: int = knob(1, "optimizer steps between EMA updates")


@dataclass
class Logging:
    progress: bool = knob(True, "progress bar with loss, tokens/s, lr and ETA (plain lines when not a terminal)")
    print_every: int = knob(50, "steps between plain progress lines when stderr is not a terminal")


@dataclass
class Dist:
    ep_size: int = knob(0, "under torchrun: ranks per expert-parallel group, which split the routed experts between "
                           "them (must divide the world size and model.n_routed_experts); 0: all ranks. The other "
                           "parameters are sharded over all ranks by FSDP2; data.batch_size is the global "
                           "micro-batch, split evenly over the ranks")
    overlap: bool = knob(False, "split each MoE layer's tokens in two so that one half's all-to-all overlaps the "
                                "other's expert GEMMs (V3's prefill trick)")
    reshard_after_forward: bool = knob(True, "FSDP2: free each block's gathered parameters after its forward "
                                             "(less memory; gathered again for the backward)")


@dataclass
class TrainConfig:
    run: Run = field(default_factory=Run)
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    optim: Optim = field(default_factory=Optim)
    schedule: Schedule = field(default_factory=Schedule)
    mtp: MTP = field(default_factory=MTP)
    balance: Balance = field(default_factory=Balance)
    eval: Eval = field(default_factory=Eval)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    ema: EMA = field(default_factory=EMA)
    logging: Logging = field(default_factory=Logging)
    dist: Dist = field(default_factory=Dist)

    def validate(self) -> None:
        def need(ok: bool, name: str, why: str):
            if not ok:
                section, key = name.split(".")
                raise ValueError(f"train config '{name}' {why} (got {getattr(getattr(self, section), key)!r})")

        r, d, o, s, m, b = self.run, self.data, self.optim, self.schedule, self.mtp, self.balance
        need(r.steps > 0, "run.steps", "must be > 0")
        need(r.device == "auto" or r.device == "cpu" or r.device.split(":")[0] == "cuda", "run.device",
             "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        need(r.threads >= 0, "run.threads", "must be >= 0")
        need(r.precision in ("bf16", "fp32", "fp8"), "run.precision", "must be 'bf16', 'fp32' or 'fp8'")
        need(not r.step_graph or (r.compile and r.device != "cpu"), "run.step_graph",
             "needs run.compile = true and a CUDA device")
        need(r.recompute in MODES, "run.recompute",
             "must be " + ", ".join(f"'{m}'" for m in MODES[:-1]) + f" or '{MODES[-1]}'")
        need(self.model.preset in PRESETS or bool(self.model.config), "model.preset",
             f"must be one of {', '.join(PRESETS)}")
        need(bool(d.dir), "data.dir", "must name a directory written by `nanoseek prepare`")
        need(d.batch_size > 0, "data.batch_size", "must be > 0")
        need(d.seq_len > 1, "data.seq_len", "must be > 1")
        need(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "must be a positive number")
        need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        need(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
        need(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
        need(o.eps > 0, "optim.eps", "must be > 0")
        need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        need(o.grad_accum >= 1, "optim.grad_accum", "must be >= 1")
        need(s.kind in ("cosine", "wsd"), "schedule.kind", "must be 'cosine' or 'wsd'")
        need(s.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
        need(0 < s.decay_fraction <= 1, "schedule.decay_fraction", "must be in (0, 1]")
        need(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", "must be in [0, 1]")
        for name in ("mtp.lambda_start", "mtp.lambda_end", "balance.alpha", "balance.gamma_start",
                     "balance.gamma_end"):
            section, key = name.split(".")
            need(getattr(getattr(self, section), key) >= 0, name, "must be >= 0")
        need(0 <= m.lambda_switch <= 1, "mtp.lambda_switch", "must be in [0, 1]")
        need(0 <= b.gamma_switch <= 1, "balance.gamma_switch", "must be in [0, 1]")
        need(self.eval.every >= 0, "eval.every", "must be >= 0")
        need(self.eval.batches >= 1, "eval.batches", "must be >= 1")
        need(self.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
        need(self.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
        need(0 < self.ema.decay < 1, "ema.decay", "must be in (0, 1)")
        need(self.ema.every >= 1, "ema.every", "must be >= 1")
        need(self.logging.print_every >= 1, "logging.print_every", "must be >= 1")
        need(self.dist.ep_size >= 0, "dist.ep_size", "must be >= 0")

    def model_config(self, vocab_size: int, bos_token_id: int | None, eos_token_id: int | None) -> ModelConfig:
        """The ModelConfig of this run; vocab_size and the special ids come from the tokenizer unless overridden."""
        over = dict(self.model.overrides)
        over.setdefault("vocab_size", vocab_size)
        over.setdefault("bos_token_id", bos_token_id)
        over.setdefault("eos_token_id", eos_token_id)
        if over["vocab_size"] < vocab_size:
            raise ValueError(f"train config 'model.vocab_size' is {over['vocab_size']} but the tokenizer has "
                             f"{vocab_size} tokens")
        if self.model.config:
            return ModelConfig.from_dict({**ModelConfig.from_json(self.model.config).to_dict(), **over})
        return preset(self.model.preset, **over)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = {"preset": self.model.preset, "config": self.model.config, **self.model.overrides}
        return d


SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def _unknown(key: str, valid) -> ValueError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ValueError(f"unknown train config key '{key}'{hint}")


def _check_type(name: str, value, default):
    """Values must have the type of the field's default (an int is accepted where a float is expected)."""
    kind = type(default)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads `6e-4` (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) or \
         (kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ValueError(f"train config '{name}' must be {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def from_dict(d: dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig()
    for section, table in d.items():
        if section not in SECTIONS:
            raise _unknown(section, SECTIONS)
        if not isinstance(table, dict):
            raise ValueError(f"train config '{section}' must be a table of keys, got {table!r}")
        obj = getattr(cfg, section)
        fields = {f.name for f in dataclasses.fields(obj)}
        for key, value in table.items():
            name = f"{section}.{key}"
            if section == "model" and key not in ("preset", "config"):
                if key not in MODEL_FIELDS:
                    raise _unknown(name, [f"model.{k}" for k in sorted(MODEL_FIELDS | {"preset", "config"})])
                obj.overrides[key] = value
            elif key in fields and key != "overrides":
                setattr(obj, key, _check_type(name, value, getattr(obj, key)))
            else:
                raise _unknown(name, [f"{section}.{k}" for k in fields - {"overrides"}])
    cfg.validate()
    return cfg


def _parse_value(text: str):
    """A command-line value in TOML syntax (1e-3, true, "x", [1, 2]); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load(path: str | None = None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file (or start from `base`), apply `section.key=value`
    overrides, validate."""
    d: dict[str, Any] = json.loads(json.dumps(base)) if base else {}
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"train config not found: {path}")
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml
                with open(path) as f:
                    d = yaml.safe_load(f) or {}
            else:
                with open(path, "rb") as f:
                    d = tomllib.load(f)
        except Exception as e:  # tomllib / yaml syntax errors: name the file and the place
            raise ValueError(f"{path}: cannot parse ({str(e).splitlines()[0]})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(d).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        section, name = key.strip().split(".", 1)
        d.setdefault(section, {})[name] = _parse_value(value.strip())
    return from_dict(d)


def reference_toml() -> str:
    """Every section and field with its default, documented: the output of `nanoseek train --print-config`."""
    lines = ["# nanoseek train config: every field with its default and its meaning. TOML; YAML with the same",
             "# sections works too. Unknown keys are errors; any key may be left out to keep its default."]
    for section in dataclasses.fields(TrainConfig):
        lines += ["", f"[{section.name}]"]
        for f in dataclasses.fields(section.type):
            lines.append(f"# {f.metadata['doc']}")
            if f.name != "overrides":
                lines.append(f"{f.name} = {_toml_value(f.default)}")
    return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)
