"""AdamW with fp32 master weights and, optionally, bf16 moments (V3 §3.3.2: "we adopt the BF16 data format
instead of FP32 to track the first and second moments in the AdamW optimizer, without incurring observable
performance degradation").

The update is always computed in fp32: bf16 moments are widened, updated and rounded back once per step. With
fp32 moments on plain (unsharded) tensors the step is torch's fused AdamW kernel: one pass reading p, g, m, v and
writing p, m, v, against about 2.5 times those bytes for the eight foreach passes (at `small`, 885M fp32
parameters, the optimizer is memory-bound: 25 GB a step fused).
"""
import math

import torch
from torch import nn


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 moment_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            states = [self._state(p) for p in params]
            if self._fusable(params):
                # same update as below; the kernel takes each parameter's step count as a tensor
                steps = {n: torch.tensor(float(n), device=params[0].device) for n in {s["step"] for s in states}}
                torch._fused_adamw_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                                    [s["exp_avg_sq"] for s in states], [], [steps[s["step"]] for s in states],
                                    lr=lr, beta1=b1, beta2=b2, weight_decay=wd, eps=eps, amsgrad=False,
                                    maximize=False)
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

    def _fusable(self, params: list[torch.Tensor]) -> bool:
        device = params[0].device
        return self.moment_dtype == torch.float32 and device.type in ("cuda", "cpu") and all(
            type(p.data) is torch.Tensor and p.device == device and p.dtype == torch.float32 for p in params)

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
