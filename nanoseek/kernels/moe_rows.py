"""The MoE layer's row permutations and SwiGLU backward as custom ops: Triton kernels on CUDA
(kernels/moe_rows_triton.py), the plain-PyTorch references below everywhere else. As custom ops they are single
nodes to torch.compile, which neither traces into them nor fuses them with their neighbours (that fusion is what
made inductor's versions slow, see moe_rows_triton.py).

    permute_rows(src, index, k, combine=False)   out[j] = src[index[j] // k]          (gather_rows)
    permute_rows(src, index, k, combine=True)    out[n] = Σ_{j<k} src[index[n·k + j]]  (sum_rows)
    permute_rows(src, index, k, True, residual)  out[n] = residual[n] + Σ_{j<k} ...      (the block's residual
                                                 add in the same pass; out in the wider of the two dtypes)
    swiglu_backward(gate_up, s, dh)   gradients of h = silu(gate) · up · s for [gate; up] and s (see
                                      moe_rows_triton.py); s None means 1, its gradient is then returned unused
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import have_triton


def gather_rows_reference(src: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    return src[index // k] if k > 1 else src[index]


def sum_rows_reference(src: torch.Tensor, index: torch.Tensor, k: int,
                       residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    if residual is None:
        return src[index].view(-1, k, src.shape[1]).sum(1)
    dtype = torch.promote_types(src.dtype, residual.dtype)
    wide = torch.promote_types(dtype, torch.float32)   # the kernel's fp32 sum, rounded once
    return (src[index].view(-1, k, src.shape[1]).to(wide).sum(1) + residual.to(wide)).to(dtype)


def swiglu_backward_reference(gate_up: torch.Tensor, scale: Optional[torch.Tensor], dh: torch.Tensor):
    """The same formulas in fp32 or wider (the Triton kernel computes in fp32), cast back to gate_up's dtype."""
    dtype = torch.promote_types(gate_up.dtype, torch.float32)
    gate, up = gate_up.to(dtype).chunk(2, dim=-1)
    sig = gate.sigmoid()
    silu, dh = F.silu(gate), dh.to(dtype)
    d_scale = (dh * silu * up).sum(-1)
    if scale is not None:
        dh = dh * scale.to(dtype)[:, None]
    d_gate_up = torch.cat([dh * up * sig * (1 + gate * (1 - sig)), dh * silu], dim=-1)
    return d_gate_up.to(gate_up.dtype), d_scale


def _triton(t: torch.Tensor) -> bool:
    # the kernels sum in fp32: wider inputs (float64 checks) take the reference
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16, torch.float32) and have_triton()


@torch.library.custom_op("nanoseek::permute_rows", mutates_args=())
def permute_rows(src: torch.Tensor, index: torch.Tensor, k: int, combine: bool,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """gather_rows(src, index, k), or sum_rows when combine (plus residual, if given)."""
    if _triton(src) and (residual is None or _triton(residual)):
        from . import moe_rows_triton
        if combine:
            return moe_rows_triton.sum_rows(src, index, k, residual)
        return moe_rows_triton.gather_rows(src, index, k)
    if combine:
        return sum_rows_reference(src, index, k, residual)
    return gather_rows_reference(src, index, k)


@permute_rows.register_fake
def _(src, index, k, combine, residual=None):
    dtype = src.dtype if residual is None else torch.promote_types(src.dtype, residual.dtype)
    return src.new_empty(index.numel() // k if combine else index.numel(), src.shape[1], dtype=dtype)


@torch.library.custom_op("nanoseek::swiglu_backward", mutates_args=())
def swiglu_backward(gate_up: torch.Tensor, scale: Optional[torch.Tensor], dh: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    if _triton(gate_up):
        from . import moe_rows_triton
        return moe_rows_triton.swiglu_backward(gate_up, scale, dh)
    return swiglu_backward_reference(gate_up, scale, dh)


@swiglu_backward.register_fake
def _(gate_up, scale, dh):
    return (torch.empty_like(gate_up, memory_format=torch.contiguous_format),
            dh.new_empty(dh.shape[0], dtype=torch.promote_types(gate_up.dtype, torch.float32)))
