"""FP8 linear layers (V3 §3.3): Fprop, Dgrad and Wgrad as FP8 GEMMs with FP32 accumulation.

    Fprop  y  = x Wᵀ      Q(x) 1×128 along in,       Q(W) 128×128
    Dgrad  dx = dy W      Q(dy) 1×128 along out,     Q(W) 128×128, transposed (from the same quantization)
    Wgrad  dW = dyᵀ x     Q(dyᵀ), Q(xᵀ) 1×128 along tokens

x is kept for Wgrad only in FP8: forward quantizes it both ways in one pass (1×128 for Fprop, 128×1 token tiles
for Wgrad) and keeps the token-tiled copy, not x. V3 instead caches the 1×128 copy and re-tiles it in backward,
with power-of-2 scales so that the re-tiling adds no error; quantizing x twice from high precision gives each
GEMM operand exactly one rounding with any scales, for the same 1 byte per element of saved activation.
The master weight stays fp32 (or whatever the parameter is) and its gradient comes back in that dtype.

`backend_for` is the one place that chooses the arithmetic: real FP8 (fp8/hopper.py) for CUDA tensors, the exact
emulation (fp8/emulate.py) on CPU or when asked to. Under torch.compile the real backend's quantizations and GEMMs
are custom ops traced into the block's graph; the emulation runs outside it.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..kernels import moe_rows
from .emulate import EmulatedFP8


class FP8Matmul(torch.autograd.Function):
    """y = x Wᵀ with rows of x grouped by counts (weight (G, N, K)), or plain (counts None, weight (N, K)).

    The MoE's row permutations can be folded in (order, inverse, k as in model/moe.py's gather_rows): `dispatch`
    takes x in token order and multiplies the rows x[order[j] // k], gathered by the quantization kernel as it
    reads them, so no bf16 copy of the tokens in expert order is written and read back; `combine` sums each
    token's k output rows (and the residual, if given, in the same pass: model/moe.py's combine_rows), and its
    backward gathers dy's rows the same way."""

    @staticmethod
    def forward(ctx, x, weight, counts, backend, out_dtype, grad_enabled=True, permute=None, order=None,
                inverse=None, k=1, residual=None):
        # needs_input_grad ignores no_grad mode: grad_enabled (the caller's mode) saves the backward's copies
        need_dx, need_dw = ctx.needs_input_grad[:2] if grad_enabled else (False, False)
        with torch.autocast(x.device.type, enabled=False):   # the GEMMs' dtypes are the recipe's, not autocast's
            x_rows, x_t = backend.quant_act(x, counts, need_dw, *((order, k) if permute == "dispatch" else ()))
            w = backend.quant_weight(weight)
            y = backend.fprop(x_rows, w, counts, out_dtype)
            if permute == "combine":
                y = moe_rows.permute_rows(y, inverse, k, True, residual)
        ctx.permute, ctx.k, ctx.out_dtype, ctx.has_residual = permute, k, out_dtype, residual is not None
        # the FP8 operands made here are saved, not x and W: through save_for_backward (what torch.compile
        # traces), the tensors of the backend's structures flattened and the rest kept on ctx
        leaves, ctx.spec = tree_flatten((counts, backend.for_dgrad(w) if need_dx else None, x_t,
                                         (order, inverse) if permute else None))
        ctx.is_tensor = [isinstance(v, torch.Tensor) for v in leaves]
        ctx.others = [v for v in leaves if not isinstance(v, torch.Tensor)]
        ctx.save_for_backward(*[v for v in leaves if isinstance(v, torch.Tensor)])
        ctx.backend, ctx.x_dtype, ctx.w_dtype = backend, x.dtype, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        need_dx, need_dw = ctx.needs_input_grad[:2]
        tensors, others = iter(ctx.saved_tensors), iter(ctx.others)
        counts, w, x_t, perm = tree_unflatten([next(tensors) if t else next(others) for t in ctx.is_tensor],
                                              ctx.spec)
        backend = ctx.backend
        d_residual = dy if ctx.has_residual and ctx.needs_input_grad[10] else None
        # the GEMMs' output dtype, as without a residual (an fp32 residual widens the combined output and dy)
        dy_rows, dy_t = backend.quant_act(dy.to(ctx.out_dtype), counts, need_dw,
                                          *((perm[0], ctx.k) if ctx.permute == "combine" else ()))
        dx = backend.dgrad(dy_rows, w, counts, ctx.x_dtype) if need_dx else None
        if dx is not None and ctx.permute == "dispatch":
            dx = moe_rows.permute_rows(dx, perm[1], ctx.k, True)
        dw = backend.wgrad(dy_t, x_t, counts, ctx.w_dtype) if need_dw else None
        return dx, dw, None, None, None, None, None, None, None, None, d_residual


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor | None = None,
               emulate: bool | None = None, dispatch: tuple | None = None, combine: tuple | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) · Wᵀ in FP8 -> (..., N), in autocast's dtype when autocast is on (as F.linear), else x's.
    counts: (G,) rows of x per group for a stacked weight (G, N, K).
    dispatch = (order, inverse, k): x (T, K) is in token order and the rows multiplied are x[order[j] // k]
    (= gather_rows(x, order, inverse, k)); combine = (order, inverse, k): the output (T·k, N) is summed per token
    (= combine_rows(y, inverse, order, k)), plus residual (T, N) if given. See FP8Matmul.

    The GPU kernels are custom ops that torch.compile traces into the caller's graph; the emulation runs eagerly
    (a graph break), as it splits rows by counts on the host."""
    if dispatch is not None and combine is not None:
        raise ValueError("fp8_matmul: pass dispatch or combine, not both")
    backend = backend_for(x.device, emulate)
    permute = "dispatch" if dispatch is not None else "combine" if combine is not None else None
    order, inverse, k = dispatch or combine or (None, None, 1)
    return (_matmul if backend.traceable else _eager_matmul)(x, weight, counts, backend, permute, order, inverse, k,
                                                             residual)


def _matmul(x, weight, counts, backend, permute, order, inverse, k, residual):
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    y = FP8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, counts, backend, out_dtype, torch.is_grad_enabled(),
                        permute, order, inverse, k, residual)
    return y if permute else y.view(*x.shape[:-1], y.shape[-1])


_eager_matmul = torch.compiler.disable(_matmul)


class FP8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8. Same parameters, so the same state_dict, optimizer and checkpoints.
    emulate: None = real FP8 on CUDA, emulation elsewhere; True = always emulate; False = never (a CPU tensor then
    runs the GPU code only through Triton's interpreter, TRITON_INTERPRET=1)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 emulate: bool | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.emulate = emulate

    @classmethod
    def from_linear(cls, linear: nn.Linear, emulate: bool | None = None) -> "FP8Linear":
        """Wraps linear's own Parameter objects (no copy: an optimizer already holding them keeps working)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", emulate=emulate)
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_matmul(x, self.weight, None, self.emulate)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @staticmethod
    def stacked(x: torch.Tensor, linears: tuple["FP8Linear", ...]) -> tuple[torch.Tensor, ...] | None:
        """(m(x) for m in linears) as one FP8 layer on their weights stacked by rows (model/layers.parallel_linear:
        W_DQ with W_DKV, gate with up), when that quantizes exactly as they would apart: every weight but the last
        has a multiple of 128 rows, so no 128×128 block of W and no 1×128 tile of the output's gradient spans two
        layers. x is then quantized once instead of once per layer, and the narrow W_DKV (576 rows in V3) rides
        in a wider GEMM. Dgrad sums the layers' contributions inside its fp32 accumulator rather than adding
        their outputs. None (run them apart) otherwise."""
        first = linears[0]
        if (any(m.bias is not None or m.emulate != first.emulate for m in linears)
                or any(m.out_features % 128 for m in linears[:-1])):
            return None
        y = fp8_matmul(x, torch.cat([m.weight for m in linears]), None, first.emulate)
        return y.split([m.out_features for m in linears], dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, emulate={self.emulate}"


_EMULATED = EmulatedFP8()


def backend_for(device: torch.device, emulate: bool | None):
    if emulate or (emulate is None and device.type != "cuda"):
        return _EMULATED
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _BACKENDS:   # a plain dict, not functools.cache: torch.compile traces this function
            _BACKENDS[index] = _cuda_backend(index)
        return _BACKENDS[index]
    if os.environ.get("TRITON_INTERPRET") == "1":   # the GPU code on CPU tensors, through Triton's interpreter
        if "interpreter" not in _BACKENDS:
            _BACKENDS["interpreter"] = HopperFP8()
        return _BACKENDS["interpreter"]
    raise ValueError(f"real FP8 GEMMs need a CUDA device, got {device}; use emulate=True (or None)")


_BACKENDS: dict = {}


def _cuda_backend(index: int):
    if torch.cuda.get_device_capability(index) < (8, 9):
        warnings.warn(f"{torch.cuda.get_device_name(index)} has no FP8 tensor cores: FP8 training is emulated")
        return _EMULATED
    if HopperFP8 is None:
        warnings.warn(f"FP8 kernels unavailable ({_NO_KERNELS}): FP8 training is emulated")
        return _EMULATED
    return HopperFP8()


try:
    from .hopper import HopperFP8   # imports Triton, present only on CUDA installs
except ImportError as e:
    HopperFP8, _NO_KERNELS = None, e
