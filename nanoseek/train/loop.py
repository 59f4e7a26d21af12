"""The trainer: DeepSeek-V3's pretraining recipe on one device, CPU or CUDA.

One optimizer step:
    for each of grad_accum micro-batches (bf16 autocast or FP8 GEMMs on CUDA, fp32 master weights):
        L = CE + λ·L_MTP + α·Σ_layers L_bal ;  backward(L / grad_accum)
    clip the global gradient norm; AdamW with the scheduled lr
    aux-loss-free bias update from the expert loads of the step (γ)
    EMA update on a background thread; log the step (loss, lr, tokens/s, max/mean expert load per layer)
    validate / checkpoint when due
Everything a step depends on (weights, optimizer, biases, schedules via the step, data position via the step,
RNG) is in the checkpoint, so a resumed run retraces an uninterrupted one exactly (bit for bit on CPU).
Sequences are packed across documents without cross-document attention masking, as in V3 (§4.1), unless
data.document_mask asks for it.
SIGINT / SIGTERM finish the current step, save a checkpoint and return.
Under torchrun, dist/train.py's DistTrainer runs this same step over many ranks (FSDP2 + expert parallelism)
by overriding the hooks marked below.
"""
import contextlib
import json
import os
import signal
import threading
import time

import torch

from ..data.loader import TokenLoader
from ..data.tokenizer import Tokenizer
from ..fp8 import convert_to_fp8
from ..model import DeepSeekV3
from . import checkpoint
from .balance import load_ratio, update_bias
from .compile import compile_blocks, overlap_shared_experts
from .config import TrainConfig, load
from .ema import EMA
from .metrics import Metrics, truncate_after
from .optim import AdamW, param_groups
from .recompute import apply_recompute
from .schedule import learning_rate, piecewise
from .step_graph import StepGraph


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train config 'run.device' is {name!r} but CUDA is not available")
    return torch.device(name)


class Trainer:
    is_main = True   # the rank that writes metrics, checkpoints and exports (dist/train.py: rank 0 of many)
    can_graph_step = True   # run.step_graph (train/step_graph.py); dist/train.py's sharded step cannot yet
    can_overlap = True      # run.overlap_shared_experts; not under FSDP2, whose hooks expect one stream

    def __init__(self, cfg: TrainConfig, resume: str | None = None, log=print):
        self.cfg, self.log = cfg, log
        self.out_dir = cfg.run.out_dir
        self.device = pick_device(cfg.run.device)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.autocast = self.device.type == "cuda" and cfg.run.precision != "fp32"
        ckpt = checkpoint.resolve(resume) if resume else None
        d = cfg.data
        self.train_data = TokenLoader(d.dir, "train", d.batch_size, d.seq_len, seed=cfg.run.seed)
        self.val_data = TokenLoader(d.dir, "val", d.batch_size, d.seq_len, seed=cfg.run.seed)
        tokenizer = Tokenizer.from_dir(d.dir)
        self.tokenizer_files = tokenizer.files()
        model_cfg = cfg.model_config(tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)

        self.step, self.tokens, self.val_loss = 0, 0, None
        meta, state, ema_state = {}, None, None
        if ckpt:
            self.model, meta, state, ema_state = self._load(ckpt)
            _check_same_model(self.model.cfg, model_cfg, ckpt)
            self.step, self.tokens, self.val_loss = meta["step"], meta["tokens"], meta.get("val_loss")
            log(f"resumed from {ckpt} at step {self.step}")
        else:
            if checkpoint.checkpoints(self.out_dir):
                raise ValueError(f"{self.out_dir} already has checkpoints: pass --resume to continue that run, or "
                                 f"choose another run.out_dir")
            torch.manual_seed(cfg.run.seed)
            self.model = DeepSeekV3(model_cfg).to(self.device)  # initialized on CPU: same init on any device
        self.model = self._parallelize(self._with_precision(self.model))
        self.model.train()
        self.gates = self.model.moe_gates()
        self.graphed = False   # blocks compiled with CUDA graphs
        apply_recompute(self.model, cfg.run.recompute)
        if cfg.run.step_graph and (self.device.type != "cuda" or not self.can_graph_step):
            raise ValueError("train config 'run.step_graph' needs a single CUDA device"
                             + (" (not torchrun)" if not self.can_graph_step else f", got {self.device}"))
        compiled = cfg.run.compile and self.device.type == "cuda"
        block_graphs = compiled and cfg.run.cuda_graphs and not cfg.run.step_graph
        if (cfg.run.overlap_shared_experts and self.device.type == "cuda" and cfg.run.recompute == "none"
                and not block_graphs and self.can_overlap):
            overlap_shared_experts(self.model)
        if compiled:
            compile_blocks(self.model, "reduce-overhead" if block_graphs else None)
            self.graphed = block_graphs

        o = cfg.optim
        self.optimizer = AdamW(self._param_groups(o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                               eps=o.eps, moment_dtype=torch.bfloat16 if o.bf16_moments else torch.float32)
        self.ema = EMA(self.model, cfg.ema.decay) if cfg.ema.enabled else None
        if state is not None:
            self._load_optimizer(state)
            torch.set_rng_state(state["rng_cpu"])
            if self.device.type == "cuda" and len(state.get("rng_cuda", [])) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(state["rng_cuda"])
            if self.ema is not None and ema_state is not None:
                self.ema.load_state_dict(ema_state, meta.get("ema_updates", 0))
            for path in checkpoint.discard_after(self.out_dir, self.step) if self.is_main else []:
                log(f"discarded {path}: it is later than the checkpoint this run resumes from")
        self.uses_mtp = len(self.model.mtp) > 0 and max(cfg.mtp.lambda_start, cfg.mtp.lambda_end) > 0
        # after the optimizer state is loaded: the graph's learning rate is a device scalar in its param groups
        self.step_graph = (StepGraph(self._optimizer_step, self.optimizer, self.device)
                           if cfg.run.step_graph else None)
        self.metrics_path = os.path.join(self.out_dir, "metrics.jsonl")
        if ckpt and self.is_main:
            truncate_after(self.metrics_path, self.step)
        elif self.is_main:  # a fresh run starts a fresh history, headed by the names of the expert-load rows
            os.makedirs(self.out_dir, exist_ok=True)
            with open(self.metrics_path, "w") as f:
                f.write(json.dumps({"split": "meta", "step": 0, "routers": _router_names(model_cfg)}) + "\n")
        self._stop = False

    # ---- what distributed training (dist/train.py) replaces -----------------------------------------------------
    def _load(self, ckpt: str):
        return checkpoint.load(ckpt, self.device)

    def _with_precision(self, model):
        # FP8 layers swap in around the same Parameters (state_dict, optimizer and checkpoints unchanged), before
        # any parallel wrapping: FSDP2 keeps the modules it shards
        return convert_to_fp8(model) if self.cfg.run.precision == "fp8" else model

    def _parallelize(self, model):
        return model

    def _param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self.model, weight_decay)

    def _load_optimizer(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def _clip_grads(self) -> torch.Tensor:
        if not self.cfg.optim.grad_clip:   # the norm only, for the log (clipping to inf rescales every gradient by 1)
            return torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def _mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def _metrics(self, total: int) -> Metrics:
        log = self.cfg.logging
        return Metrics(self.metrics_path, total, self.step, log.progress, log.print_every)

    # ---- one step ----------------------------------------------------------------------------------------------
    def _micro_batch(self, index: int):
        return self._on_device(self.train_data.batch(index, doc_ids=self.cfg.data.document_mask))

    def _on_device(self, batch, rows: slice = slice(None)):
        """A loader batch (x, y[, doc_ids]) -> x, y and doc_ids (None without them) on the device, keeping `rows`
        of each."""
        x, y, *docs = (t[rows].to(self.device, non_blocking=True) for t in batch)
        return x, y, docs[0] if docs else None

    def train_step(self) -> dict:
        cfg, s, total = self.cfg, self.step, self.cfg.run.steps
        t0 = time.perf_counter()
        lr = learning_rate(s, total, cfg.optim.lr, cfg.schedule.warmup_steps, cfg.schedule.kind,
                           cfg.schedule.decay_fraction, cfg.schedule.min_lr_ratio)
        lam = piecewise(s, total, cfg.mtp.lambda_start, cfg.mtp.lambda_end, cfg.mtp.lambda_switch)
        gamma = piecewise(s, total, cfg.balance.gamma_start, cfg.balance.gamma_end, cfg.balance.gamma_switch)
        if self.step_graph is None:   # else the graph reads lr from its device scalar
            for group in self.optimizer.param_groups:
                group["lr"] = lr

        accum = cfg.optim.grad_accum
        batches = [self._micro_batch(s * accum + micro) for micro in range(accum)]
        if self.step_graph is not None:
            sums, load, grad_norm = self.step_graph.run(batches, lr, lam if self.uses_mtp else None)
        else:
            sums, load, grad_norm = self._optimizer_step(batches, lam)
        if load is not None:
            load = self._sum_over_ranks(load)   # every rank applies the same bias update
        if load is not None and gamma > 0:
            update_bias(self.gates, load, gamma)
        self.step += 1
        tokens = accum * cfg.data.batch_size * cfg.data.seq_len   # over all ranks
        self.tokens += tokens
        if self.ema is not None and self.step % cfg.ema.every == 0:
            self.ema.update(self.model)

        names = list(sums)
        values = self._mean_over_ranks(torch.stack([sums[n] for n in names] + [grad_norm.float()]))
        values = values.tolist()  # one device sync
        rec = {"split": "train", "step": self.step, "tokens": self.tokens,
               **{("loss" if n == "total" else n): v for n, v in zip(names, values)},
               "lr": lr, "mtp_lambda": lam, "gamma": gamma, "grad_norm": values[-1]}
        if load is not None:
            rec["load_ratio"] = [round(r, 4) for r in load_ratio(load).tolist()]
        dt = time.perf_counter() - t0
        rec["tok_per_s"] = tokens / dt
        rec["time"] = dt
        return rec

    def _optimizer_step(self, batches: list, mtp_lambda, autocast_cache: bool = True):
        """Forward and backward on each micro-batch, clip, AdamW; gradients None again at the end. -> (loss sums,
        expert loads, gradient norm) as device tensors. Run eagerly, or captured by train/step_graph.py."""
        accum, alpha = len(batches), self.cfg.balance.alpha
        sums, load = {}, None
        self._begin_graph_step()   # once per optimizer step: the micro-batches' gradients accumulate in graph memory
        for x, y, docs in batches:
            with self._autocast(autocast_cache):
                out = self.model.loss(x, y, mtp_lambda=mtp_lambda, balance_alpha=alpha, doc_ids=docs)
            (out.total / accum).backward()
            for name in ("total", "ce", "mtp", "balance"):
                value = getattr(out, name)
                if value is not None:
                    sums[name] = sums.get(name, 0) + value.detach().float() / accum
            if out.expert_load is not None:
                load = out.expert_load if load is None else load + out.expert_load
        grad_norm = self._clip_grads()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums, load, grad_norm

    def _begin_graph_step(self):
        # With CUDA graphs, torch's graph trees reuse the memory of a step's graph outputs in the next step, so a
        # step must span everything that reads them: an optimizer step's forwards and backwards, whose parameter
        # gradients are backward-graph outputs that later micro-batches accumulate into, or one evaluation
        # forward. Unmarked, a no-grad forward would start a new step at each compiled block (overwriting the
        # input of the next), and a micro-batch's forward would overwrite the gradients of the previous one.
        if self.graphed:
            torch.compiler.cudagraph_mark_step_begin()

    def _autocast(self, cache: bool = True):
        if self.autocast:   # a captured step casts the weights inside the graph (cache: torch.cuda.graph's rule)
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy on the first eval.batches validation batches."""
        self.model.eval()
        losses = []
        for batch in self.val_data.val_batches(self.cfg.eval.batches, doc_ids=self.cfg.data.document_mask):
            x, y, docs = self._on_device(batch)
            self._begin_graph_step()
            with self._autocast():
                losses.append(self.model.loss(x, y, doc_ids=docs).ce.float())
        self.model.train()
        return torch.stack(losses).mean().item()

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def save(self) -> str:
        meta = {"step": self.step, "tokens": self.tokens, "val_loss": self.val_loss,
                "data_position": self.step * self.cfg.optim.grad_accum,
                "ema_updates": self.ema.updates if self.ema else 0, "train_config": self.cfg.to_dict()}
        state = {"optimizer": self.optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []}
        ema = self.ema.state_dict() if self.ema else None
        return checkpoint.save(self.out_dir, self.step, self.model, meta, state, ema, self.tokenizer_files,
                               keep=self.cfg.checkpoint.keep)

    def export(self) -> dict[str, str]:
        """The final model (and its EMA) as HF checkpoint directories."""
        out = {"final": checkpoint.export(self.model, os.path.join(self.out_dir, "final"), self.tokenizer_files)}
        if self.ema is not None:
            with self.ema.applied(self.model):
                out["final-ema"] = checkpoint.export(self.model, os.path.join(self.out_dir, "final-ema"),
                                                     self.tokenizer_files)
        return out

    # ---- the run -----------------------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> dict:
        """Train to run.steps (or stop early after `until` steps, as if interrupted). Returns a summary."""
        cfg, total = self.cfg, self.cfg.run.steps
        n_params = sum(p.numel() for p in self.model.parameters())
        per_step = cfg.optim.grad_accum * cfg.data.batch_size * cfg.data.seq_len
        if self.step < total:
            self.log(f"training {n_params / 1e6:.2f}M parameters on {self.device}"
                     f" ({cfg.run.precision if self.device.type == 'cuda' or cfg.run.precision == 'fp8' else 'fp32'})"
                     f": {total} steps × {per_step} tokens, "
                     f"output in {self.out_dir}")
        metrics = self._metrics(total)
        saved_at = self.step
        interrupted = False
        start = time.time()
        try:
            with _stop_on_signals(self):
                if self.step == 0 and cfg.eval.every:
                    self._validate(metrics)  # where the curve starts
                while self.step < total:
                    metrics.log(self.train_step())
                    if self.step == total or (cfg.eval.every and self.step % cfg.eval.every == 0):
                        self._validate(metrics)
                    if self.step == total or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                        self.save()
                        saved_at = self.step
                    if self._stop or (until is not None and self.step >= until):
                        interrupted = self.step < total
                        break
            if interrupted and saved_at != self.step:
                self.save()
        finally:
            metrics.close()
            if self.ema is not None:
                self.ema.close()
        summary = {"step": self.step, "tokens": self.tokens, "val_loss": self.val_loss,
                   "interrupted": interrupted, "seconds": time.time() - start}
        if interrupted:
            self.log(f"stopped at step {self.step}/{total}; checkpoint saved, continue with "
                     f"`nanoseek train --resume {self.out_dir}`")
        else:
            summary.update(self.export())
        return summary

    def _validate(self, metrics: Metrics) -> None:
        self.val_loss = self.evaluate()
        rec = {"split": "val", "step": self.step, "tokens": self.tokens, "val_loss": self.val_loss}
        text = f"step {self.step}: val loss {self.val_loss:.4f}"
        if self.ema is not None:
            with self.ema.applied(self.model):
                rec["val_loss_ema"] = self.evaluate()
            text += f" (EMA {rec['val_loss_ema']:.4f})"
        metrics.log(rec)
        metrics.note(text)


def train(config: str | None, resume: str | bool | None = None, overrides: list[str] = ()) -> dict:
    """`nanoseek train`: config file (or, when resuming without one, the config saved in the checkpoint)."""
    if config is None and not isinstance(resume, str):
        raise ValueError("--config is required (or --resume RUN_DIR to continue a run with its saved config)")
    if config is None:
        base = checkpoint.read_meta(checkpoint.resolve(resume))["train_config"]
        cfg = load(None, overrides, base=base)
    else:
        cfg = load(config, overrides)
    if resume is True:
        resume = cfg.run.out_dir
    from ..dist.parallel import launched
    if launched():  # under torchrun: FSDP2 + expert parallelism
        from ..dist.train import run
        return run(cfg, resume)
    return Trainer(cfg, resume).fit()


def _router_names(cfg) -> list[str]:
    """Rows of Loss.expert_load: the MoE layers of the main model, then the MTP blocks."""
    L = cfg.num_hidden_layers
    main = [f"layer {i}" for i in range(L) if cfg.is_moe_layer(i)]
    return main + [f"MTP {k + 1}" for k in range(cfg.num_nextn_predict_layers) if cfg.is_moe_layer(L + k)]


def _check_same_model(found, wanted, ckpt: str) -> None:
    a, b = found.to_dict(), wanted.to_dict()
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "torch_dtype"]
    if diff:
        k = diff[0]
        raise ValueError(f"checkpoint {ckpt} holds a different model than the config: {k} is {a.get(k)!r} "
                         f"there, {b.get(k)!r} in the config")


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer):
    """SIGINT / SIGTERM ask the trainer to stop after the current step and save; a second SIGINT aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer._stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer._stop = True
        trainer.log(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
