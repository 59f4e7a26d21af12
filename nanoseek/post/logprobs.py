"""Per-token log-probabilities of completions under a model: log π(o_t | q, o_<t) for every completion token.

Sequences are prompt + completion, right-padded (causal attention: padding after a sequence never reaches it).
The head runs only on the positions that predict a completion token, in row chunks recomputed in backward,
so no (tokens × vocab) logits tensor is kept (as in model/loss.py; at V3's 129K vocabulary it would dominate).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ROWS = 4096


def _chunk_logp(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device):
    """-> ids (B, T) of prompt + completion right-padded, start (B,) index of each completion's first token,
    targets (B, C) completion tokens left-aligned (pad_id past the end), mask (B, C) of real completion tokens."""
    B = len(prompts)
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    C = max(len(c) for c in completions)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, C), pad_id, dtype=torch.long)
    mask = torch.zeros(B, C, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        targets[b, : len(c)] = torch.tensor(c)
        mask[b, : len(c)] = True
    start = torch.tensor([len(p) for p in prompts])
    return ids.to(device), start.to(device), targets.to(device), mask.to(device)


def completion_logprobs(model, ids: torch.Tensor, start: torch.Tensor, targets: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """(B, C) log-probabilities of targets[b, j] = ids[b, start[b] + j], predicted at position start[b] + j - 1;
    0 where mask is False."""
    C = targets.shape[1]
    hidden = model(ids, logits=False).hidden                                       # (B, T, H)
    pos = (start[:, None] - 1 + torch.arange(C, device=ids.device)).clamp(max=ids.shape[1] - 1)
    h = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))[mask]   # (tokens, H)
    t = targets[mask]
    w = model.lm_head.weight
    parts = []
    for lo in range(0, len(t), CHUNK_ROWS):
        sl = slice(lo, lo + CHUNK_ROWS)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logp, h[sl], w, t[sl], use_reentrant=False))
        else:
            parts.append(_chunk_logp(h[sl], w, t[sl]))
    out = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device)
    return out.masked_scatter(mask, torch.cat(parts)) if parts else out
