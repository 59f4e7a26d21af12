"""Expert parallelism on 2 and 4 gloo ranks equals the single-process MoE layer on the same weights: outputs,
and gradients w.r.t. the input, the expert weights (on their owner rank), the gate and the shared expert
(summed over ranks); with and without the two-micro-batch overlap; and with EPLB redundant experts."""
import copy

import pytest
import torch
import torch.distributed as dist

from nanoseek.config import preset
from nanoseek.dist.ep import shard_experts
from nanoseek.dist.eplb import rebalance_experts
from nanoseek.dist.redundant import replicate_layer
from nanoseek.dist.spawn import spawn
from nanoseek.model.moe import MoE

TOL = 1e-5   # fp32, relative to the largest reference value; measured: below 1e-6


def moe_and_batch(seed=0, n_experts=8, n_group=4, B=4, T=6):
    torch.manual_seed(seed)
    cfg = preset("tiny", n_routed_experts=n_experts, n_group=n_group, topk_group=2, num_experts_per_tok=3)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(B, T, cfg.hidden_size)
    g = torch.randn(B, T, cfg.hidden_size)        # d loss / d output
    return moe, x, g


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _ep_worker(rank, world, overlaps):
    ref, x, g = moe_and_batch()
    xr = x.clone().requires_grad_(True)
    (ref(xr) * g).sum().backward()
    B = x.shape[0] // world
    rows = slice(rank * B, (rank + 1) * B)
    errors = {}
    for overlap in overlaps:
        moe = copy.deepcopy(ref)
        moe.zero_grad(set_to_none=True)
        ep = shard_experts(moe, overlap=overlap)
        xl = x[rows].clone().requires_grad_(True)
        y = moe(xl)
        (y * g[rows]).sum().backward()
        gate_grad = moe.gate.weight.grad.clone()
        dist.all_reduce(gate_grad)
        sl = slice(ep.expert_offset, ep.expert_offset + ep.n_experts)
        shared_grad = moe.shared_experts.down_proj.weight.grad.clone()
        dist.all_reduce(shared_grad)
        sl = slice(ep.expert_offset, ep.expert_offset + ep.n_experts)
        errors[overlap] = {   # max abs error relative to the largest reference value
            "out": rel(y, ref(x[rows])),
            "dx": rel(xl.grad, xr.grad[rows]),
            "d_gate_up": rel(ep.gate_up_proj.grad, ref.experts.gate_up_proj.grad[sl]),
            "d_down": rel(ep.down_proj.grad, ref.experts.down_proj.grad[sl]),
            "d_gate": rel(gate_grad, ref.gate.weight.grad),
            "d_shared": rel(shared_grad, ref.shared_experts.down_proj.weight.grad),
            "y": y.detach(),
        }
    # ranks with different token counts (rank 0: one token, so an empty micro-batch), overlapped
    moe = copy.deepcopy(ref)
    shard_experts(moe, overlap=True)
    xs = x.flatten(0, 1)[rank * 7: rank * 7 + 1 + 2 * rank][None]
    with torch.no_grad():
        errors["uneven"] = {"out": rel(moe(xs), ref(xs))}
    # EPLB redundant experts under EP: 12 physical experts (4 replicas) over the ranks, same outputs
    moe = copy.deepcopy(ref)
    loads = torch.tensor([[50.0, 1, 2, 30, 4, 5, 9, 1]])
    phy2log, log2phy, counts = rebalance_experts(loads, 12, n_groups=4, n_nodes=1, n_gpus=world)
    replicate_layer(moe, phy2log[0], log2phy[0], counts[0], group=dist.group.WORLD)
    with torch.no_grad():
        errors["redundant"] = {"out": rel(moe(x[rows]), ref(x[rows]))}
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_ep_matches_single_process(world):
    results = spawn(_ep_worker, world, (False, True), start_method="fork")
    for rank, errors in enumerate(results):
        for overlap, e in errors.items():
            for name, err in e.items():
                if name != "y":
                    assert err < TOL, (world, rank, overlap, name, err)
                    print(world, rank, overlap, name, f"{err:.1e}")
        # the overlapped schedule computes the same rows with the same weights (GEMMs over fewer rows may round
        # differently in the last bit)
        assert rel(errors[True]["y"], errors[False]["y"]) < 1e-6
        assert errors["redundant"]["out"] < TOL
