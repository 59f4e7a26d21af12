"""One pre-norm transformer block: x + MLA(norm(x)), then + FFN(norm(x)) with a dense MLP or DeepSeekMoE."""
import torch
from torch import nn

from ..config import ModelConfig
from .layers import MLP, RMSNorm
from .mla import MLA
from .moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos, sin, cache=None, mask=None, return_stats: bool = False):
        """Returns (x, RouterStats or None)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h), None
        out = self.mlp(h, return_stats, residual=x)   # x + MoE(h): x joins the pass that sums the experts' rows
        return out if return_stats else (out, None)
