"""Logit parity with HF transformers' DeepseekV3ForCausalLM on identical weights, both directions."""
import pytest
import torch

from nanoseek.config import preset
from nanoseek.io import load_hf, save_hf

from .helpers import random_model, randomize

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # q_lora set, default rope, n_group > 1, one dense layer, norm_topk_prob true
    "a_tiny": preset("tiny"),
    # q_lora null, yarn (mscale == mscale_all_dim), n_group 1, no dense layer, norm_topk_prob false, tied embeddings
    "b_v2lite_like": preset("tiny", q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0,
                            norm_topk_prob=False, tie_word_embeddings=True, qk_nope_head_dim=8,
                            qk_rope_head_dim=4, v_head_dim=12, routed_scaling_factor=1.0, num_nextn_predict_layers=0,
                            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                          "mscale_all_dim": 0.707}),
    # yarn with mscale != mscale_all_dim (cos/sin magnitude != 1), half-split rope, 2 shared experts, 2 dense layers
    "c_split_rope": preset("tiny", rope_interleave=False, n_group=2, topk_group=1, first_k_dense_replace=2,
                           num_hidden_layers=4, n_shared_experts=2, qk_nope_head_dim=32, qk_rope_head_dim=16,
                           v_head_dim=24, num_attention_heads=2, kv_lora_rank=48,
                           rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8,
                                         "mscale": 1.0, "mscale_all_dim": 0.5}),
    # V3's yarn at a short original context, 16 experts in 8 groups, top-3 groups, 2 MTP depths
    "d_v3_like": preset("tiny", n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=3,
                        num_nextn_predict_layers=2, hidden_size=96, num_attention_heads=3,
                        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 8,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def _hf_logits(hf_dir, ids):
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    with torch.no_grad():
        return model(ids).logits, model


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_loads_what_nanoseek_saves(name, tmp_path):
    cfg = CONFIGS[name]
    ours = random_model(cfg)
    save_hf(ours, str(tmp_path))
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    ref, _ = _hf_logits(str(tmp_path), ids)
    with torch.no_grad():
        got = ours(ids).logits
    assert _rel(got, ref) < 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nanoseek_loads_what_hf_saves(name, tmp_path):
    cfg = CONFIGS[name]
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_dict().items() if k != "rope_scaling"})
    torch.manual_seed(1)
    hf = randomize(transformers.DeepseekV3ForCausalLM(hf_cfg).eval(), seed=1)
    hf.save_pretrained(str(tmp_path))
    ids = torch.randint(0, cfg.vocab_size, (3, 20))
    with torch.no_grad():
        ref = hf(ids).logits
    with pytest.warns(UserWarning, match="no MTP layers") if cfg.num_nextn_predict_layers else _nullcontext():
        ours = load_hf(str(tmp_path))
    with torch.no_grad():
        got = ours(ids).logits
    assert _rel(got, ref) < 1e-4


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
