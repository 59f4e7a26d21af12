"""Inference with redundant experts (V3 §3.4): the MoE layers run P physical experts placed by EPLB
(eplb.py), some logical experts replicated, and every (token, slot) routed to a logical expert is sent to one
of its replicas.

Replica choice: the rows routed to logical expert e, in token order, go to its r_e replicas in turn (row j to
replica j mod r_e). That is the least-loaded choice made row by row (each row to the replica with the fewest
rows so far, ties to the lower replica), computed without a loop: replica loads differ by at most one row.
Replicas hold identical weights, so the layer computes exactly what the plain layer computes; only where the
work runs changes. With expert parallelism the P physical experts are split over the EP ranks in EPLB's
GPU order (rank g holds slots [g·P/G, (g+1)·P/G)).
"""
from __future__ import annotations

import torch

from ..model.moe import Experts, MoE
from .ep import EPExperts


def to_physical(indices: torch.Tensor, log2phy: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """indices (N, K) logical experts -> (N, K) physical slots; log2phy (E, R) -1 padded, counts (E,)."""
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    per_expert = torch.bincount(flat, minlength=counts.numel())
    starts = per_expert.cumsum(0) - per_expert
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # j: row's place for e
    replica = rank % counts[flat]
    return log2phy[flat, replica].view_as(indices)


class _Replicas:
    """What both kinds of redundant experts add: the maps as buffers, and the logical -> physical step."""

    def _set_maps(self, log2phy: torch.Tensor, counts: torch.Tensor) -> None:
        self.register_buffer("log2phy", log2phy.clone(), persistent=False)
        self.register_buffer("replica_counts", counts.clone(), persistent=False)

    def forward(self, x, weights, indices, residual=None):
        return super().forward(x, weights, to_physical(indices, self.log2phy, self.replica_counts), residual)


class RedundantExperts(_Replicas, Experts):
    """All P physical experts on this device (one process)."""


class RedundantEPExperts(_Replicas, EPExperts):
    """This rank's P/ep physical experts under expert parallelism."""


@torch.no_grad()
def replicate_layer(moe: MoE, phy2log: torch.Tensor, log2phy: torch.Tensor, counts: torch.Tensor,
                    group=None) -> Experts:
    """moe.experts (all logical experts) -> physical experts per the EPLB maps of this layer."""
    full = moe.experts
    E, two_i, H = full.gate_up_proj.shape
    P = phy2log.numel()
    if group is None:
        new = RedundantExperts(P, H, two_i // 2)
        mine = phy2log
    else:
        new = RedundantEPExperts(P, H, two_i // 2, group)
        mine = phy2log[new.expert_offset:new.expert_offset + new.n_experts]
    new = new.to(full.gate_up_proj.device, full.gate_up_proj.dtype)
    new._set_maps(log2phy.to(full.gate_up_proj.device), counts.to(full.gate_up_proj.device))
    new.gate_up_proj.copy_(full.gate_up_proj[mine.to(full.gate_up_proj.device)])
    new.down_proj.copy_(full.down_proj[mine.to(full.gate_up_proj.device)])
    moe.experts = new
    return new


def apply_redundant_experts(model, phy2log: torch.Tensor, log2phy: torch.Tensor, counts: torch.Tensor,
                            group=None) -> None:
    """Every MoE layer of a DeepSeekV3, in the order of Loss.expert_load rows (main MoE layers, then MTP):
    maps of shape (n_moe_layers, P), (n_moe_layers, E, R), (n_moe_layers, E) from eplb.rebalance_experts."""
    blocks = [b for b in list(model.layers) + [m.block for m in model.mtp] if b.is_moe]
    if len(blocks) != phy2log.shape[0]:
        raise ValueError(f"EPLB maps for {phy2log.shape[0]} layers, the model has {len(blocks)} MoE layers")
    for b, p2l, l2p, c in zip(blocks, phy2log, log2phy, counts):
        replicate_layer(b.mlp, p2l, l2p, c, group)
