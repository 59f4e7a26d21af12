"""Per-request sampling: greedy, temperature, top-k, top-p (nucleus), reproducible by seed.

A batch mixes requests with different settings, so everything is a per-row tensor and one call serves all
rows. Randomness comes from one CPU `torch.Generator` per request that yields one uniform per drawn token:
a request's tokens then depend on its seed only, never on which other requests share its batch or on the
device, and the draw is a single inverse-CDF lookup over the filtered, sorted distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0          # 0: greedy (argmax)
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    seed: int | None = 0              # None: a fresh random seed
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the bad field (the server maps it to a 400)."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2^63, 2^64), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")

    def generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


class Sampler:
    """The per-row settings of a batch as tensors, built once per batch composition."""

    def __init__(self, params: list[SamplingParams], device):
        self.temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        self.greedy = self.temperature == 0
        self.all_greedy = bool(self.greedy.all())

    def distribution(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (B, V) -> (probs, token ids), both (B, V) in descending order of probability, with the
        tokens outside top-k / top-p zeroed. Not renormalized: draws scale by the kept mass instead."""
        V = logits.shape[-1]
        scaled = logits.float() / torch.where(self.greedy, 1.0, self.temperature)[:, None]
        scaled, ids = scaled.sort(dim=-1, descending=True)
        probs = scaled.softmax(dim=-1)
        rank = torch.arange(V, device=logits.device)
        k = torch.where(self.top_k > 0, self.top_k, V)
        # nucleus: keep a token while the mass strictly before it is below top_p (the top token always stays);
        # top_p = 1 keeps everything, also where the rounded cumulative sum reaches 1 before the tail
        nucleus = (probs.cumsum(dim=-1) - probs < self.top_p[:, None]) | (self.top_p[:, None] >= 1)
        keep = (rank < k[:, None]) & nucleus
        return probs * keep, ids

    def sample(self, logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """logits (B, V), uniforms (B,) in [0, 1) -> tokens (B,). Greedy rows ignore their uniform."""
        greedy = logits.argmax(dim=-1)
        if self.all_greedy:
            return greedy
        probs, ids = self.distribution(logits)
        return torch.where(self.greedy, greedy, draw(probs, ids, uniforms))


def draw(probs: torch.Tensor, ids: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: the first token whose cumulative (unnormalized) mass exceeds u · total."""
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1])[:, None]
    pos = torch.searchsorted(cdf, target, right=True).clamp_max(probs.shape[-1] - 1)
    return ids.gather(1, pos).squeeze(1)


def uniforms(generators: list[torch.Generator | None]) -> torch.Tensor:
    """One uniform per row from its request's generator (0 for greedy rows, which draw nothing)."""
    return torch.tensor([torch.rand(1, generator=g).item() if g is not None else 0.0 for g in generators])
