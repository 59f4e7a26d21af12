"""Speculative decoding with the model's own MTP module (V3 §2.2, §5.4.3: 85–90% of drafts accepted).

Depth 1 at position i reads the main model's normalized hidden state h_i and the embedding of t_{i+1} and
predicts t_{i+2}. So once the main model has consumed t_0..t_{n-1} (h_{n-1} known) and t_n is sampled, the MTP
module drafts d = t_{n+1}. One main forward over [t_n, d] then scores both positions:

    position n   predicts t_{n+1}: accept d if the target distribution agrees (greedy: argmax == d),
                 otherwise it yields the corrected token;
    position n+1 predicts t_{n+2}: a free extra token when d was accepted.

Each round yields 1 or 2 tokens for one main forward. A rejected draft leaves its latent at position n+1 in the
cache; rolling the row's length back by one makes it invisible (later tokens overwrite it). The MTP block has its
own cache layer, kept at the same length as the main layers: one pair (h_i, t_{i+1}) per main position.
"""
from __future__ import annotations

import torch

from .sample import Sampler, draw


def mtp_draft(model, cache, hidden: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Append counts[b] pairs (hidden[b, i], tokens[b, i]) to row b's MTP cache and draft greedily from the last.

    hidden (B, T, H) main hidden states at the positions the main model just cached (counts[b] of them, so the
    MTP pairs start at position lengths[b] - counts[b]); tokens (B, T) the token after each of those positions.
    Returns (B,) drafts for the position after the last pair (meaningless for rows with count 0).
    """
    cache.lengths -= counts
    positions, mask = cache.begin(tokens.shape[1])
    cos, sin = model.rope(positions)
    h, _ = model.mtp[0](hidden, model.embed_tokens(tokens), cos, sin, cache, mask)
    cache.advance(counts)
    last = h[torch.arange(h.shape[0], device=h.device), (counts - 1).clamp_min(0)]
    return model.lm_head(last).argmax(dim=-1)


def verify(sampler: Sampler, logits: torch.Tensor, drafts: torch.Tensor, u_accept: torch.Tensor,
           u_draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, 2, V) of the main model at [t_n, d]; drafts d (B,). Returns (accepted (B,) bool, first (B,)
    the token at n+1: d or its correction, second (B,) the token at n+2, valid where accepted).

    Greedy rows accept iff argmax == d, so their tokens are exactly plain greedy decoding's. Sampled rows use
    speculative sampling for a deterministic draft: accept with probability p(d); on rejection draw from the
    residual max(p - q, 0) with q one-hot at d, i.e. p with d removed. The output then follows p exactly.
    """
    greedy_first = logits[:, 0].argmax(dim=-1)
    second = sampler.sample(logits[:, 1], u_draw)
    if sampler.all_greedy:
        accepted = greedy_first == drafts
        return accepted, greedy_first, second
    probs, ids = sampler.distribution(logits[:, 0])
    is_draft = ids == drafts[:, None]
    p_draft = (probs * is_draft).sum(dim=-1) / probs.sum(dim=-1)
    accepted = torch.where(sampler.greedy, greedy_first == drafts, u_accept.to(p_draft.device) < p_draft)
    # u_draw serves both the correction and the extra token: a row uses one or the other, never both
    corrected = torch.where(sampler.greedy, greedy_first, draw(probs * ~is_draft, ids, u_draw))
    return accepted, torch.where(accepted, drafts, corrected), second
