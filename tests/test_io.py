"""Checkpoint IO: round trips (single, sharded, MTP, FP8) and strict, all-or-nothing loading."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek.config import preset
from nanoseek.fp8.quant import weight_dequant, weight_quant
from nanoseek.io import load_hf, save_hf

from .helpers import random_model


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_single_file_with_mtp(tmp_path):
    model = random_model(preset("tiny", num_nextn_predict_layers=2))
    save_hf(model, str(tmp_path))
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    L = model.cfg.num_hidden_layers
    for k in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"):
        assert f"model.layers.{L + 1}.{k}.weight" in keys
    assert f"model.layers.{L}.mlp.experts.7.down_proj.weight" in keys
    assert _same(model, load_hf(str(tmp_path)))


def test_round_trip_sharded(tmp_path):
    model = random_model(preset("tiny"))
    save_hf(model, str(tmp_path), max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    assert _same(model, load_hf(str(tmp_path)))


def test_fp8_checkpoint_matches_within_quantization_error(tmp_path):
    cfg = preset("tiny", hidden_size=256, intermediate_size=320, moe_intermediate_size=160)
    model = random_model(cfg)
    save_hf(model, str(tmp_path), fp8=True)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["quantization_config"]["weight_block_size"] == [128, 128]
    stored = load_file(str(tmp_path / "model.safetensors"))
    w = stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert w.dtype == torch.float8_e4m3fn
    assert stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 2)  # (40, 256)
    assert stored["model.embed_tokens.weight"].dtype == torch.float32
    loaded = load_hf(str(tmp_path))
    # every FP8-stored weight is within E4M3's rounding of the original (≤ 2^-4 of its 128x128 block's amax,
    # checked per block in test_weight_quant_blocks_against_float64), and nothing else changed
    emulated = random_model(cfg)
    with torch.no_grad():
        for (name, p), q in zip(emulated.named_parameters(), loaded.parameters()):
            if p.dim() == 2 and "proj" in name and "eh_proj" not in name:
                assert not torch.equal(p, q)
                assert (p - q).abs().max() <= 2 ** -4 * p.abs().max()
                p.copy_(weight_dequant(*weight_quant(p)))
            elif p.dim() == 3:  # stacked experts: stored per expert, gate and up as separate tensors
                assert (p - q).abs().max() <= 2 ** -4 * p.abs().max()
                halves = 2 if name.endswith("gate_up_proj") else 1
                p.copy_(torch.stack([torch.cat([weight_dequant(*weight_quant(h)) for h in w.chunk(halves)])
                                     for w in p]))
            else:
                assert torch.equal(p, q), name
    # and the loaded model computes exactly what quantize -> dequantize of the original weights gives
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ref, got = emulated(ids).logits, loaded(ids).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_weight_quant_blocks_against_float64():
    w = torch.randn(300, 200, dtype=torch.float64) * torch.logspace(-3, 2, 200, dtype=torch.float64)
    q, s = weight_quant(w)
    assert s.shape == (3, 2)
    back = weight_dequant(q, s, torch.float64)
    # per 128x128 block, error ≤ half an E4M3 ulp at the block's amax: 2^-4 · amax
    for i in range(3):
        for j in range(2):
            blk = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            assert (back[blk] - w[blk]).abs().max() <= 2 ** -4 * w[blk].abs().max()


def test_missing_tensor_names_key(tmp_path):
    model = random_model(preset("tiny"))
    save_hf(model, str(tmp_path))
    t = load_file(str(tmp_path / "model.safetensors"))
    del t["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.experts.3.up_proj.weight'"):
        load_hf(str(tmp_path))


def test_unexpected_and_misshaped_tensors(tmp_path):
    model = random_model(preset("tiny"))
    save_hf(model, str(tmp_path))
    t = load_file(str(tmp_path / "model.safetensors"))
    t["model.layers.0.self_attn.bogus.weight"] = torch.zeros(2)
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.0.self_attn.bogus.weight' in .*model"):
        load_hf(str(tmp_path))
    del t["model.layers.0.self_attn.bogus.weight"]
    t["model.norm.weight"] = torch.ones(3)
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model.norm.weight' .* has shape \(3,\), expected \(64,\)"):
        load_hf(str(tmp_path))


def test_truncated_file_names_file(tmp_path):
    model = random_model(preset("tiny"))
    save_hf(model, str(tmp_path), max_shard_bytes=100_000)
    shard = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))[1]
    path = tmp_path / shard
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=shard):
        load_hf(str(tmp_path))


def test_partial_mtp_is_an_error(tmp_path):
    model = random_model(preset("tiny"))
    save_hf(model, str(tmp_path))
    t = load_file(str(tmp_path / "model.safetensors"))
    del t[f"model.layers.{model.cfg.num_hidden_layers}.eh_proj.weight"]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="eh_proj"):
        load_hf(str(tmp_path))


def test_saving_over_a_checkpoint_keeps_it_loadable(tmp_path):
    model = random_model(preset("tiny"))
    save_hf(model, str(tmp_path))
    save_hf(model, str(tmp_path), dtype=torch.bfloat16)
    loaded = load_hf(str(tmp_path), dtype=torch.bfloat16)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.moe_gates()[0].e_score_correction_bias.dtype == torch.float32
    assert not any(p.endswith(".tmp") for p in os.listdir(tmp_path))
