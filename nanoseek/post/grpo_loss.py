"""The GRPO objective (DeepSeekMath §4.1, eq. 3; DeepSeek-R1 eq. 1-3), as a loss to minimize.

For a question q, G outputs o_1..o_G sampled from π_old, with rewards r_1..r_G:

    A_i     = (r_i − mean(r)) / (std(r) + eps)                     group-relative advantage, every token of o_i
    ρ_i,t   = π_θ(o_i,t | q, o_i,<t) / π_old(o_i,t | q, o_i,<t)
    D_i,t   = π_ref/π_θ − log(π_ref/π_θ) − 1                        the k3 estimator of KL(π_θ ‖ π_ref): unbiased,
                                                                  and never negative, unlike log(π_θ/π_ref)
    J       = 1/G Σ_i 1/|o_i| Σ_t [ min(ρ_i,t A_i, clip(ρ_i,t, 1−ε, 1+ε) A_i) − β D_i,t ]

and loss = −J. std is the sample standard deviation (n − 1), as torch.std; eps keeps a group whose rewards are
all equal at A = 0 (it then teaches nothing, only the KL term acts on it).

Rollouts come from the inference engine, whose numerics differ from the trainer's (other kernels; in bf16 a
near-tied expert choice can flip), so its samples are slightly off-policy for π_old. Optional truncated importance
weights (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training") correct that
per token: the surrogate of token t is multiplied by w_i,t = min(π_old / π_engine, C), a constant.

Normalization (how the per-token terms are averaged):
  "seq"    the formula above: a token mean within each output, then the mean over outputs (DeepSeekMath, R1).
           Every output weighs the same, so a token of a long output weighs less than one of a short output.
  "token"  Σ_i Σ_t [·] / Σ_i |o_i|: every token weighs the same (DAPO's token-level loss), which stops long
           wrong outputs from being penalized per token less than short ones.
Over a minibatch of several groups both are means over all its outputs (or tokens). A minibatch processed in
micro-batches passes the minibatch's n_outputs / n_tokens, so that the micro-batch losses sum to its loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NORMS = ("seq", "token")


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards (n_groups, G) -> advantages (n_groups, G)."""
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


@dataclass
class LossStats:
    kl: torch.Tensor          # token mean of D (the k3 KL estimate)
    clip_frac: torch.Tensor   # share of tokens whose clipped term won the min (their gradient is cut)
    ratio: torch.Tensor       # token mean of ρ


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04, norm: str = "seq",
              n_outputs: int | None = None, n_tokens: int | None = None,
              weights: torch.Tensor | None = None) -> tuple[torch.Tensor, LossStats]:
    """logp, old_logp, ref_logp, mask: (N, C) per completion token (mask: real tokens); advantages (N,).
    ref_logp may be None when beta == 0. n_outputs / n_tokens: the minibatch's counts (default: these N).
    weights: (N, C) truncated importance weights of the surrogate terms, or None (all 1)."""
    if norm not in NORMS:
        raise ValueError(f"loss normalization must be one of {NORMS}, got {norm!r}")
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    A = advantages.to(logp.dtype)[:, None]
    unclipped, clipped = ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A
    per_token = -torch.minimum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights.detach()
    kl = torch.zeros_like(logp)
    if beta:
        log_r = ref_logp - logp                    # log(π_ref / π_θ)
        kl = torch.exp(log_r) - log_r - 1
        per_token = per_token + beta * kl
    lengths = m.sum(dim=1).clamp(min=1)
    if norm == "seq":
        loss = ((per_token * m).sum(dim=1) / lengths).sum() / (n_outputs or len(logp))
    else:
        loss = (per_token * m).sum() / (n_tokens or m.sum().clamp(min=1))
    with torch.no_grad():
        total = m.sum().clamp(min=1)
        stats = LossStats(kl=(kl * m).sum() / total, clip_frac=((clipped < unclipped).to(m.dtype) * m).sum() / total,
                          ratio=(ratio * m).sum() / total)
    return loss, stats
