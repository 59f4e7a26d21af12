"""Small building blocks: RMSNorm, the SwiGLU MLP, one GEMM for linears that read the same input, and a mixin that
keeps chosen buffers in fp32."""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), normalized in fp32 and cast back before the weight (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = parallel_linear(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


def parallel_linear(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """(linear(x) for linear in linears). In training, when all are plain nn.Linear, as one GEMM on their weights
    stacked by rows, [y_1 | y_2 | …] = x [W_1; W_2; …]ᵀ, split back into views: a GEMM with wider N runs closer
    to the tensor cores' rate than several narrow ones, backward takes x's gradient in one GEMM instead of
    several summed, and the stacked weight's gradient is split into views, not copied. At inference (no grad) the
    copy that stacks the weights would cost more than the launches it saves. Other layer types run as they are,
    unless their class stacks them itself (FP8Linear.stacked)."""
    kind = type(linears[0])
    if not (torch.is_grad_enabled() and len(linears) > 1 and all(type(m) is kind for m in linears)):
        return tuple(m(x) for m in linears)
    if kind is not nn.Linear:   # a layer type may stack itself (FP8Linear.stacked), or return None to run apart
        stacked = getattr(kind, "stacked", None)
        y = stacked(x, linears) if stacked is not None else None
        return y if y is not None else tuple(m(x) for m in linears)
    biases = [m.bias for m in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else m.weight.new_zeros(m.out_features) for b, m in zip(biases, linears)])
    y = F.linear(x, torch.cat([m.weight for m in linears]), bias)
    return y.split([m.out_features for m in linears], dim=-1)


class FP32Buffers(nn.Module):
    """Keeps the buffers named in `fp32_buffers` in fp32 through model.to(dtype) / .half() / .bfloat16():
    values like RoPE frequencies or the balance bias lose what matters to them in bf16."""

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        saved = {name: getattr(self, name) for name in self.fp32_buffers}
        super()._apply(fn, recurse)
        for name, t in saved.items():
            new = getattr(self, name)
            if new.dtype != torch.float32:
                setattr(self, name, t.to(new.device))
        return self
