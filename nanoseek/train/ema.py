"""Exponential moving average of the weights in CPU memory, updated asynchronously (V3 §3.2.3: "the EMA
parameters are stored in CPU memory and are updated asynchronously after each training step"), for an early
look at the model the learning-rate decay will produce, at no GPU memory and almost no step time.

Each update copies the weights into (pinned) CPU staging buffers, then a background thread blends them in:
    ema ← ema + (1 − d)·(w − ema),    d = min(decay, (1+n)/(10+n)) so early averages are not stuck at the init.
"""
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        pin = next(model.parameters()).is_cuda
        self.shadow = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters()}
        self._staging = {n: torch.empty_like(t, pin_memory=pin) for n, t in self.shadow.items()}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")
        self._pending: Future | None = None

    def update(self, model: nn.Module) -> None:
        self.wait()  # the staging buffers are free only once the previous blend is done
        for n, p in model.named_parameters():
            self._staging[n].copy_(p.detach(), non_blocking=True)
        copied = None
        if next(model.parameters()).is_cuda:
            copied = torch.cuda.Event()
            copied.record()
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self._pending = self._pool.submit(self._blend, copied, 1 - d)

    def _blend(self, copied, weight: float) -> None:
        if copied is not None:
            copied.synchronize()
        for n, s in self.shadow.items():
            s.lerp_(self._staging[n], weight)

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.wait()
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.wait()
        for n, s in self.shadow.items():
            s.copy_(state[n])
        self.updates = updates

    @contextmanager
    def applied(self, model: nn.Module):
        """Temporarily put the averaged weights into `model` (for evaluation or export); restored exactly."""
        self.wait()
        params = dict(model.named_parameters())
        backup = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()
