"""AdamW with fp32 master weights and, optionally, bf16 moments (V3 §3.3.2: "we adopt the BF16 data format
instead of FP32 to track the first and second moments in the AdamW optimizer, without incurring observable
performance degradation").

The update is always computed in fp32: bf16 moments are widened, updated and rounded back once per step. On
plain (unsharded) CUDA tensors the step is one pass reading p, g, m, v and writing p, m, v: torch's fused AdamW
kernel when everything is fp32, nanoseek's Triton kernel (kernels/adamw_triton.py) when parameters or moments are
bf16, where it is 1.27× torch's fused kernel on an H200 (bench/adamw.py). Elsewhere eight foreach passes, about
2.5 times the bytes (at `small`, 885M fp32 parameters, the optimizer is memory-bound: 25 GB a step fused).
Both one-pass kernels read the step count from a device tensor advanced in place, so the step can be captured
in a CUDA graph and replayed.
"""
import math

import torch
from torch import nn

from ..kernels import have_triton


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 moment_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype
        self.last_stepped: list[torch.Tensor] = []
        self._steps: dict[torch.Tensor, tuple[torch.Tensor, int]] = {}   # parameter -> (device step, host step)

    @torch.no_grad()
    def step(self):
        self.last_stepped = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            self.last_stepped += params
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            states = [self._state(p) for p in params]
            kernel = self._one_pass(params)
            if kernel == "torch":   # same update as below
                torch._fused_adamw_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                                    [s["exp_avg_sq"] for s in states], [], self._device_steps(params, states),
                                    lr=lr, beta1=b1, beta2=b2, weight_decay=wd, eps=eps, amsgrad=False,
                                    maximize=False)
                continue
            if kernel == "triton":
                from ..kernels.adamw_triton import adamw_step
                for p, s, t in zip(params, states, self._device_steps(params, states)):
                    adamw_step(p, p.grad, s["exp_avg"], s["exp_avg_sq"], t, lr, b1, b2, eps, wd)
                continue
            grads = [p.grad.float() for p in params]
            m = [s["exp_avg"].float() for s in states]      # the moments themselves when fp32, copies when bf16
            v = [s["exp_avg_sq"].float() for s in states]
            torch._foreach_lerp_(m, grads, 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
            if self.moment_dtype != torch.float32:
                for s, mi, vi in zip(states, m, v):
                    s["exp_avg"].copy_(mi)
                    s["exp_avg_sq"].copy_(vi)
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            # p -= lr · m̂ / (sqrt(v̂) + ε) with the bias corrections of each parameter's own step count
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, [math.sqrt(1 - b2 ** s["step"]) for s in states])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, [-lr / (1 - b1 ** s["step"]) for s in states])

    def replayed(self, params: list[torch.Tensor]) -> None:
        """A captured step() over `params` (its last_stepped) was replayed as a CUDA graph (train/step_graph.py):
        count the step on the host as step() does, so that state_dict() holds true step counts; the device counts
        the kernels read advanced inside the graph."""
        for p in params:
            t, host = self._steps[p]
            self.state[p]["step"] = host + 1
            self._steps[p] = (t, host + 1)

    def _one_pass(self, params: list[torch.Tensor]) -> str | None:
        """Which one-pass kernel can take these parameters: "torch" (fused, all fp32), "triton" (CUDA, bf16
        parameters or moments) or None (the foreach passes)."""
        device = params[0].device
        if not all(type(p.data) is torch.Tensor and p.device == device and p.is_contiguous() for p in params):
            return None
        if self.moment_dtype == torch.float32 and device.type in ("cuda", "cpu") and all(
                p.dtype == torch.float32 for p in params):
            return "torch"
        if device.type == "cuda" and have_triton() and all(
                p.dtype in (torch.float32, torch.bfloat16) for p in params) and self.moment_dtype in (
                torch.float32, torch.bfloat16):
            return "triton"
        return None

    def _device_steps(self, params: list[torch.Tensor], states: list[dict]) -> list[torch.Tensor]:
        """Each parameter's step count as an fp32 device scalar, advanced in place (one launch for all) while it
        follows the host count; made afresh from the host count when they part (a new parameter, a loaded
        checkpoint)."""
        steps, advance = [], []
        for p, s in zip(params, states):
            t, host = self._steps.get(p, (None, None))
            if host == s["step"] - 1:
                advance.append(t)
            else:
                t = torch.tensor(float(s["step"]), device=p.device)
            self._steps[p] = (t, s["step"])
            steps.append(t)
        if advance:
            torch._foreach_add_(advance, 1.0)
        return steps

    def _state(self, p: torch.Tensor) -> dict:
        s = self.state[p]
        if not s:
            s["step"] = 0
            s["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
            s["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
        s["step"] += 1
        return s

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # torch casts loaded moments to the parameter's dtype; put them back (bf16 -> fp32 -> bf16 is exact)
        for s in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                s[key] = s[key].to(self.moment_dtype)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and the stacked expert weights); none on norms and other vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
