"""EPLB: expert-parallel load balancing by redundant experts (DeepSeek-V3 §3.4, DeepSeek's `eplb`).

Under expert parallelism a GPU is as slow as the busiest expert set it hosts. Given per-logical-expert loads
w (layers × E, e.g. tokens routed over a recent window), EPLB places P ≥ E *physical* experts on G GPUs:
the heaviest logical experts get several replicas (the token stream of expert e is split between its r_e
replicas, so each carries w_e / r_e), and the physical experts are packed so that every GPU hosts P/G of them
with nearly equal summed load.

Hierarchical policy (when the node count divides the expert-group count, matching group-limited routing:
a token's experts then live on few nodes, so cross-node traffic stays low):
    1. pack the n_group expert groups onto the N nodes, each node getting n_group/N groups, balancing load;
    2. inside each node, replicate its E/N logical experts into P/N physical slots: repeatedly give one more
       replica to the expert with the largest w_e / r_e;
    3. pack each node's physical experts (load w_e / r_e each) onto its G/N GPUs, P/G per GPU.
Global policy otherwise: the same with one node and one group (replicas may land on any GPU).

Balanced packing is the greedy "heaviest item into the lightest bin that still has room" (LPT with equal
counts). All choices break ties by index (stable sorts), so a placement is a pure function of its inputs.

Outputs, for each layer:
    phy2log  (layers, P)                 logical expert served by physical slot p (GPU p // (P/G))
    log2phy  (layers, E, max_replicas)   physical slots of each logical expert, -1 padded
    counts   (layers, E)                 replicas per logical expert (Σ = P)
"""
from __future__ import annotations

import torch


def balanced_packing(weight: torch.Tensor, n_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (L, n) -> pack (L, n) in [0, n_packs), rank (L, n) position inside the pack; n/n_packs items per
    pack, the heaviest item first into the lightest pack that is not full."""
    L, n = weight.shape
    assert n % n_packs == 0, f"{n} items do not split into {n_packs} equal packs"
    per_pack = n // n_packs
    pack = torch.full((L, n), -1, dtype=torch.long)
    rank = torch.full((L, n), -1, dtype=torch.long)
    if per_pack == 1:  # one item per pack: nothing to balance
        return torch.arange(n).expand(L, n).clone(), torch.zeros(L, n, dtype=torch.long)
    w = weight.double()
    for layer in range(L):
        loads, sizes = [0.0] * n_packs, [0] * n_packs
        for i in torch.sort(w[layer], descending=True, stable=True).indices.tolist():
            p = min((k for k in range(n_packs) if sizes[k] < per_pack), key=lambda k: (loads[k], k))
            pack[layer, i], rank[layer, i] = p, sizes[p]
            loads[p] += w[layer, i].item()
            sizes[p] += 1
    return pack, rank


def replicate_experts(weight: torch.Tensor, n_physical: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight (L, n) -> phy2log (L, n_physical), replica rank (L, n_physical), counts (L, n): every logical
    expert once, then each extra slot to the expert with the largest load per replica."""
    L, n = weight.shape
    assert n_physical >= n, f"{n_physical} physical slots cannot hold {n} experts"
    phy2log = torch.arange(n_physical).remainder(n).expand(L, n_physical).clone()
    rank = torch.zeros(L, n_physical, dtype=torch.long)
    counts = torch.ones(L, n, dtype=torch.long)
    rows = torch.arange(L)
    w = weight.double()
    for p in range(n, n_physical):
        e = (w / counts).argmax(dim=-1)          # argmax returns the first maximum: ties go to the lower index
        phy2log[:, p] = e
        rank[:, p] = counts[rows, e]
        counts[rows, e] += 1
    return phy2log, rank, counts


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    return inv.scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm))


def rebalance_hierarchical(weight: torch.Tensor, n_physical: int, n_groups: int, n_nodes: int,
                           n_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight (L, E) -> phy2log (L, P), replica rank (L, P), counts (L, E)."""
    L, E = weight.shape
    assert E % n_groups == 0 and n_groups % n_nodes == 0 and n_gpus % n_nodes == 0 and n_physical % n_gpus == 0
    group_size, groups_per_node = E // n_groups, n_groups // n_nodes
    phy_per_node = n_physical // n_nodes
    # 1. expert groups -> nodes. `mlog` (middle logical) numbers experts node by node: node 0's experts first.
    group_pack, group_rank = balanced_packing(weight.unflatten(-1, (n_groups, group_size)).sum(-1), n_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size).unsqueeze(-1)
                + torch.arange(group_size)).flatten(-2)                       # (L, E)
    mlog2log = _inverse(log2mlog)
    # 2. replicate inside each node: rows are (layer, node)
    tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, E // n_nodes)
    phy2mlog, phy_rank, mlog_counts = replicate_experts(tokens_per_mlog, phy_per_node)
    # 3. physical experts -> GPUs of the node, by load per replica
    tokens_per_phy = (tokens_per_mlog / mlog_counts).gather(-1, phy2mlog)
    pack, rank = balanced_packing(tokens_per_phy, n_gpus // n_nodes)
    phy2pphy = pack * (phy_per_node // (n_gpus // n_nodes)) + rank           # slot within the node
    pphy2phy = _inverse(phy2pphy)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)                                  # (L·N, P/N) node-local mlog
    pphy2mlog = (pphy2mlog.view(L, n_nodes, -1)
                 + torch.arange(0, E, E // n_nodes).view(1, -1, 1)).flatten(-2)  # global mlog
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphy_rank = phy_rank.gather(-1, pphy2phy).view(L, -1)
    counts = mlog_counts.view(L, -1).gather(-1, log2mlog)
    return pphy2log, pphy_rank, counts


def rebalance_experts(weight: torch.Tensor, n_replicas: int, n_groups: int, n_nodes: int, n_gpus: int):
    """EPLB placement. weight (L, E) loads (any non-negative numbers); n_replicas = P physical experts in all
    (E + redundant slots; a multiple of n_gpus). Hierarchical when n_groups % n_nodes == 0, global otherwise.
    -> phy2log (L, P), log2phy (L, E, max_replicas) -1 padded, counts (L, E)."""
    weight = weight.float().cpu()
    if weight.dim() == 1:
        weight = weight[None]
    L, E = weight.shape
    if n_groups % n_nodes == 0:
        phy2log, rank, counts = rebalance_hierarchical(weight, n_replicas, n_groups, n_nodes, n_gpus)
    else:
        phy2log, rank, counts = rebalance_hierarchical(weight, n_replicas, 1, 1, n_gpus)
    max_replicas = int(counts.max())
    log2phy = torch.full((L, E, max_replicas), -1, dtype=torch.long)
    # log2phy[l, phy2log[l, p], rank[l, p]] = p
    flat = log2phy.view(L, -1)
    flat.scatter_(-1, phy2log * max_replicas + rank, torch.arange(n_replicas).expand(L, -1).clone())
    return phy2log, log2phy, counts


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, counts: torch.Tensor, n_gpus: int) -> torch.Tensor:
    """(L, n_gpus) load of each GPU when every logical expert's tokens are split evenly over its replicas."""
    weight = weight.float().cpu().reshape(-1, weight.shape[-1])
    per_phy = (weight / counts).gather(-1, phy2log)
    return per_phy.view(per_phy.shape[0], n_gpus, -1).sum(-1)


def imbalance(loads: torch.Tensor) -> torch.Tensor:
    """Per layer: max over mean of the GPU loads (1.0 = perfect)."""
    return loads.max(-1).values / loads.mean(-1).clamp_min(1e-12)


def identity_placement(n_layers: int, n_experts: int):
    """No redundancy: logical expert e is physical slot e (contiguous blocks per GPU, as plain EP places them)."""
    phy2log = torch.arange(n_experts).expand(n_layers, -1).clone()
    return phy2log, phy2log.clone().unsqueeze(-1), torch.ones(n_layers, n_experts, dtype=torch.long)
