"""DeepSeek-V3: embedding → blocks (dense for the first `first_k_dense_replace`, then MoE) → norm → head,
plus D Multi-Token-Prediction modules, and the training loss (V3 §2.2 eq. 25, §2.1.2 eq. 17–20):

    L = CE(main) + λ/D Σ_k CE_k(MTP) + α Σ_layers L_bal
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from .block import Block
from .layers import FP32Buffers, RMSNorm
from .loss import chunked_cross_entropy
from .mla import document_mask
from .moe import Experts, Gate, RouterStats
from .mtp import MTPModule
from .rope import attention_factor, inv_frequencies, rope_cos_sin


@dataclass
class Output:
    logits: torch.Tensor | None                                   # (B, T, V) main head
    hidden: torch.Tensor                                          # (B, T, H) final normalized hidden state
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: (B, T-k, V), predicts t_{i+k+1}
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)  # depth k: (B, T-k, H) normalized
    stats: list[RouterStats] = field(default_factory=list)        # per MoE layer (main layers, then MTP)


@dataclass
class Loss:
    total: torch.Tensor
    ce: torch.Tensor
    mtp: torch.Tensor | None
    balance: torch.Tensor | None
    expert_load: torch.Tensor | None     # (n_moe_layers, n_routed_experts) token counts


class DeepSeekV3(FP32Buffers):
    fp32_buffers = ("inv_freq",)  # bf16 frequencies are off by tenths of a radian at positions in the thousands

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k)
                                 for k in range(cfg.num_nextn_predict_layers))
        self.register_buffer("inv_freq", inv_frequencies(cfg), persistent=False)
        self.rope_scale = attention_factor(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.cfg.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, Gate)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Experts):
                nn.init.normal_(m.gate_up_proj, std=std)
                nn.init.normal_(m.down_proj, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for m in self.modules():
            if isinstance(m, Gate):
                m.e_score_correction_bias.zero_()
        self.inv_freq.copy_(inv_frequencies(self.cfg))

    def rope(self, positions: torch.Tensor):
        return rope_cos_sin(self.inv_freq, positions, self.rope_scale)

    def forward(self, input_ids: torch.Tensor, *, cache=None, seq_lens: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, mtp: bool = False, return_stats: bool = False,
                logits: bool = True) -> Output:
        """input_ids (B, T).

        cache: a LatentCache (infer/cache.py); the tokens are appended after each row's cached prefix and the
            cache advances by T, or by seq_lens[b] (B,) for right-padded rows with fewer valid tokens.
        doc_ids: optional (B, T) document index of each token when there is no cache: packed documents attend only
            within themselves (`document_mask`); causal over the whole row otherwise. mtp: also run the MTP modules
            (training).
        """
        B, T = input_ids.shape
        if cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids: document masking applies without a cache (training, scoring)")
            positions, mask = cache.begin(T)
        else:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            mask = None if doc_ids is None else document_mask(doc_ids)
        cos, sin = self.rope(positions)
        x = self.embed_tokens(input_ids)
        stats = []
        for layer in self.layers:
            x, s = layer(x, cos, sin, cache, mask, return_stats)
            if s is not None:
                stats.append(s)
        if cache is not None:
            cache.advance(T if seq_lens is None else seq_lens)
        h = self.norm(x)
        out = Output(logits=self.lm_head(h) if logits else None, hidden=h, stats=stats)
        if mtp:
            for k, module in enumerate(self.mtp, start=1):
                if T <= k:
                    break
                # depth k at position i sees h^{k-1}_i and Emb(t_{i+k}) (length T-k); a document mask applies by
                # h's positions, so inside a document depth k sees what it would see on the document alone
                m = None if doc_ids is None else document_mask(doc_ids[:, : T - k])
                h, s = module(h[:, : T - k], self.embed_tokens(input_ids[:, k:]),
                              cos[:, : T - k], sin[:, : T - k], None, m, return_stats)
                out.mtp_hidden.append(h)
                if logits:
                    out.mtp_logits.append(self.lm_head(h))
                if s is not None:
                    out.stats.append(s)
        return out

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, *, mtp_lambda: float | torch.Tensor = 0.0,
             balance_alpha: float = 0.0, doc_ids: torch.Tensor | None = None, ignore_index: int = -100) -> Loss:
        """labels[b, i] is the token after input_ids[b, i] (ignore_index to skip). MTP depth k at position i
        is scored on labels[b, i+k]. mtp_lambda may be a device scalar (a step captured as a CUDA graph reads
        each step's λ from it): MTP then always runs."""
        use_mtp = len(self.mtp) > 0 and (isinstance(mtp_lambda, torch.Tensor) or mtp_lambda > 0)
        out = self.forward(input_ids, doc_ids=doc_ids, mtp=use_mtp, return_stats=True, logits=False)
        w = self.lm_head.weight
        ce = chunked_cross_entropy(out.hidden, w, labels, ignore_index)
        total, mtp_loss, balance = ce, None, None
        if out.mtp_hidden:
            mtp_loss = sum(chunked_cross_entropy(h, w, labels[:, k:], ignore_index)
                           for k, h in enumerate(out.mtp_hidden, start=1)) / len(out.mtp_hidden)
            total = total + mtp_lambda * mtp_loss
        load = None
        if out.stats:
            balance = torch.stack([s.balance_loss for s in out.stats]).sum()
            if balance_alpha > 0:
                total = total + balance_alpha * balance
            load = torch.stack([s.load for s in out.stats])
        return Loss(total=total, ce=ce, mtp=mtp_loss, balance=balance, expert_load=load)

    def moe_gates(self) -> list[Gate]:
        """Gates in the order of Loss.expert_load rows (main MoE layers, then MTP blocks)."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.mlp.gate for b in blocks if b.is_moe]
