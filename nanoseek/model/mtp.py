"""Multi-Token Prediction (V3 §2.2). Depth k predicts token i+k+1 from the depth-(k-1) representation of
token i and the embedding of token i+k:

    h'_i = W_eh [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})]      (HF: enorm, hnorm, eh_proj; embedding first,
                                                                as DeepSeek's checkpoints are served)
    h_i^k = Block(h'_i);   logits = OutHead(RMSNorm_k(h_i^k))      (own norm `shared_head.norm`, shared head)

The embedding and output head are the main model's; h^{k-1} passed between depths is the normalized one.
"""
import torch
from torch import nn

from ..config import ModelConfig
from .block import Block
from .layers import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        H = cfg.hidden_size
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.block = Block(cfg, layer_idx)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, cos, sin, cache=None, mask=None,
                return_stats: bool = False):
        """h_prev: normalized hidden of the previous depth, emb: Emb(t_{i+k}); returns normalized h^k."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        x, stats = self.block(x, cos, sin, cache, mask, return_stats)
        return self.norm(x), stats
