"""Schedules as pure functions of the optimizer step, so a resumed run needs nothing but the step to continue.

Learning rate (V3 §4.2: linear warmup, constant, cosine decay to 10% of the peak):
    warmup   lr · (s+1)/warmup_steps                     for s < warmup_steps
    stable   lr                                          until the decay starts (wsd only)
    decay    lr · (r + (1-r)·½(1 + cos(π·p)))            p: 0 → 1 over the decay, r = min_lr_ratio
'cosine' decays from the end of the warmup to the last step; 'wsd' only over the last decay_fraction of steps.

λ_MTP and γ are V3's piecewise constants: one value, then another after a switch point (a fraction of the run).
"""
import math


def learning_rate(step: int, total: int, peak: float, warmup: int, kind: str, decay_fraction: float,
                  min_ratio: float) -> float:
    """lr of optimizer step `step` (0-based) of `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_start = warmup if kind == "cosine" else max(warmup, total - round(decay_fraction * total))
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, total - 1 - decay_start))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def piecewise(step: int, total: int, start: float, end: float, switch: float) -> float:
    """`start` for steps before switch·total, `end` from there on."""
    return start if step < switch * total else end
