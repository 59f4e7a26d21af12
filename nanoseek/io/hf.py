"""HF `deepseek_v3` checkpoint directories: config.json + safetensors (one file, or shards with
model.safetensors.index.json), per-expert keys on disk, MTP depth k as `model.layers.{num_hidden_layers+k}`,
optional FP8 weights (`float8_e4m3fn` + 128×128 `weight_scale_inv`).

Loading is strict and all-or-nothing: every expected tensor must be present once with the right shape, nothing
unexpected may be left over, and the model is only returned after the whole checkpoint was read.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..fp8.quant import weight_dequant, weight_quant
from ..model import DeepSeekV3

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
# Linear weights that DeepSeek's FP8 checkpoints store in FP8; embedding, head, gate and norms stay high precision
_FP8_NAME = re.compile(r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)"
                       r"\.weight$")


# ---- name mapping: nanoseek state_dict <-> HF keys ------------------------------------------------------
def hf_tensors(model: DeepSeekV3) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF key, tensor) for every tensor of an HF checkpoint of `model`, one at a time."""
    cfg = model.cfg
    L = cfg.num_hidden_layers
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = re.match(r"mtp\.(\d+)\.(.*)", name)
        if m:
            k, rest = int(m.group(1)), m.group(2)
            prefix = f"model.layers.{L + k}."
            rest = rest[len("block."):] if rest.startswith("block.") else rest
            rest = "shared_head.norm.weight" if rest == "norm.weight" else rest
            yield from _split_experts(prefix + rest, t)
            continue
        if name.startswith("lm_head."):
            yield name, t
        else:
            yield from _split_experts("model." + name, t)
    for k in range(len(model.mtp)):  # DeepSeek's checkpoints keep copies of the shared embedding and head per depth
        yield f"model.layers.{L + k}.embed_tokens.weight", model.embed_tokens.weight
        yield f"model.layers.{L + k}.shared_head.head.weight", model.lm_head.weight


def _split_experts(key: str, t: torch.Tensor):
    if key.endswith(".mlp.experts.gate_up_proj"):
        base, inter = key[: -len("gate_up_proj")], t.shape[1] // 2
        for e in range(t.shape[0]):
            yield f"{base}{e}.gate_proj.weight", t[e, :inter]
            yield f"{base}{e}.up_proj.weight", t[e, inter:]
    elif key.endswith(".mlp.experts.down_proj"):
        base = key[: -len("down_proj")]
        for e in range(t.shape[0]):
            yield f"{base}{e}.down_proj.weight", t[e]
    else:
        yield key, t


def _is_mtp_key(key: str, cfg: ModelConfig) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) >= cfg.num_hidden_layers


# ---- save ---------------------------------------------------------------------------------------------------
def save_hf(model: DeepSeekV3, directory: str, dtype: torch.dtype | None = None, fp8: bool = False,
            max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and safetensors. dtype: cast floating weights (None keeps them); fp8: store Linear
    weights as E4M3 with 128×128 `weight_scale_inv`. Files are written under temporary names and renamed last."""
    os.makedirs(directory, exist_ok=True)
    cfg = model.cfg.replace(quantization_config=FP8_CONFIG if fp8 else None)
    if dtype is not None:
        cfg = cfg.replace(torch_dtype=str(dtype).removeprefix("torch."))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in hf_tensors(model):
        t = t.detach().cpu()
        items = [(key, t)]
        if key.endswith("e_score_correction_bias"):
            items = [(key, t.float())]
        elif fp8 and _FP8_NAME.search(key) and not _is_mtp_copy(key):
            q, s = weight_quant(t)
            items = [(key, q), (key + "_scale_inv", s)]
        elif dtype is not None and t.is_floating_point():
            items = [(key, t.to(dtype))]
        for k, v in items:
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v.contiguous().clone()
            size += nbytes
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                for i in range(len(shards))]
    for name, shard in zip(names, shards):
        tmp = os.path.join(directory, name + ".tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(directory, name))
    stale = [INDEX] if len(shards) == 1 else [SINGLE]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for s in shards for v in s.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        with open(os.path.join(directory, INDEX + ".tmp"), "w") as f:
            json.dump(index, f, indent=2)
        os.replace(os.path.join(directory, INDEX + ".tmp"), os.path.join(directory, INDEX))
    for name in stale:
        if os.path.exists(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))
    cfg.save(directory)


def _is_mtp_copy(key: str) -> bool:
    return key.endswith(".shared_head.head.weight") or key.endswith(".embed_tokens.weight")


# ---- load ---------------------------------------------------------------------------------------------------
def _weight_files(directory: str) -> dict[str, str]:
    """HF key -> file path, from the index when sharded."""
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: unreadable index ({e})") from None
        return {k: os.path.join(directory, v) for k, v in weight_map.items()}
    single = os.path.join(directory, SINGLE)
    if not os.path.exists(single):
        raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {directory}")
    return {k: single for k in _keys_of(single)}


def _keys_of(path: str) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error type for truncated / corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def read_hf_tensors(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, FP8 weights dequantized to fp32, keyed by HF name."""
    files = _weight_files(directory)
    by_file: dict[str, list[str]] = {}
    for key, path in files.items():
        by_file.setdefault(path, []).append(key)
    raw: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} (listed in {INDEX}) is missing")
        present = set(_keys_of(path))
        try:
            with safe_open(path, framework="pt") as f:
                for key in keys:
                    if key not in present:
                        raise ValueError(f"tensor '{key}' is listed in {INDEX} but not stored in {path}")
                    raw[key] = f.get_tensor(key)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: failed reading tensors ({e})") from None
    out = {}
    for key, t in raw.items():
        if key.endswith(".weight_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale_key = key + "_scale_inv"
            if scale_key not in raw:
                raise ValueError(f"FP8 tensor '{key}' in {files[key]} has no '{scale_key}'")
            try:
                t = weight_dequant(t, raw[scale_key])
            except ValueError as e:
                raise ValueError(f"'{scale_key}' in {files[scale_key]}: {e}") from None
        out[key] = t
    for key in raw:
        if key.endswith(".weight_scale_inv") and key[: -len("_scale_inv")] not in raw:
            raise ValueError(f"unexpected tensor '{key}' in {files[key]}: no matching weight")
    out["__files__"] = files  # type: ignore[assignment]  # for error messages only
    return out


def load_hf(directory: str, dtype: torch.dtype = torch.float32, device="cpu",
            config: ModelConfig | None = None) -> DeepSeekV3:
    """Build a DeepSeekV3 from an HF checkpoint directory (strict)."""
    cfg = config or ModelConfig.from_json(directory)
    tensors = read_hf_tensors(directory)
    files = tensors.pop("__files__")
    if cfg.num_nextn_predict_layers and not any(_is_mtp_key(k, cfg) for k in tensors):
        # transformers' DeepseekV3ForCausalLM saves no MTP layers: load the main model, without MTP
        warnings.warn(f"{directory}: config has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the "
                      f"checkpoint stores no MTP layers; loading without MTP")
        cfg = cfg.replace(num_nextn_predict_layers=0)
    cfg = cfg.replace(quantization_config=None)
    with torch.device(device):
        model = DeepSeekV3(cfg)
    expected = dict(hf_tensors(model))
    for key in expected:
        if key not in tensors:
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise ValueError(f"missing tensor '{key}' in checkpoint {directory}")
    for key, t in tensors.items():
        if key not in expected:
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise ValueError(f"unexpected tensor '{key}' in {files[key]}")
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ValueError(f"tensor '{key}' in {files[key]} has shape {tuple(t.shape)}, "
                             f"expected {tuple(expected[key].shape)}")
    state = _to_state_dict(model, tensors)
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def _to_state_dict(model: DeepSeekV3, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of hf_tensors: per-expert keys stacked into gate_up_proj / down_proj, MTP keys renamed."""
    cfg = model.cfg
    L = cfg.num_hidden_layers
    state = {}
    for name, ref in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            state[name] = tensors["model.embed_tokens.weight"]
            continue
        m = re.match(r"mtp\.(\d+)\.(.*)", name)
        if m:
            rest = m.group(2)
            rest = rest[len("block."):] if rest.startswith("block.") else rest
            rest = "shared_head.norm.weight" if rest == "norm.weight" else rest
            key = f"model.layers.{L + int(m.group(1))}.{rest}"
        else:
            key = name if name.startswith("lm_head.") else "model." + name
        if key.endswith(".mlp.experts.gate_up_proj"):
            base = key[: -len("gate_up_proj")]
            state[name] = torch.stack([torch.cat([tensors[f"{base}{e}.gate_proj.weight"],
                                                  tensors[f"{base}{e}.up_proj.weight"]]) for e in range(ref.shape[0])])
        elif key.endswith(".mlp.experts.down_proj"):
            base = key[: -len("down_proj")]
            state[name] = torch.stack([tensors[f"{base}{e}.down_proj.weight"] for e in range(ref.shape[0])])
        else:
            state[name] = tensors[key]
    return {k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}
