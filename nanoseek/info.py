"""`nanoseek info`: parameter counts and cache sizes of a config, counted on a meta-device model (no memory)."""
from __future__ import annotations

import time

import torch

from .config import ModelConfig, preset
from .model import DeepSeekV3, Experts


def count(cfg: ModelConfig) -> dict[str, int]:
    """Totals as stored in an HF checkpoint, and per-token activated parameters of the main model.

    total: main model (embedding, blocks, norm, head). mtp_stored: the MTP modules as the HF checkpoint stores
    them, with their own copies of the embedding and head (mtp_unique: without those copies).
    activated: per token, the routed experts counted K_r of N_r; includes the output head and the embedding.
    """
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    embed, head = model.embed_tokens.weight.numel(), model.lm_head.weight.numel()
    mtp_unique = n(model.mtp)
    total = n(model) - mtp_unique  # tied embeddings are counted once by parameters()
    routed = sum(n(m) for m in model.layers.modules() if isinstance(m, Experts))
    activated = total - routed + routed * cfg.num_experts_per_tok // max(cfg.n_routed_experts, 1)
    return dict(total=total, activated=activated, activated_no_embedding=activated - embed,
                embedding=embed, head=head if not cfg.tie_word_embeddings else 0, mtp_unique=mtp_unique,
                mtp_stored=mtp_unique + cfg.num_nextn_predict_layers * (embed + head),
                checkpoint_total=total + mtp_unique + cfg.num_nextn_predict_layers * (embed + head))


def cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> tuple[int, int]:
    """(latent c_kv + k_rope, plain per-head K and V) bytes per token over the main layers."""
    latent = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes
    plain = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * dtype_bytes
    return latent, plain


def _b(x: int) -> str:
    return f"{x / 1e9:.2f}B" if x >= 1e8 else f"{x / 1e6:.2f}M"


def main(preset: str | None = None, config: str | None = None, forward: bool = False) -> None:
    name = preset or "v3"
    cfg = ModelConfig.from_json(config) if config else _preset(name)
    c = count(cfg)
    latent, plain = cache_bytes_per_token(cfg)
    print(f"config: {config or 'preset ' + name}")
    print(f"  total parameters (main model, embedding + head): {_b(c['total'])}")
    print(f"  activated per token, with embedding and head:    {_b(c['activated'])}")
    print(f"  activated per token, without embedding lookup:   {_b(c['activated_no_embedding'])}")
    print(f"  MTP modules as stored in the HF checkpoint:      {_b(c['mtp_stored'])} "
          f"({_b(c['mtp_unique'])} without their embedding/head copies)")
    print(f"  checkpoint total (main + MTP as stored):         {_b(c['checkpoint_total'])}")
    print(f"  latent cache per token (c_kv + k_rope, bf16):    {latent:,} bytes")
    print(f"  plain per-head K/V per token (bf16):             {plain:,} bytes ({plain / latent:.1f}x larger)")
    if forward:
        if c["total"] > 2e9:
            raise ValueError("--forward builds a real model: use a preset under 2B parameters (e.g. tiny)")
        torch.manual_seed(0)
        model = DeepSeekV3(cfg).eval()
        ids = torch.randint(0, cfg.vocab_size, (2, 32))
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(ids, mtp=True)
        print(f"  forward of a random model on {tuple(ids.shape)}: logits {tuple(out.logits.shape)}, "
              f"MTP logits {[tuple(x.shape) for x in out.mtp_logits]}, {1e3 * (time.perf_counter() - t0):.0f} ms")


_preset = preset
