"""FP8 training arithmetic emulated exactly on any device: quantize (fp8/quant.py) → dequantize → fp32 matmul.

Each FP8 GEMM of the recipe is C = deq(A) · deq(B)ᵀ with both operands quantized along the GEMM's inner dim:

    Fprop  y  = x  Wᵀ     x: 1×128 tiles along in,  W: 128×128 blocks
    Dgrad  dx = dy W      dy: 1×128 tiles along out, W: the same blocks, transposed
    Wgrad  dW = dyᵀ x     dyᵀ, xᵀ: 1×128 tiles along tokens (per group: act_quant_t)

The dequantized products are exact in fp32 up to the summation, so this is the value an FP8 tensor core with
fp32 accumulation computes, up to summation order. Rows are grouped by `counts` (MoE experts, weights (G, N, K));
counts None is one plain linear layer (weight (N, K)). The GPU backend (fp8/hopper.py) has the same interface.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..kernels.moe_rows import gather_rows_reference
from .quant import act_dequant, act_quant, act_quant_t, weight_dequant, weight_quant


class Quantized(NamedTuple):
    q: torch.Tensor
    scale_inv: torch.Tensor


class EmulatedFP8:
    name = "emulated"
    traceable = False   # splits rows by counts on the host; traced, inductor's CPU codegen failed on it (2.13)

    def quant_act(self, x: torch.Tensor, counts: torch.Tensor | None, transposed: bool,
                  index: torch.Tensor | None = None, k: int = 1):
        """x (M, K) -> (1×128 along K for Fprop/Dgrad, per-group 1×128 along tokens for Wgrad or None); with
        index, of the rows x[index // k]."""
        if index is not None:
            x = gather_rows_reference(x, index, k)
        rows = Quantized(*act_quant(x))
        cols = [Quantized(*t) for t in act_quant_t(x, _split(counts))] if transposed else None
        return rows, cols

    def quant_weight(self, w: torch.Tensor):
        return [Quantized(*weight_quant(wg)) for wg in _groups(w)]

    @staticmethod
    def for_dgrad(w):
        """What backward keeps of the quantized weight: all of it (dgrad dequantizes W's blocks)."""
        return w

    def fprop(self, x: Quantized, w, counts, out_dtype: torch.dtype) -> torch.Tensor:
        """x Wᵀ per group of rows."""
        return self._per_group(x, counts, [weight_dequant(*wg).t() for wg in w], out_dtype)

    def dgrad(self, dy: Quantized, w, counts, out_dtype: torch.dtype) -> torch.Tensor:
        """dy W per group of rows."""
        return self._per_group(dy, counts, [weight_dequant(*wg) for wg in w], out_dtype)

    def wgrad(self, dy_t, x_t, counts, out_dtype: torch.dtype) -> torch.Tensor:
        """dyᵀ x per group, both operands tiled along that group's tokens."""
        dw = torch.stack([act_dequant(*d) @ act_dequant(*x).t() for d, x in zip(dy_t, x_t)]).to(out_dtype)
        return dw if counts is not None else dw[0]

    @staticmethod
    def _per_group(a: Quantized, counts, b: list[torch.Tensor], out_dtype) -> torch.Tensor:
        a = act_dequant(*a)
        parts = a.split(_split(counts) or [a.shape[0]])
        return torch.cat([p @ bg for p, bg in zip(parts, b)]).to(out_dtype)


def _split(counts: torch.Tensor | None) -> list[int] | None:
    return None if counts is None else counts.tolist()


def _groups(w: torch.Tensor):
    return [w] if w.dim() == 2 else list(w.unbind(0))
