"""torchrun setup and the parallel layout: FSDP2 over all ranks for the dense parameters, expert parallelism
for the routed experts.

Layout for world size W and ep_size E (E divides W):
    EP groups          ranks [k·E, (k+1)·E): each group holds one copy of all n_routed_experts, n/E per rank
                       (rank r owns expert block r mod E); tokens are exchanged inside the group
    expert-DP groups   ranks with the same r mod E hold the same experts: their expert gradients are summed
                       (all-reduce) — the data-parallel dimension orthogonal to EP, W/E ranks
    FSDP2              everything else (attention, dense MLPs, gates, shared experts, norms, embedding, head)
                       is sharded over all W ranks by `fully_shard` (per block, then the root), gradients
                       reduce-scattered and averaged over W.
Gradient scale: each rank's loss is the mean over its own tokens, so the global loss is the mean over ranks of
the rank losses. FSDP averages over W; an expert's gradient arrives at its owner summed over the EP group by the
all-to-all backward, is then summed over the expert-DP group, and divided by W: the same average.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import MoE
from .ep import EPExperts, apply_ep


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    ep_size: int
    ep_group: object          # this rank's EP group
    edp_group: object         # ranks holding the same experts as this one
    mesh: object              # 1-D DeviceMesh over all ranks (FSDP2)
    experts_mesh: object      # 2-D (edp, ep) DeviceMesh: how checkpoints see the expert slices

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size


def launched() -> bool:
    """True under torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR for every process), any world size."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def init(ep_size: int = 1, device: str = "auto", backend: str | None = None) -> DistEnv:
    """Join (or reuse) the default process group from torchrun's environment: nccl on CUDA, gloo on CPU."""
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    rank, world = dist.get_rank(), dist.get_world_size()
    ep_size = ep_size or world
    if world % ep_size:
        raise ValueError(f"train config 'dist.ep_size' must divide the world size {world} (got {ep_size})")
    # (expert-DP, EP) mesh: row k = EP group k = ranks [k·E, (k+1)·E); column e = the ranks holding experts block e
    experts_mesh = init_device_mesh(dev.type, (world // ep_size, ep_size), mesh_dim_names=("edp", "ep"))
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("fsdp",))
    return DistEnv(rank, world, local_rank, dev, ep_size, experts_mesh.get_group("ep"),
                   experts_mesh.get_group("edp"), mesh, experts_mesh)


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, EPExperts) for p in m.parameters()]


def parallelize(model, env: DistEnv, overlap: bool = False, reshard_after_forward: bool = True):
    """EP for the routed experts, then FSDP2 for the rest: each main block, each MTP module, the root."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if any(isinstance(m, MoE) for m in model.modules()):
        apply_ep(model, env.ep_group, overlap)
    ignored = set(expert_params(model))
    kw = dict(mesh=env.mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    for block in list(model.layers) + list(model.mtp):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    register_fsdp_forward_method(model, "loss")   # loss() calls forward() itself, past the __call__ hooks
    return model


@torch.no_grad()
def reduce_expert_grads(model, env: DistEnv) -> None:
    """Σ over the expert-DP group, ÷ W (see the module docstring)."""
    for p in expert_params(model):
        if p.grad is not None:
            if env.world > env.ep_size:
                dist.all_reduce(p.grad, group=env.edp_group)
            p.grad.div_(env.world)


@torch.no_grad()
def clip_grad_norm(model, env: DistEnv, max_norm: float) -> torch.Tensor:
    """Global gradient norm over sharded (FSDP DTensor) and expert-parallel gradients; clip to max_norm.

    ‖g‖² = Σ_ranks (Σ local FSDP shards² + Σ local expert grads² / (W/E)): expert gradients are identical on
    the W/E ranks of an expert-DP group, so each copy counts 1/(W/E)."""
    from torch.distributed.tensor import DTensor

    experts = {id(p) for p in expert_params(model)}
    grads = [(p.grad, id(p) in experts) for p in model.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64, device=env.device)
    for g, is_expert in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        s = local.double().pow(2).sum()
        sq += s * env.ep_size / env.world if is_expert else s
    dist.all_reduce(sq)
    norm = sq.sqrt().float()
    if max_norm and max_norm < float("inf"):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g, _ in grads:
            local = g.to_local() if isinstance(g, DTensor) else g
            local.mul_(coef.to(local.dtype))
    return norm


def param_groups(model, weight_decay: float) -> list[dict]:
    """train/optim.py's groups, each split into FSDP (DTensor) and expert (plain tensor) parameters: the
    optimizer's foreach ops take one kind per call."""
    from torch.distributed.tensor import DTensor

    from ..train.optim import param_groups as base

    groups = []
    for g in base(model, weight_decay):
        for want in (True, False):
            params = [p for p in g["params"] if isinstance(p, DTensor) == want]
            if params:
                groups.append({**g, "params": params})
    return groups
