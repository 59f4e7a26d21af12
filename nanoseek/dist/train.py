"""The trainer under torchrun: `torchrun --nproc-per-node N -m nanoseek train --config FILE`.

Same recipe and the same step as train/loop.py, spread over N ranks (see parallel.py for the layout):
  * data: data.batch_size is the global micro-batch; rank r trains on rows [r·b, (r+1)·b) of it (b = batch/N),
    so a step sees exactly the batch a one-process run sees at that step, and a rank's slice is a pure function
    of (seed, step, rank);
  * gradients: FSDP2 reduce-scatter (averaged) for the dense parameters, all-to-all + expert-DP all-reduce for
    the routed experts; the global norm is clipped over both;
  * aux-loss-free balancing: expert loads are summed over all ranks before the bias update, so every rank
    keeps identical biases (the gate is replicated for the forward);
  * run.precision = "fp8": the FP8 linears swap in before FSDP2 shards them, the FP8 experts into EP's slices;
  * rank 0 alone writes metrics, prints, and writes the HF export; checkpoints are DCP (every rank writes its
    shards) and resume at any world size whose ep_size divides it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
import torch.distributed as dist

from ..model import DeepSeekV3
from ..train import checkpoint
from ..train.loop import Trainer
from ..train.metrics import Metrics
from . import checkpoint as dcheckpoint
from . import parallel


class _Quiet(Metrics):
    """Metrics of a non-zero rank: nothing written, nothing printed."""

    def __init__(self, total, start):
        super().__init__(os.devnull, total, start, progress=False)

    def note(self, text: str) -> None:
        pass


class DistTrainer(Trainer):
    can_graph_step = False   # FSDP2 hooks and EP's host-side splits are not capturable
    can_overlap = False      # FSDP2 reduce-scatters gradients when its hooks run, which wait on one stream only

    def __init__(self, cfg, resume: str | None = None, log=print):
        if cfg.ema.enabled:
            raise ValueError("train config 'ema.enabled' is not supported under torchrun yet")
        self.env = parallel.init(cfg.dist.ep_size, cfg.run.device)
        if cfg.data.batch_size % self.env.world:
            raise ValueError(f"train config 'data.batch_size' must be divisible by the world size "
                             f"{self.env.world} (got {cfg.data.batch_size})")
        self.is_main = self.env.is_main
        # each rank on its own GPU; blocks stay eager (FSDP2 hooks and EP's data-dependent splits inside
        # compiled blocks are untested here)
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, device=str(self.env.device), compile=False))
        super().__init__(cfg, resume, log if self.is_main else (lambda *a, **k: None))

    # ---- the hooks of Trainer -----------------------------------------------------------------------------------
    def _load(self, ckpt: str):
        meta = checkpoint.read_meta(ckpt)
        if not dcheckpoint.is_dcp(ckpt):
            raise ValueError(f"checkpoint {ckpt} was written by a one-process run: resume it without torchrun")
        from ..config import ModelConfig
        torch.manual_seed(self.cfg.run.seed)
        model = DeepSeekV3(ModelConfig.from_json(os.path.join(ckpt, "config.json")))
        model = self._parallelize(self._with_precision(model))
        return model, meta, {"dcp": ckpt}, None

    def _parallelize(self, model):
        if getattr(model, "_nanoseek_parallel", False):
            return model
        model = parallel.parallelize(model.to(self.env.device), self.env, self.cfg.dist.overlap,
                                     self.cfg.dist.reshard_after_forward)
        # EP made new expert modules: FP8 swaps into them in place (the FSDP-sharded linears were swapped before)
        model = self._with_precision(model)
        model._nanoseek_parallel = True
        return model

    def _param_groups(self, weight_decay: float) -> list[dict]:
        return parallel.param_groups(self.model, weight_decay)

    def _load_optimizer(self, state: dict) -> None:
        dcheckpoint.load(state["dcp"], self.model, self.optimizer, self.env)
        state.setdefault("rng_cpu", torch.get_rng_state())

    def _clip_grads(self) -> torch.Tensor:
        parallel.reduce_expert_grads(self.model, self.env)
        return parallel.clip_grad_norm(self.model, self.env, self.cfg.optim.grad_clip)

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    def _mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return self._sum_over_ranks(t) / self.env.world

    def _metrics(self, total: int) -> Metrics:
        return super()._metrics(total) if self.is_main else _Quiet(total, self.step)

    def _rows(self) -> slice:
        """This rank's rows of a global batch."""
        b = self.cfg.data.batch_size // self.env.world
        return slice(self.env.rank * b, (self.env.rank + 1) * b)

    def _micro_batch(self, index: int):
        return self._on_device(self.train_data.batch(index, doc_ids=self.cfg.data.document_mask), self._rows())

    # ---- the step, evaluation, checkpoints --------------------------------------------------------------------
    # A signal may reach one rank only, at any moment: the loop reads `_stop`, which changes only after a step,
    # when the ranks agree on it (a signal on any rank stops them all, after the same step).
    @property
    def _stop(self) -> bool:
        return self.__dict__.get("_stop_agreed", False)

    @_stop.setter
    def _stop(self, value: bool) -> None:
        self.__dict__["_stop_signal"] = value

    def train_step(self) -> dict:
        rec = super().train_step()
        stop = torch.tensor(float(self.__dict__.get("_stop_signal", False)), device=self.device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        self.__dict__["_stop_agreed"] = bool(stop.item())
        return rec

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for batch in self.val_data.val_batches(self.cfg.eval.batches, doc_ids=self.cfg.data.document_mask):
            x, y, docs = self._on_device(batch, self._rows())
            with self._autocast():
                losses.append(self.model.loss(x, y, doc_ids=docs).ce.float())
        self.model.train()
        return self._mean_over_ranks(torch.stack(losses).mean()).item()

    def save(self) -> str:
        """DCP shards from every rank into one directory; rank 0 adds the metadata and renames it into place."""
        target = os.path.join(self.out_dir, "checkpoints", f"step-{self.step:08d}")
        meta = {"step": self.step, "tokens": self.tokens, "val_loss": self.val_loss,
                "data_position": self.step * self.cfg.optim.grad_accum, "ema_updates": 0,
                "world_size": self.env.world, "train_config": self.cfg.to_dict()}

        def write(tmp):   # rank 0, inside checkpoint.write_atomic
            dist.broadcast_object_list([tmp], src=0)
            dcheckpoint.save(tmp, self.model, self.optimizer, self.env)
            self.model.cfg.save(tmp)
            for f in self.tokenizer_files:
                shutil.copy2(f, tmp)
            with open(os.path.join(tmp, checkpoint.META), "w") as f:
                json.dump(meta, f, indent=2)

        if self.is_main:
            checkpoint.write_atomic(target, write)
            for _, old in checkpoint.checkpoints(self.out_dir)[:-self.cfg.checkpoint.keep]:
                checkpoint._remove(old)
        else:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            dcheckpoint.save(box[0], self.model, self.optimizer, self.env)
        dist.barrier()
        return target

    def export(self) -> dict[str, str]:
        path = os.path.join(self.out_dir, "final")
        return {"final": dcheckpoint.export_hf(self.model, self.env, path, self.tokenizer_files)}

    def fit(self, until: int | None = None) -> dict:
        try:
            return super().fit(until)
        finally:
            dist.barrier()


def run(cfg, resume: str | None = None) -> dict:
    """`nanoseek train` under torchrun; ranks other than 0 keep quiet on stdout (the CLI prints the summary)."""
    import sys
    trainer = DistTrainer(cfg, resume)
    if not trainer.is_main:
        sys.stdout = open(os.devnull, "w")
    return trainer.fit()
