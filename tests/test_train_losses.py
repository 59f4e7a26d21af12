"""The training losses against direct implementations of DESIGN.md's formulas, and the aux-loss-free bias
update against a deliberately skewed router."""
import math

import torch
import torch.nn.functional as F

from nanoseek import DeepSeekV3, preset
from nanoseek.model import Gate
from nanoseek.train.balance import load_ratio, update_bias

from .helpers import randomize


def route(x, gate: Gate):
    """DESIGN.md §2 Gate, written out: s = sigmoid(x W_g) in fp32; selection on s + b, group-limited (group score
    = sum of its top-2 biased scores, keep topk_group groups), top-k inside them. Returns (s, chosen mask)."""
    s = torch.sigmoid(x.float() @ gate.weight.float().t())
    biased = s + gate.e_score_correction_bias
    N, E = s.shape
    per_group = E // gate.n_group
    chosen = torch.zeros(N, E, dtype=torch.bool)
    for t in range(N):
        groups = biased[t].view(gate.n_group, per_group)
        group_score = torch.stack([g.sort(descending=True).values[:2].sum() for g in groups])
        kept = group_score.argsort(descending=True)[: gate.topk_group]
        candidates = torch.cat([torch.arange(g * per_group, (g + 1) * per_group) for g in kept.tolist()])
        best = candidates[biased[t, candidates].argsort(descending=True)[: gate.top_k]]
        chosen[t, best] = True
    return s, chosen


def test_balance_loss_matches_formula():
    """L_bal = Σ_i f_i P_i per sequence, f_i = N_r/(K_r T) Σ_t 1[i ∈ topk(t)], P_i = 1/T Σ_t s_{i,t}/Σ_j s_{j,t};
    the model reports the sum over MoE layers of its mean over sequences (α applied by the caller)."""
    cfg = preset("tiny", num_hidden_layers=3, first_k_dense_replace=1)
    model = randomize(DeepSeekV3(cfg))
    gates = model.moe_gates()
    inputs = {}
    hooks = [g.register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[0].detach()))
             for i, g in enumerate(gates)]
    B, T = 3, 24
    x = torch.randint(0, cfg.vocab_size, (B, T))
    alpha = 0.01
    loss = model.loss(x, torch.roll(x, -1, 1), mtp_lambda=0.3, balance_alpha=alpha)
    for h in hooks:
        h.remove()

    N_r, K_r = cfg.n_routed_experts, cfg.num_experts_per_tok
    expected, expected_load = 0.0, []
    for i, gate in enumerate(gates):
        s, chosen = route(inputs[i], gate)
        expected_load.append(chosen.sum(0).float())
        T_i = inputs[i].shape[0] // B                    # MTP blocks see T-1 positions
        for b in range(B):
            rows = slice(b * T_i, (b + 1) * T_i)
            f = N_r / (K_r * T_i) * chosen[rows].float().sum(0)
            P = (s[rows] / s[rows].sum(-1, keepdim=True)).mean(0)
            expected += (f * P).sum().item() / B
    assert math.isclose(loss.balance.item(), expected, rel_tol=1e-5)
    torch.testing.assert_close(loss.expert_load.float(), torch.stack(expected_load))
    torch.testing.assert_close(loss.total, loss.ce + 0.3 * loss.mtp + alpha * loss.balance)


def test_mtp_loss_matches_formula():
    """Depth k at position i: h'_i = W_eh[RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)] (embedding first, as
    DeepSeek's checkpoints are served; DESIGN.md writes the pair the other way round), one block, the shared head;
    L_MTP = 1/D Σ_k CE_k against t_{i+k+1}; the total adds λ·L_MTP."""
    cfg = preset("tiny", num_nextn_predict_layers=2)
    model = randomize(DeepSeekV3(cfg))
    B, T = 2, 16
    x = torch.randint(0, cfg.vocab_size, (B, T + 1))
    inputs, labels = x[:, :-1], x[:, 1:]
    lam = 0.3
    loss = model.loss(inputs, labels, mtp_lambda=lam)

    with torch.no_grad():
        h = model(inputs).hidden
        ce_main = F.cross_entropy(model.lm_head(h).flatten(0, 1), labels.flatten())
        ces = []
        for k, mod in enumerate(model.mtp, start=1):
            n = T - k
            cos, sin = model.rope(torch.arange(n).expand(B, n))
            merged = mod.eh_proj(torch.cat([mod.enorm(model.embed_tokens(inputs[:, k:])), mod.hnorm(h[:, :n])], -1))
            h, _ = mod.block(merged, cos, sin)
            h = mod.norm(h)
            ces.append(F.cross_entropy(model.lm_head(h).flatten(0, 1), labels[:, k:].flatten()))
        mtp = sum(ces) / len(ces)
    torch.testing.assert_close(loss.ce, ce_main)
    torch.testing.assert_close(loss.mtp, mtp)
    torch.testing.assert_close(loss.total, ce_main + lam * mtp)


def test_bias_update_balances_a_skewed_router():
    """A router whose affinities favour two experts for every token sends them nearly all the load (max/mean ≈ 3.9
    of a possible 4). With b_i += γ·sign(mean(c) − c_i) after each step of 2048 tokens (γ = 0.003), max/mean must
    fall below 1.3 and stay there (mean of the last 100 steps below 1.2, every one below 1.3) within 300 steps,
    without touching the router weights."""
    cfg = preset("tiny")
    gate = Gate(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gate.weight.copy_(0.1 * torch.randn(gate.weight.shape, generator=g))
        gate.weight[:2, 0] += 1.0          # experts 0 and 1 score high on the shared feature
    weight = gate.weight.detach().clone()

    def step_load():
        x = torch.randn(2048, cfg.hidden_size, generator=g)
        x[:, 0] += 4.0                       # a feature every token has
        _, idx, _ = gate(x)
        return torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts)[None]

    start = load_ratio(step_load()).item()
    assert start > 3.0
    ratios = []
    for _ in range(300):
        load = step_load()
        ratios.append(load_ratio(load).item())
        update_bias([gate], load, gamma=0.003)
    assert sum(ratios[-100:]) / 100 < 1.2 and max(ratios[-100:]) < 1.3, ratios[-100:]
    assert torch.equal(gate.weight, weight)
    b = gate.e_score_correction_bias
    assert b[:2].max() < b[2:].min()       # the favoured experts were pushed down
