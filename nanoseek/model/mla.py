"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1).

    c_q  = RMSNorm(x W_DQ)                      (q_lora_rank; q = x W_Q when q_lora_rank is None)
    [q_nope; q_rope] = c_q W_UQ                  per head: qk_nope_head_dim + qk_rope_head_dim
    [c_kv; k_rope]   = x W_DKV                   kv_lora_rank + qk_rope_head_dim  (HF: kv_a_proj_with_mqa)
    c_kv = RMSNorm(c_kv);  [k_nope; v] = c_kv W_UKV   per head (HF: kv_b_proj)
    RoPE on q_rope and on the single k_rope shared by all heads.

Two ways to compute the same attention:
  * `forward` without a cache expands k and v per head and runs SDPA (training, prefill), or FlexAttention when
    packed documents are masked from each other (`document_mask`);
  * with a cache, the up-projections are absorbed: only (c_kv, k_rope) are stored per token and
        score = (q_nope W_UK) · c_kv + q_rope · k_rope,      out = (softmax · c_kv) W_UV
    which reads kv_lora_rank + qk_rope_head_dim values per cached token instead of H·(d_qk + d_v).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from ..config import ModelConfig
from ..kernels.rope import apply_rope, rope_qk
from .layers import RMSNorm, parallel_linear


def document_mask(doc_ids: torch.Tensor, flex: bool | None = None) -> torch.Tensor | BlockMask:
    """(B, T) document index of each token -> the (query, key) pairs a token may attend to: itself and the earlier
    tokens of its own document. With `flex` (default: on CUDA) a FlexAttention BlockMask, so that the attention
    kernel skips the 128×128 blocks that cross documents instead of reading a dense mask; otherwise a dense
    (B, T, T) bool for SDPA.
    Positions are not restarted per document: RoPE scores depend on i − j only, so within a document the result is
    that of the document alone."""
    B, T = doc_ids.shape
    if doc_ids.is_cuda if flex is None else flex:
        def same_document_causal(b, h, q, k):
            return (doc_ids[b, q] == doc_ids[b, k]) & (q >= k)
        # compiled on CUDA: evaluated eagerly, the (B, T, T) pairs would pass through int64 temporaries
        return create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device, _compile=doc_ids.is_cuda)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal


# FlexAttention is fast only compiled (eager, it materializes the scores); inside a compiled block this is inlined
_compiled_flex_attention = torch.compile(flex_attention, dynamic=False)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = cfg.softmax_scale
        self.rope_interleave = cfg.rope_interleave
        bias = cfg.attention_bias
        H = cfg.hidden_size
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(H, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, H, bias=bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, H) -> q (B, T, n_heads, d_nope + d_rope), c_kv (B, T, kv_lora_rank) normalized, k_rope
        (B, T, qk_rope_head_dim); RoPE not applied yet. W_DQ and W_DKV both read x: one GEMM in training
        (parallel_linear)."""
        if self.q_lora_rank is None:
            q, kv = parallel_linear(x, self.q_proj, self.kv_a_proj_with_mqa)
        else:
            c_q, kv = parallel_linear(x, self.q_a_proj, self.kv_a_proj_with_mqa)
            q = self.q_b_proj(self.q_a_layernorm(c_q))
        c_kv, k_rope = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return q.unflatten(-1, (self.n_heads, self.qk_head_dim)), self.kv_a_layernorm(c_kv), k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, H). Without a cache: causal attention over x (`mask`, if given, is `document_mask`'s BlockMask
        or (B, T, T) bool of allowed pairs). With a cache: attend to the cached prefix plus x, `mask` (B, T, S) is
        then required."""
        q, c_kv, k_rope = self.project(x)
        if cache is None:
            out = self._attend_expanded(q, c_kv, k_rope, cos, sin, mask)
        else:
            q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
            q_rope = apply_rope(q_rope, cos, sin, self.rope_interleave)
            c_kv, k_rope = cache.update(self.layer_idx, c_kv, apply_rope(k_rope, cos, sin, self.rope_interleave))
            out = self._attend_absorbed(q_nope, q_rope, c_kv, k_rope, mask)
        return self.o_proj(out.flatten(2))

    def _attend_expanded(self, q, c_kv, k_rope, cos, sin, mask):
        k_nope, v = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, -1)).split(
            [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        # [q_nope; RoPE(q_rope)] and [k_nope; RoPE(k_rope)], k_rope shared by all heads
        q, k = rope_qk(q, k_nope, k_rope, cos, sin, self.rope_interleave)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)           # (B, nh, T, d)
        if isinstance(mask, BlockMask):   # FlexAttention takes d_v < d_qk on every GPU
            attend = _compiled_flex_attention if q.is_cuda else flex_attention
            return attend(q, k, v, block_mask=mask, scale=self.softmax_scale).transpose(1, 2)
        d_v = self.v_head_dim
        if q.is_cuda and d_v < self.qk_head_dim and torch.cuda.get_device_capability(q.device)[0] < 9:
            # before Hopper, SDPA's flash kernel wants one head dim for q, k and v: zero-pad v (192 vs 128 at V3)
            # and slice the output. On sm90 cuDNN's flash attention takes d_v < d_qk (0.6 ms a step faster at
            # `small` on an H200 than padding)
            v = F.pad(v, (0, self.qk_head_dim - d_v))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.softmax_scale)
        return out[..., :d_v].transpose(1, 2)                                         # (B, T, nh, d_v)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (nh, d_nope, C) and W_UV (nh, d_v, C) as views of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, mask):
        w_uk, w_uv = self.absorbed_weights()
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)                          # q_nope W_UK
        scores = (torch.einsum("bthc,bsc->bhts", q_lat, c_kv)
                  + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)).float() * self.softmax_scale
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        p = scores.softmax(dim=-1).to(c_kv.dtype)
        o_lat = torch.einsum("bhts,bsc->bthc", p, c_kv)                               # softmax · c_kv
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)                            # ... W_UV
