import json

import pytest

from nanoseek.config import ModelConfig, preset
from nanoseek.info import cache_bytes_per_token, count


@pytest.mark.parametrize("overrides,field", [
    ({"topk_group": 5}, "topk_group"),
    ({"n_routed_experts": 10}, "n_routed_experts"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"kv_lora_rank": -4}, "kv_lora_rank"),
    ({"rope_scaling": {"type": "ntk", "factor": 2}}, "rope_scaling.type"),
    ({"rope_scaling": {"type": "yarn"}}, "rope_scaling.factor"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
])
def test_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        preset("tiny", **overrides)


def test_json_round_trip_and_both_rope_spellings(tmp_path):
    cfg = preset("v3")
    cfg.save(str(tmp_path))
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["rope_parameters"]["rope_type"] == "yarn" and d["rope_scaling"]["factor"] == 40
    assert ModelConfig.from_json(str(tmp_path)) == cfg
    old = {k: v for k, v in d.items() if k != "rope_parameters"}
    old["rope_scaling"] = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert ModelConfig.from_dict(old).rope_scaling == cfg.rope_scaling
    new = {k: v for k, v in d.items() if k != "rope_scaling"}
    assert ModelConfig.from_dict(new).rope_scaling == cfg.rope_scaling


def test_v3_parameter_counts():
    c = count(preset("v3"))
    assert abs(c["total"] / 671.03e9 - 1) < 0.003
    assert abs(c["activated"] / 37.55e9 - 1) < 0.003
    assert abs(c["activated_no_embedding"] / 36.63e9 - 1) < 0.003
    assert abs(c["mtp_stored"] / 13.5e9 - 1) < 0.01
    assert abs(c["checkpoint_total"] / 685e9 - 1) < 0.003
    latent, plain = cache_bytes_per_token(preset("v3"))
    assert latent == 61 * 576 * 2 and round(plain / latent) == 71


def test_small_and_v2_lite_counts_match_design():
    assert abs(count(preset("small"))["total"] / 885e6 - 1) < 0.01
    assert abs(count(preset("v2-lite"))["total"] / 15.706e9 - 1) < 0.001
