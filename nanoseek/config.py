"""ModelConfig: the DeepSeek-V3 hyper-parameters under HF `deepseek_v3` config.json names.

One dataclass, readable and writable as an HF config.json (both the older `rope_scaling` and the
transformers>=5 `rope_parameters` spellings), plus presets and validation with messages that name the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

ROPE_TYPES = ("default", "yarn")


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432          # dense SwiGLU MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048       # one routed / shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # MLA: low-rank query / key-value compression and the decoupled RoPE dims
    q_lora_rank: int | None = 1536          # None: q = x W_Q directly (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 3
    # Multi-Token Prediction depth D
    num_nextn_predict_layers: int = 1
    # rest
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    quantization_config: dict | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "default"))

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale² under YaRN (mscale = 0.1·mscale_all_dim·ln(factor) + 1)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn":
            factor = self.rope_scaling["factor"]
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0) or 0
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and self.n_routed_experts > 0

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"config field '{name}': {why} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "must be a positive integer")
        for name in ("qk_nope_head_dim", "n_routed_experts", "n_shared_experts", "first_k_dense_replace",
                     "num_nextn_predict_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, "must be a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            bad("q_lora_rank", "must be a positive integer or null")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", "must be positive")
        if self.hidden_act != "silu":
            bad("hidden_act", "only 'silu' (SwiGLU) is supported")
        if self.scoring_func not in ("sigmoid", "softmax"):
            bad("scoring_func", "must be 'sigmoid' or 'softmax'")
        if self.n_routed_experts > 0:
            if self.num_experts_per_tok is None or not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                bad("num_experts_per_tok", f"must be in [1, n_routed_experts={self.n_routed_experts}]")
            if self.n_group is None or self.n_group <= 0:
                bad("n_group", "must be a positive integer")
            if self.n_routed_experts % self.n_group:
                bad("n_routed_experts", f"must be divisible by n_group={self.n_group}")
            if self.topk_group is None or not 1 <= self.topk_group <= self.n_group:
                bad("topk_group", f"must be in [1, n_group={self.n_group}]")
            if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
                bad("n_group", "each group needs at least 2 experts (group score = sum of its top-2)")
            if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
                bad("num_experts_per_tok", "exceeds the experts available in topk_group groups")
            if self.routed_scaling_factor <= 0:
                bad("routed_scaling_factor", "must be positive")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"config field 'rope_scaling.type': unknown rope type {self.rope_type!r}; "
                             f"supported: {', '.join(ROPE_TYPES)}")
        if self.rope_type == "yarn":
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise ValueError(f"config field 'rope_scaling.{key}' is required for yarn")
            if self.rope_scaling["factor"] < 1:
                raise ValueError("config field 'rope_scaling.factor' must be >= 1")
        if self.quantization_config is not None:
            q = self.quantization_config
            if q.get("quant_method") != "fp8" or list(q.get("weight_block_size", [128, 128])) != [128, 128]:
                raise ValueError("config field 'quantization_config': only fp8 with weight_block_size [128, 128] "
                                 f"is supported, got {q}")

    # ---- HF config.json ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        mt = d.get("model_type", "deepseek_v3")
        if mt not in ("deepseek_v3", "deepseek_v2", "nanoseek"):
            raise ValueError(f"config field 'model_type': expected 'deepseek_v3', got {mt!r}")
        # transformers>=5 writes rope_parameters {rope_type, rope_theta, ...}; older configs rope_scaling + rope_theta
        rp = d.pop("rope_parameters", None)
        if rp:
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            rtype = rp.pop("rope_type", rp.pop("type", "default"))
            d.setdefault("rope_scaling", None if rtype == "default" else {"type": rtype, **rp})
        rs = d.get("rope_scaling")
        if rs:
            rs = dict(rs)
            rs["type"] = rs.pop("rope_type", rs.get("type", "default"))
            d["rope_scaling"] = None if rs["type"] == "default" else rs
        if d.get("num_mtp_layers") is not None and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["quantization_config"] is None:
            del d["quantization_config"]
        # written in both spellings so transformers 4.x and 5.x read the same rope
        rs = self.rope_scaling
        d["rope_parameters"] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                                **{k: v for k, v in (rs or {}).items() if k != "type"}}
        d.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
                 num_key_value_heads=self.num_attention_heads, attention_dropout=0.0, use_cache=True)
        return d

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
           "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict[str, Any]] = {
    # a few-hundred-K-parameter model for CPU tests
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                 num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                 first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=1024),
    # DESIGN.md §4 benchmark config: 885M total, ~225M activated
    "small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                  num_hidden_layers=16, num_attention_heads=8, q_lora_rank=512, kv_lora_rank=256,
                  qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, n_shared_experts=1,
                  num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                  first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=4096),
    # DeepSeek-V2-Lite's shapes with V3's sigmoid gate: 15.7B
    "v2-lite": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                    num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                    n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                    norm_topk_prob=False, first_k_dense_replace=1, num_nextn_predict_layers=0,
                    max_position_embeddings=163840,
                    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
    # DeepSeek-V3 671B
    "v3": dict(rope_scaling=V3_YARN),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
