"""Rotary position embedding with YaRN frequency interpolation (DeepSeek-V2 §2.1.3, YaRN paper §3).

Only the decoupled `qk_rope_head_dim` dims of q and the single shared k_rope are rotated; this file computes the
angles (cos, sin), the rotation itself is kernels/rope.py's `apply_rope` (fused with MLA's q/k assembly there).
"""
from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    # the dim index whose wavelength completes `num_rotations` turns over the original context
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """θ_i = base^(-2i/d); under YaRN blended between θ_i (high freq, kept) and θ_i/factor (low freq, interpolated)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if cfg.rope_type == "yarn":
        rs = cfg.rope_scaling
        factor, orig = rs["factor"], rs["original_max_position_embeddings"]
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
        low = max(math.floor(_yarn_correction_dim(beta_fast, dim, base, orig)), 0)
        high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, base, orig)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq.float()


def attention_factor(cfg: ModelConfig) -> float:
    """YaRN's cos/sin magnitude scale mscale(factor, mscale)/mscale(factor, mscale_all_dim); 1.0 for V3."""
    if cfg.rope_type != "yarn":
        return 1.0
    rs = cfg.rope_scaling
    factor = rs["factor"]

    def m(s):
        return 1.0 if factor <= 1 else 0.1 * s * math.log(factor) + 1.0

    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return m(rs["mscale"]) / m(rs["mscale_all_dim"])
    return m(1.0)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0):
    """positions (B, T) -> cos, sin of shape (B, T, d/2), computed in fp32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return angles.cos() * scale, angles.sin() * scale
