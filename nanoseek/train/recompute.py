"""Recomputation in backward (DeepSeek-V3 §3.2.3), applied to a model's blocks from the training side.

V3 keeps activation memory down by not storing what is cheap to compute again: "We recompute all RMSNorm
operations and MLA up-projections during back-propagation", and caches the SwiGLU input instead of its output.
Here every block's forward runs under torch's selective activation checkpointing, and a policy decides per op
whether its output is kept for backward or recomputed from the block's input there:

  "none"   keep everything autograd saves (the fastest; under torch.compile the partitioner already recomputes
           some element-wise ops inside a block)
  "cheap"  keep the outputs of GEMMs (dense, grouped, cuBLAS FP8) and attention; recompute the rest: RMSNorm, RoPE,
           SwiGLU's output from its cached input, casts, the MoE permutations, the gate
  "v3"     "cheap", and the MLA up-projections q = c_q W_UQ and [k_nope; v] = c_kv W_UKV are recomputed from the
           latents too (their per-head outputs are the widest activations of an MLA block)
  "full"   keep only the block's input and run the whole block forward again in backward

Gradients are those of "none" (tests/test_recompute.py), and each mode saves less than the one before it.
FP8 layers (run.precision = "fp8") keep their FP8 operands for backward themselves (fp8/linear.py), outside
this mechanism: there recomputation frees only the higher-precision activations around them.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..model.moe import RouterStats

MODES = ("none", "cheap", "v3", "full")

# ops whose outputs are worth keeping: the GEMMs and the attention core
_GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
          torch.ops.aten.baddbmm.default}
for _name in ("_grouped_mm", "_scaled_mm", "_scaled_grouped_mm", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_flash_attention_for_cpu"):
    if hasattr(torch.ops.aten, _name):
        _GEMMS.add(getattr(torch.ops.aten, _name).default)
_LINEAR = {torch.ops.aten.mm.default: 1, torch.ops.aten.addmm.default: 2}   # where nn.Linear's weight.t() goes


def _policy(up_projections: set[tuple[int, int]]):
    """Keep GEMM and attention outputs, recompute the rest, and recompute the GEMMs whose (K, N) weight shape is an
    MLA up-projection's. The policy sees ATen ops and their arguments only, both in eager and while torch.compile
    traces, so a GEMM is known by its shape; another GEMM of a block with that same shape would be recomputed too
    (slower, never wrong)."""
    def policy(ctx, op, *args, **kwargs):
        if op in _GEMMS and not (op in _LINEAR and tuple(args[_LINEAR[op]].shape) in up_projections):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def _checkpointed(forward, policy):
    # "full" passes no context_fn: torch.compile (2.13) rejects checkpoint's own noop_context_fn passed explicitly
    selective = {} if policy is None else {"context_fn": functools.partial(create_selective_checkpoint_contexts,
                                                                           policy)}

    def tensors(*args, **kwargs):
        # the checkpointed region returns tensors only: under torch.compile (2.11) a dataclass coming out of it
        # leaves its fields outside the traced region ("does not belong to this Graph")
        x, stats = forward(*args, **kwargs)
        return (x,) if stats is None else (x, stats.load, stats.balance_loss)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():       # evaluation and inference: nothing is saved anyway
            return forward(*args, **kwargs)
        x, *stats = checkpoint(tensors, *args, use_reentrant=False, **selective, **kwargs)
        return x, (RouterStats(*stats) if stats else None)
    return run


def apply_recompute(model: torch.nn.Module, mode: str) -> None:
    """Make each of model.layers (and the MTP modules' blocks) recompute per `mode`, in place: parameters and
    state_dict keys are unchanged. Call before compiling the blocks."""
    if mode not in MODES:
        raise ValueError(f"recompute mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return
    blocks = list(model.layers) + [m.block for m in getattr(model, "mtp", [])]
    for block in blocks:
        up = set()
        if mode == "v3":   # W_UQ and W_UKV as the GEMMs see them: weight.t(), (in_features, out_features)
            attn = block.self_attn
            up = {(p.in_features, p.out_features) for p in (getattr(attn, "q_b_proj", None), attn.kv_b_proj) if p}
        block.forward = _checkpointed(block.forward, None if mode == "full" else _policy(up))
