"""torch.compile for training, per module the way the trainer runs it (run.compile; DESIGN.md §5): each
transformer block (the MTP modules' too) and the final RMSNorm compile on their own, in place, so state_dict keys
stay those of the plain model. The final norm is small but, left eager, its fp32 upcast, mean, rsqrt and products
are six passes over the (tokens × hidden) activations forward and more backward; compiled, one fused kernel each
way (an H200 step of `small`: 63.0 → 62.0 ms, bench/profile_train.py). The embedding and the chunked
cross-entropy (kernels/cross_entropy.py, its own kernels) stay eager, and so do the MTP modules' norms and
projection around their blocks (whole MTP modules compile on CPU, but have not been run so on the GPU).
"""
from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, mode: str | None = None) -> None:
    """mode: torch.compile's ("reduce-overhead" replays each compiled module as CUDA graphs) or None."""
    for module in [*model.layers, *(m.block for m in model.mtp), model.norm]:
        module.compile(mode=mode)
