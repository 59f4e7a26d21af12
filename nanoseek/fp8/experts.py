"""Routed experts with FP8 grouped GEMMs: the two grouped GEMMs of `Experts.forward_sorted` (gate_up, down) run
through `fp8_matmul` with rows grouped by expert, so Fprop, Dgrad and Wgrad of every expert are FP8 GEMMs
(Gluon / Triton grouped kernels on CUDA, kernels/fp8_gemm*.py; exact emulation elsewhere). Routing is Experts'
own; the dispatch and combine permutations are folded into the two GEMMs (`forward_permuted`).

`to_fp8_experts` converts any Experts module in place, a subclass too: expert parallelism's EPExperts keeps its
all-to-all forward and runs its local experts' GEMMs in FP8.
"""
from __future__ import annotations

import functools

import torch

from ..model.moe import Experts, swiglu
from .linear import fp8_matmul


class FP8Experts(Experts):
    def __init__(self, n_experts: int, dim: int, inter_dim: int, expert_offset: int = 0,
                 emulate: bool | None = None):
        super().__init__(n_experts, dim, inter_dim, expert_offset)
        self.emulate = emulate

    def forward_sorted(self, x: torch.Tensor, counts: torch.Tensor, scale: torch.Tensor | None = None):
        """x (M, H) grouped by local expert (counts[e] rows for expert e, in order) -> (M, H), as Experts'."""
        h = swiglu(fp8_matmul(x, self.gate_up_proj, counts, self.emulate), scale)
        return fp8_matmul(h, self.down_proj, counts, self.emulate)

    def forward_permuted(self, x: torch.Tensor, perm: tuple, counts: torch.Tensor, g_sorted: torch.Tensor,
                         residual: torch.Tensor | None = None):
        """Experts.forward_permuted with the dispatch gather done by gate_up's quantization and the combine inside
        the down projection, whose backward gathers dy as it quantizes it (fp8/linear.py): the same numbers,
        two bf16 copies of the (N·K, H) rows fewer each way; the residual joins the combine."""
        h = swiglu(fp8_matmul(x, self.gate_up_proj, counts, self.emulate, dispatch=perm), g_sorted)
        return fp8_matmul(h, self.down_proj, counts, self.emulate, combine=perm, residual=residual)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, emulate={self.emulate}"


@functools.cache
def _fp8_class(cls: type) -> type:
    return FP8Experts if cls is Experts else type(f"FP8{cls.__name__}", (FP8Experts, cls), {})


def to_fp8_experts(experts: Experts, emulate: bool | None = None) -> FP8Experts:
    """The same module (parameters, buffers, hooks, its own forward), its grouped GEMMs in FP8 from now on."""
    experts.__class__ = _fp8_class(type(experts))
    experts.emulate = emulate
    return experts
