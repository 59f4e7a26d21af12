"""torch.compile for training, per module the way the trainer runs it (run.compile; DESIGN.md §5): each
transformer block (the MTP modules' too) and the final RMSNorm compile on their own, in place, so state_dict keys
stay those of the plain model. The final norm is small but, left eager, its fp32 upcast, mean, rsqrt and products
are six passes over the (tokens × hidden) activations forward and more backward; compiled, one fused kernel each
way (an H200 step of `small`: 63.0 → 62.0 ms, bench/profile_train.py). The embedding and the chunked
cross-entropy (kernels/cross_entropy.py, its own kernels) stay eager, and so do the MTP modules' norms and
projection around their blocks (whole MTP modules compile on CPU, but have not been run so on the GPU).
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.moe import MoE


def compile_blocks(model: nn.Module, mode: str | None = None) -> None:
    """mode: torch.compile's ("reduce-overhead" replays each compiled module as CUDA graphs) or None."""
    for module in [*model.layers, *(m.block for m in model.mtp), model.norm]:
        module.compile(mode=mode)
    for moe in _overlapping(model):
        _compile_halves(moe)


def overlap_shared_experts(model: nn.Module) -> None:
    """Every MoE layer runs its shared experts on a side stream, concurrently with the routed experts
    (MoE._overlapped; run.overlap_shared_experts). Call before compile_blocks."""
    for moe in model.modules():
        if isinstance(moe, MoE) and moe.shared_experts is not None:
            moe.overlap_shared = True


def _overlapping(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE) and m.overlap_shared]


def _compile_halves(moe: MoE) -> None:
    """The compiled block breaks its graph at MoE._overlapped, which Dynamo leaves to run eagerly: the routed path
    (gate, sort, gathers, grouped GEMMs, router statistics) and the shared experts compile as regions of their own.
    The gate's and the experts' gradients of the layer input still sum inside the routed region's backward.
    Never as CUDA graphs of torch's graph trees, which assume their graphs run one after another on one stream
    (compiled so, the halves stopped the first step with a device-side assert on an H200); the block's regions
    before and after the break keep the blocks' mode. The trainer overlaps only without per-block graphs."""
    moe.routed = torch.compile(moe.routed)
    moe.shared_experts.compile()
