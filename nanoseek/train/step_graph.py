"""The whole optimizer step as one CUDA graph (run.step_graph): the micro-batches' forwards and backwards, the
gradient clipping and AdamW are captured once and replayed every step, so the GPU runs the step's ~2,300 kernels
back to back with no launch from the host and no gap between the compiled blocks' graphs.

What changes from step to step reaches the graph through memory it reads, never through Python values baked into
it: the micro-batches are copied into static input buffers, the learning rate into a device scalar that AdamW's
kernels load (train/optim.py), MTP's λ into a device scalar the loss multiplies by. The gradients are set to None
before the capture, so backward allocates them from the graph's own memory pool and writes them afresh at each
replay. Outputs (the losses, the expert loads for the bias update, the gradient norm) are static tensors read
after each replay. The capture follows torch.cuda.graph's rules: three warm-up steps run first on a side stream
(they are real steps), autocast without its weight-cast cache. A capture records without running, so the step it
records is run by replaying it once.
"""
from __future__ import annotations

import torch

WARMUP_STEPS = 3


class StepGraph:
    def __init__(self, step_fn, optimizer, device: torch.device):
        """step_fn(batches, mtp_lambda, autocast_cache) -> outputs: one optimizer step on `batches`, a list of
        (x, y, doc_ids) micro-batches, that leaves every gradient None (the trainer's eager step)."""
        self.step_fn, self.optimizer = step_fn, optimizer
        self.lr = torch.zeros((), device=device)
        self.mtp_lambda = torch.zeros((), device=device)
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        self.inputs: list | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs = None
        self.stepped: list[torch.Tensor] = []
        self.warmups = 0

    def run(self, batches: list, lr: float, mtp_lambda: float | None):
        """One step on `batches` at learning rate lr; mtp_lambda None leaves MTP out of the loss (its schedule is
        zero throughout)."""
        if self.inputs is None:
            self.inputs = [tuple(None if t is None else t.clone() for t in batch) for batch in batches]
        for static, batch in zip(self.inputs, batches):
            for dst, src in zip(static, batch):
                if dst is not None:
                    dst.copy_(src, non_blocking=True)
        self.lr.fill_(lr)
        lam = 0.0 if mtp_lambda is None else self.mtp_lambda.fill_(mtp_lambda)
        if self.graph is not None:
            self.graph.replay()
            self.optimizer.replayed(self.stepped)
            return self.outputs
        if self.warmups < WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step_fn(self.inputs, lam, autocast_cache=False)
            torch.cuda.current_stream().wait_stream(side)
            self.warmups += 1
            return out
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the EMA's thread may be waiting on a CUDA event meanwhile (train/ema.py), legitimately
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = self.step_fn(self.inputs, lam, autocast_cache=False)
        self.stepped = list(self.optimizer.last_stepped)
        self.graph.replay()   # the capture counted this step on the host (optimizer.step() ran) without running it
        return self.outputs
