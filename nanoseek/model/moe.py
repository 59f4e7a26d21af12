"""DeepSeekMoE (V3 §2.1.2): shared experts + fine-grained routed experts with a sigmoid, group-limited,
bias-corrected gate and no token dropping.

    s_{i,t}  = sigmoid(u_t · e_i)                                   affinities, fp32
    select   = top-K_r of (s + b) inside the top-`topk_group` groups (group score = sum of its top-2)
    g_{i,t}  = s_{i,t} / Σ_{j∈select} s_{j,t} · routed_scaling_factor    (unbiased; normalized if norm_topk_prob)
    h_t      = Σ_shared FFN(u_t) + Σ_{i∈select} g_{i,t} FFN_i(u_t)

b (`e_score_correction_bias`) only steers selection; it is updated outside autograd by the aux-loss-free
rule (train/balance.py) from the per-expert loads this module reports.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels import grouped_mm, moe_rows
from .layers import MLP, FP32Buffers


@dataclass
class RouterStats:
    load: torch.Tensor          # (n_routed_experts,) tokens routed to each expert in this forward
    balance_loss: torch.Tensor  # sequence-wise balance loss Σ_i f_i P_i, averaged over sequences (without α)


class Gate(FP32Buffers):
    fp32_buffers = ("e_score_correction_bias",)  # γ = 0.001 bias steps would vanish in bf16

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.scoring_func = cfg.scoring_func
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        """x (N, H) -> weights (N, K) fp32, indices (N, K), scores (N, E) fp32 (unbiased affinities)."""
        with torch.autocast(x.device.type, enabled=False):  # V3 keeps the gate in fp32, also under autocast
            logits = _GateLogits.apply(x, self.weight)
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        biased = scores + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = biased.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = top_k(grouped, 2)[0].sum(dim=-1)                           # (N, n_group)
            keep = top_k(group_scores, self.topk_group)[1]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        indices = top_k(biased, self.top_k)[1]
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores


class _GateLogits(torch.autograd.Function):
    """u_t · e_i in fp32. When u and e are both bf16 (bf16 weights) on CUDA, one bf16 GEMM with an fp32 output:
    the products of bf16 values are exact in fp32 and the sums run in fp32, so this is the fp32 GEMM on the
    upcast operands (up to summation order) without writing u in fp32 and with the bf16 tensor cores' rate.

    Backward takes the logits' gradient in the activations' dtype, as every layer's output gradient is (bf16
    under autocast; V3 §3.3.1 keeps the gate in "BF16 or FP32"): dx = g·E in that dtype, dE = gᵀ·u summed in
    fp32. Compiled, the backward is traced under the forward's autocast, which cast its GEMMs to bf16 (dE rounded
    to bf16 too) while eager steps ran them in fp32; with the casts written out and autocast off, both compute
    these gradients (exact fp32 GEMMs when the activations are fp32)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _fp32_mm(x, w.t())

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):   # traced under autocast when compiled
            g = grad.to(x.dtype)
            dx = g @ w.to(x.dtype) if ctx.needs_input_grad[0] else None
            dw = _fp32_mm(g.t(), x).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def _fp32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 sums and an fp32 result: bf16 CUDA operands go to the tensor cores as they are."""
    if a.is_cuda and a.dtype == b.dtype == torch.bfloat16:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries along the last dim, largest first (ties: lowest index).

    Under torch.compile: k rounds of max-and-mask, which fuse with the gate's other element-wise work. aten
    topk is a sort-based kernel of its own per call, and the gate's three calls took 0.26 ms of each MoE
    layer's training step on an H200 at 16K tokens (bench/profile_train.py). Eager code keeps topk: one launch.
    """
    if not torch.compiler.is_compiling():
        return x.topk(k, dim=-1)
    cols = torch.arange(x.shape[-1], device=x.device)
    values, indices = [], []
    for _ in range(k):
        v, i = x.max(dim=-1, keepdim=True)
        values.append(v)
        indices.append(i)
        x = x.masked_fill(cols == i, float("-inf"))
    return torch.cat(values, dim=-1), torch.cat(indices, dim=-1)


class Experts(nn.Module):
    """The routed experts as stacked weights, so all of them run as two grouped GEMMs.

    gate_up_proj (E, 2·I, H) holds [W_gate; W_up] of each expert, down_proj (E, H, I). Expert parallelism
    gives each rank a slice of experts; `expert_offset` is the global id of local expert 0.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, expert_offset: int = 0):
        super().__init__()
        self.n_experts, self.expert_offset = n_experts, expert_offset
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    def forward_sorted(self, x: torch.Tensor, counts: torch.Tensor, scale: torch.Tensor | None = None):
        """x (M, H) grouped by local expert (counts[e] rows for expert e, in order) -> (M, H); scale (M,), if
        given, multiplies each row's output (see `swiglu`)."""
        h = swiglu(grouped_mm(x, self.gate_up_proj, counts), scale)
        return grouped_mm(h, self.down_proj, counts)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, H), routing weights/indices (N, K) -> Σ_k g_k FFN_{i_k}(x)  (N, H), plus residual (N, H) if
        given. No token is dropped.

        Static shapes throughout (N·K rows whatever the routing), so the layer compiles and graph-captures.
        """
        N, K = indices.shape
        order, inverse, counts = sort_by_expert(indices.flatten() - self.expert_offset, self.n_experts)
        g_sorted = gather_rows(weights.reshape(-1, 1), order, inverse)[:, 0]   # each sorted row's g_k
        return self.forward_permuted(x, (order, inverse, K), counts, g_sorted, residual)

    def forward_permuted(self, x: torch.Tensor, perm: tuple, counts: torch.Tensor, g_sorted: torch.Tensor,
                         residual: torch.Tensor | None = None):
        """x (N, H) in token order, perm = (order, inverse, K) from sort_by_expert -> Σ_k g_k FFN_{i_k}(x) (N, H):
        sorted row j is token order[j] // K, and each token's K rows, each already weighted by its g_k, are
        summed, with the residual in the same pass. (FP8Experts folds the two permutations into its GEMMs'
        quantization.)"""
        order, inverse, K = perm
        return combine_rows(self.forward_sorted(gather_rows(x, order, inverse, K), counts, g_sorted),
                            inverse, order, K, residual)


def sort_by_expert(flat: torch.Tensor, n_experts: int):
    """flat (M,) expert ids in [0, n_experts) -> order (rows grouped by expert, stable), its inverse permutation,
    and counts (n_experts,). The ids sort as int16: a radix sort makes one pass per key byte, 2 against the 8 of
    int64 ids (0.05 ms per MoE layer of an H200 step). Counts come from binary searches of the sorted ids, the
    inverse from one indexed store: no atomics, no host sync."""
    key = flat.to(torch.int16) if n_experts <= torch.iinfo(torch.int16).max else flat
    sorted_key, order = key.sort(stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    bounds = torch.arange(n_experts + 1, dtype=key.dtype, device=key.device)
    counts = torch.searchsorted(sorted_key, bounds).diff()
    return order, inverse, counts


def swiglu(gate_up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU of an expert's [gate; up] projection, times each row's routing weight when given. The weight goes in
    before the down projection, which is linear: g·W_down h = W_down (g·h). The combine is then a plain sum over
    the K slots, and g's gradient Σ dh'·h is taken on the (M, I) rows backward has anyway, with no copy of the
    (M, H) expert outputs kept for it."""
    return _SwiGLU.apply(gate_up, scale)


class _SwiGLU(torch.autograd.Function):
    """Backward keeps [gate; up] and the scales, and takes all their gradients in one pass (kernels/moe_rows.py)."""

    @staticmethod
    def forward(ctx, gate_up, scale):
        ctx.save_for_backward(gate_up, scale)
        gate, up = gate_up.chunk(2, dim=-1)
        h = F.silu(gate) * up
        return h if scale is None else h * scale[:, None].to(h.dtype)

    @staticmethod
    def backward(ctx, dh):
        gate_up, scale = ctx.saved_tensors
        d_gate_up, d_scale = moe_rows.swiglu_backward(gate_up, scale, dh)
        return d_gate_up, (d_scale.to(scale.dtype) if scale is not None else None)


class _PermuteRows(torch.autograd.Function):
    """The gather rows = x[index // k], where index is a permutation of x.shape[0]·k rows (k copies of each row of
    x), or its adjoint, the combine out[n] = Σ_{j<k} y[index[n·k + j]] (+ residual[n]). Each one's gradient is the
    other, taken through the inverse permutation: no scatter-add, deterministic, and the k copies of x are never
    materialized. The residual's gradient is the output's."""

    @staticmethod
    def forward(ctx, x, index, inverse, k, combine, residual=None):
        ctx.save_for_backward(inverse)
        ctx.k, ctx.combine, ctx.dtype = k, combine, x.dtype
        return moe_rows.permute_rows(x, index, k, combine, residual)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        # rounded to the rows' dtype before the gather, not after: the same values, k times fewer casts
        dx = moe_rows.permute_rows(grad.to(ctx.dtype), inverse, ctx.k, not ctx.combine)
        return dx, None, None, None, None, grad if ctx.needs_input_grad[5] else None


def gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, k: int = 1) -> torch.Tensor:
    return _PermuteRows.apply(x, index, inverse, k, False, None)


def combine_rows(y: torch.Tensor, inverse: torch.Tensor, index: torch.Tensor, k: int,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """out[n] = Σ_{j<k} y[inverse[n·k + j]] (+ residual[n], in the same pass: summed in fp32 or wider, rounded
    once); `index` is the permutation inverse to `inverse`."""
    return _PermuteRows.apply(y, inverse, index, k, True, residual)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.overlap_shared = False   # the shared experts on a stream of their own: _overlapped

    def forward(self, x: torch.Tensor, return_stats: bool = False, residual: torch.Tensor | None = None):
        """x (B, T, H) -> h_t (+ residual, the block's, added in the pass that sums the experts' rows rather than
        in a pass of its own) and, if return_stats, RouterStats."""
        if self.overlap_shared and self.shared_experts is not None:
            y, *stats = self._overlapped(x, return_stats, residual)
        else:
            y, *stats = self.routed(x, return_stats, residual)
            if self.shared_experts is not None:
                y = y + self.shared_experts(x)
        return (y, RouterStats(*stats)) if return_stats else y

    def routed(self, x: torch.Tensor, return_stats: bool = False, residual: torch.Tensor | None = None):
        """x (B, T, H) -> (Σ_{i∈select} g_i FFN_i(x) + residual,) and, if return_stats, the RouterStats fields
        (tensors only: this is compiled on its own when the shared experts overlap, and a dataclass coming out of
        a compiled region left its fields outside it in torch 2.11)."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        weights, indices, scores = self.gate(flat)
        y = self.experts(flat, weights, indices, None if residual is None else residual.reshape(-1, H)).view(B, T, H)
        if not return_stats:
            return (y,)
        stats = self.router_stats(indices.view(B, T, -1), scores.view(B, T, -1))
        return y, stats.load, stats.balance_loss

    @torch.compiler.disable
    def _overlapped(self, x: torch.Tensor, return_stats: bool, residual: torch.Tensor | None):
        """The shared experts on a side stream while the routed path runs on the current one: the two are
        independent until their sum. Forward, the shared experts' GEMMs fill the GPU while the gate's top-k, the
        expert sort and the row gather run (short kernels, most of them latency-bound); autograd runs each
        backward op on the stream of its forward, so backward overlaps the same way. A compiled block breaks its
        graph here, and train/compile.py compiles the two halves instead.

        No record_stream is needed: the current stream waits for the side stream before anything after this
        layer runs, so neither stream can reuse the other's memory early."""
        streams = torch.get_device_module(x.device)
        main, side = streams.current_stream(), _side_stream(x.device)
        side.wait_stream(main)
        with streams.stream(side):
            shared = self.shared_experts(x)
        y, *stats = self.routed(x, return_stats, residual)
        main.wait_stream(side)
        return y + shared, *stats

    def router_stats(self, indices: torch.Tensor, scores: torch.Tensor) -> RouterStats:
        """Per-expert load, and the sequence-wise balance loss of V3 eq. 17–20 for sequences of length T:
            f_i = N_r / (K_r T) Σ_t 1[i ∈ topk(t)],   P_i = (1/T) Σ_t s_{i,t} / Σ_j s_{j,t},   L = Σ_i f_i P_i
        """
        B, T, K = indices.shape
        hits = torch.zeros(B, self.n_experts, device=scores.device).scatter_add_(
            1, indices.reshape(B, -1), torch.ones(B, T * K, device=scores.device))
        f = hits * self.n_experts / (K * T)
        P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
        return RouterStats(load=hits.sum(0).detach(), balance_loss=(f * P).sum(-1).mean())


_SIDE_STREAMS: dict[torch.device, object] = {}


def _side_stream(device: torch.device):
    """One side stream per device, shared by the layers (they run one after another). On CPU, torch's stand-in
    streams do nothing, so the same code runs there (in tests) in order."""
    if device not in _SIDE_STREAMS:
        streams = torch.get_device_module(device)
        _SIDE_STREAMS[device] = streams.Stream(device=device) if device.type == "cuda" else streams.Stream()
    return _SIDE_STREAMS[device]

