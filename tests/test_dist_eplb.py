"""EPLB placement (hierarchical and global) and inference with redundant experts."""
import pytest
import torch

from nanoseek.config import preset
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.dist.eplb import gpu_loads, identity_placement, imbalance, rebalance_experts
from nanoseek.dist.redundant import apply_redundant_experts, to_physical
from nanoseek.infer.engine import Engine
from nanoseek.infer.generate import generate_ids
from nanoseek.infer.sample import SamplingParams

from .helpers import random_model


def zipf_loads(layers, experts, s=1.2, seed=0):
    """Skewed loads: expert ranks follow Zipf's law, shuffled per layer."""
    g = torch.Generator().manual_seed(seed)
    base = 1000.0 / torch.arange(1, experts + 1).double() ** s
    return torch.stack([base[torch.randperm(experts, generator=g)] for _ in range(layers)])


def check_maps(phy2log, log2phy, counts, E, P):
    L = phy2log.shape[0]
    assert phy2log.shape == (L, P) and counts.shape == (L, E) and log2phy.shape[:2] == (L, E)
    assert (counts >= 1).all() and (counts.sum(-1) == P).all()
    for l in range(L):
        # every logical expert is present, as often as counts says
        assert torch.equal(torch.bincount(phy2log[l], minlength=E), counts[l])
        for e in range(E):
            slots = log2phy[l, e]
            valid = slots[slots >= 0]
            assert valid.numel() == counts[l, e] and (slots[counts[l, e]:] == -1).all()
            assert (phy2log[l, valid] == e).all()                        # log2phy inverts phy2log
        assert sorted(log2phy[l][log2phy[l] >= 0].tolist()) == list(range(P))


@pytest.mark.parametrize("E, P, groups, nodes, gpus", [
    (16, 24, 4, 2, 4),    # hierarchical: 4 groups over 2 nodes of 2 GPUs, 8 redundant slots
    (16, 24, 4, 3, 8),    # 3 nodes do not divide 4 groups: global policy
    (64, 80, 8, 2, 8),
    (16, 16, 4, 2, 4),    # no redundant slots: placement only
])
def test_eplb_maps_and_balance(E, P, groups, nodes, gpus):
    w = zipf_loads(3, E)
    phy2log, log2phy, counts = rebalance_experts(w, P, groups, nodes, gpus)
    check_maps(phy2log, log2phy, counts, E, P)
    before = imbalance(gpu_loads(w, *identity_placement(3, E)[::2], gpus))
    after = imbalance(gpu_loads(w, phy2log, counts, gpus))
    assert (after < before).all() and (after >= 1).all(), (before, after)
    if P > E:
        assert (after < 1.2).all(), after
    # deterministic
    again = rebalance_experts(w, P, groups, nodes, gpus)
    assert all(torch.equal(a, b) for a, b in zip((phy2log, log2phy, counts), again))


def test_matches_deepseek_eplb_example():
    """The worked example of DeepSeek's EPLB README (2 layers, 12 experts in 4 groups, 2 nodes, 8 GPUs, 16 slots)."""
    w = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                      [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    phy2log, _, _ = rebalance_experts(w, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_hierarchical_keeps_groups_on_one_node():
    w = zipf_loads(2, 16)
    phy2log, _, _ = rebalance_experts(w, 24, 4, 2, 4)
    for l in range(2):
        for node in range(2):
            groups = set((phy2log[l, node * 12:(node + 1) * 12] // 4).tolist())
            assert len(groups) == 2        # each node hosts exactly its 2 groups (with their replicas)


def test_to_physical_spreads_rows_over_replicas():
    log2phy = torch.tensor([[0, 3, -1], [1, -1, -1], [2, 4, 5]])
    counts = torch.tensor([2, 1, 3])
    idx = torch.tensor([[0, 2], [0, 2], [0, 2], [1, 2]])
    phys = to_physical(idx, log2phy, counts)
    assert phys.tolist() == [[0, 2], [3, 4], [0, 5], [1, 2]]


def test_redundant_experts_compute_the_same():
    cfg = preset("tiny")
    plain, redundant = random_model(cfg), random_model(cfg)
    n_moe = len(plain.moe_gates())
    phy2log, log2phy, counts = rebalance_experts(zipf_loads(n_moe, cfg.n_routed_experts), 12, cfg.n_group, 2, 4)
    apply_redundant_experts(redundant, phy2log, log2phy, counts)
    assert redundant.layers[1].mlp.experts.gate_up_proj.shape[0] == 12
    x = torch.randint(0, cfg.vocab_size, (3, 17))
    with torch.no_grad():
        a, b = plain(x, mtp=True), redundant(x, mtp=True)
    assert torch.allclose(a.logits, b.logits, atol=1e-5, rtol=0)
    assert torch.allclose(a.mtp_logits[0], b.mtp_logits[0], atol=1e-5, rtol=0)
    # greedy decoding through the engine (continuous batching, latent cache) gives the same tokens
    prompts = [[1, 5, 9], [7, 7], [3, 4, 5, 6, 2]]
    params = [SamplingParams(max_tokens=6, ignore_eos=True) for _ in prompts]
    ref = generate_ids(plain, prompts, params)
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog. "] * 20, 300)
    engine = Engine(redundant, tok, max_batch=2, max_len=32, cuda_graphs=False)
    reqs = [engine.submit(p, q) for p, q in zip(prompts, params)]
    engine.run_until_done(max_steps=100)
    assert [r.tokens for r in reqs] == ref
