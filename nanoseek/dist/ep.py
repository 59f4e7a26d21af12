"""Expert parallelism (V3 §3.2.2): the routed experts of a MoE layer are split over the ranks of an EP group,
n_routed_experts / ep_size consecutive experts per rank; attention, the gate and the shared experts stay local.

One MoE layer on rank r with its N tokens (top-K routing, so N·K (token, slot) rows):
    1. gate locally (same math as one device: the gate weights and bias are replicated);
    2. sort the rows by global expert id: rows for rank q's experts are then contiguous (experts are placed
       in blocks), so one all-to-all sends each block to its owner. Row counts per expert go first
       (all_to_all_single of E integers), which gives every rank its receive sizes;
    3. dispatch: all_to_all_single of the rows and of their gate weights g; received rows are grouped (source
       rank, local expert) and are regrouped (local expert, source rank) for the grouped GEMM
       (`Experts.forward_sorted`), which weights each row by its g before the down projection, as on one device;
    4. combine: the reverse regrouping and all-to-all bring every row back to its token's rank, where rows are
       summed per token in one pass (`combine_rows`, as on one device): h_t = Σ_k g_{k,t} FFN_{i_k}(u_t).
No capacity factor, no dropped tokens: the splits are whatever the gate chose.

Autograd: the dispatch's gradient is the combine of the gradients (the same all-to-all with send and receive
sizes swapped) and vice versa, so one autograd.Function covers both; the expert weights' gradient lands on their
owner rank, summed over every token that any rank routed to them.

Overlap (`overlap=True`, the prefill trick of V3 §3.4): the tokens are split into two micro-batches; the
dispatch of micro-batch 1 runs (async collective) while the experts compute micro-batch 0, and the combine of
micro-batch 0 runs while the experts compute micro-batch 1. Same rows, same weights: the result is the same.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.moe import Experts, MoE, combine_rows, gather_rows, sort_by_expert


class _AllToAll(torch.autograd.Function):
    """out = all_to_all_single(x) with row splits; backward: the reverse all-to-all of the gradient.
    With `handle` (a dict), the forward is only launched (async_op) and handle['work'] must be waited on."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, handle):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        x = x.contiguous()
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=handle is not None)
        if handle is not None:
            handle["work"] = work
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad = grad.contiguous()
        dx = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(dx, grad, in_splits, out_splits, group=ctx.group)
        return dx, None, None, None, None


class _Wait(torch.autograd.Function):
    """Identity that first waits for the async collective that fills x (gradient passes through)."""

    @staticmethod
    def forward(ctx, x, handle):
        handle.pop("work").wait()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Autograd-aware all_to_all_single over dim 0: in_splits[q] rows of x go to rank q, out_splits[q] come back."""
    return _AllToAll.apply(x, out_splits, in_splits, group, None)


class _Plan:
    """The routing of one micro-batch: sort order, split sizes, regrouping of the received rows."""

    def __init__(self, indices: torch.Tensor, n_experts: int, ep: int, group):
        n_local = n_experts // ep
        flat = indices.flatten()
        # rows grouped by global expert (= by owner); send[e]: rows for global expert e
        self.order, self.inverse, send = sort_by_expert(flat, n_experts)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)          # recv[q·n_local + e]: rows from rank q for my e
        send, recv = send.view(ep, n_local), recv.view(ep, n_local)
        self.in_splits, self.out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        self.counts = recv.sum(0)                                # rows per local expert
        # received rows come as segments (source q, local expert e), q-major; the GEMM wants e-major
        seg = torch.repeat_interleave(torch.arange(ep * n_local, device=flat.device), recv.flatten())
        key = (seg % n_local) * ep + seg // n_local
        self.regroup, self.ungroup, _ = sort_by_expert(key, ep * n_local)


class EPExperts(Experts):
    """This rank's slice of the routed experts; forward(x, weights, indices) as Experts.forward, indices global."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, group=None, overlap: bool = False):
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        if n_experts % ep:
            raise ValueError(f"{n_experts} routed experts do not split over an expert-parallel group of {ep}")
        n_local = n_experts // ep
        super().__init__(n_local, dim, inter_dim, expert_offset=rank * n_local)
        self.n_total, self.ep, self.group, self.overlap = n_experts, ep, group, overlap

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        N, K = indices.shape
        g = weights.reshape(N * K, 1)                                # one gate weight per (token, slot) row
        if self.overlap:   # on every rank alike (the collectives must pair up), even with < 2 tokens here
            m = N // 2
            halves = [None, None] if residual is None else [residual[:m], residual[m:]]
            return torch.cat(self._pipelined([x[:m], x[m:]], [g[: m * K], g[m * K:]], [indices[:m], indices[m:]],
                                             halves))
        plan = _Plan(indices, self.n_total, self.ep, self.group)
        return _sum(self._combine(self._compute(*self._dispatch(x, g, plan, K), plan), plan), plan, K, residual)

    # the three stages of one micro-batch (with handles: launched async, finished by _Wait)
    def _dispatch(self, x, g, plan, k, handles=(None, None)):
        """Each token's k rows and their gate weights, in the order they are sent, to the experts' owners."""
        sent = gather_rows(x, plan.order, plan.inverse, k)
        g_sent = gather_rows(g, plan.order, plan.inverse)
        return tuple(_AllToAll.apply(t, plan.out_splits, plan.in_splits, self.group, hd)
                     for t, hd in zip((sent, g_sent), handles))

    def _compute(self, received, g_received, plan):
        local = gather_rows(received, plan.regroup, plan.ungroup)
        g_local = gather_rows(g_received, plan.regroup, plan.ungroup)[:, 0]
        return gather_rows(self.forward_sorted(local, plan.counts, g_local), plan.ungroup, plan.regroup)

    def _combine(self, y, plan, handle=None):
        """The rows back to their tokens' rank (`_sum` then adds up each token's rows)."""
        return _AllToAll.apply(y, plan.in_splits, plan.out_splits, self.group, handle)

    def _pipelined(self, xs: list, gs: list, indices: list, residuals: list) -> list:
        """Two micro-batches: dispatch(1) ‖ compute(0), combine(0) ‖ compute(1). Every rank issues the
        collectives in the same order: counts 0, counts 1, dispatch 0 (rows, weights), dispatch 1, combine 0,
        combine 1."""
        plans = [_Plan(i, self.n_total, self.ep, self.group) for i in indices]
        h = [({}, {}), ({}, {}), {}, {}]
        sent = [self._dispatch(x, g, p, i.shape[1], hd) for x, g, p, i, hd in zip(xs, gs, plans, indices, h[:2])]

        def arrived(i):   # micro-batch i's rows and weights, once their all-to-alls are done
            return [_Wait.apply(t, hd) for t, hd in zip(sent[i], h[i])]
        y0 = self._compute(*arrived(0), plans[0])
        back0 = self._combine(y0, plans[0], h[2])                 # in flight while micro-batch 1 computes
        y1 = self._compute(*arrived(1), plans[1])
        back1 = self._combine(y1, plans[1], h[3])
        return [_sum(_Wait.apply(back, hd), p, i.shape[1], r)
                for back, p, i, hd, r in zip((back0, back1), plans, indices, h[2:], residuals)]


def _sum(back: torch.Tensor, plan: _Plan, k: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The returned rows (in sorted order) summed per token, each already weighted by its g, plus the residual:
    out[n] = residual[n] + Σ_j back[inverse[n·k + j]]."""
    return combine_rows(back, plan.inverse, plan.order, k, residual)


@torch.no_grad()
def shard_experts(moe: MoE, group=None, overlap: bool = False) -> EPExperts:
    """Replace moe.experts (all experts, e.g. the same seeded init on every rank) by this rank's slice. The
    state_dict key stays `experts.gate_up_proj` / `experts.down_proj`, with n_local rows."""
    full = moe.experts
    E, two_i, H = full.gate_up_proj.shape
    ep = EPExperts(E, H, two_i // 2, group, overlap).to(full.gate_up_proj.device)
    sl = slice(ep.expert_offset, ep.expert_offset + ep.n_experts)
    ep.gate_up_proj.copy_(full.gate_up_proj[sl])
    ep.down_proj.copy_(full.down_proj[sl])
    ep.gate_up_proj.requires_grad_(full.gate_up_proj.requires_grad)
    ep.down_proj.requires_grad_(full.down_proj.requires_grad)
    moe.experts = ep
    return ep


def apply_ep(model, group=None, overlap: bool = False) -> list[EPExperts]:
    """Expert parallelism for every MoE layer of a DeepSeekV3 (main blocks and MTP blocks)."""
    return [shard_experts(m, group, overlap) for m in model.modules() if isinstance(m, MoE)]
