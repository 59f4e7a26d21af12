"""Checkpoint conversions behind `nanoseek convert`: GGUF for llama.cpp / LM Studio, and HF dtype changes.

GGUF (`export_gguf`): an HF `deepseek_v3` directory (ours or DeepSeek's, FP8 `weight_scale_inv` included) becomes
one file for llama.cpp's `deepseek2` architecture, the one llama.cpp runs DeepSeek-V2/V3 with:

  * MLA in llama.cpp's absorbed form: `attention.head_count_kv` = 1, key_length = kv_lora_rank + qk_rope_head_dim,
    value_length = kv_lora_rank, the real per-head sizes under key_length_mla / value_length_mla, and kv_b_proj
    split per head into attn_k_b (n_head, kv_lora_rank, qk_nope_head_dim; W_UK transposed) and
    attn_v_b (n_head, v_head_dim, kv_lora_rank), the layout current llama.cpp loads (it no longer reads attn_kv_b).
  * RoPE on qk_rope_head_dim dims, adjacent pairs (llama.cpp's "norm" rope = DeepSeek's interleaved layout; a
    checkpoint with rope_interleave=false gets its rope rows permuted into that layout); YaRN as rope.scaling.*,
    with mscale_all_dim as `rope.scaling.yarn_log_multiplier` = 0.1·mscale_all_dim (llama.cpp divides by 0.1).
  * DeepSeekMoE: sigmoid gating, exp_probs_b = e_score_correction_bias (selection only), group-limited routing
    (expert_group_count / expert_group_used_count), expert_weights_norm / expert_weights_scale, experts stacked
    into ffn_{gate,up,down}_exps, shared experts as ffn_*_shexp.
  * MTP depth k as block num_hidden_layers+k with its nextn.* tensors; block_count counts them and
    nextn_predict_layers says how many (llama.cpp skips them unless asked to load MTP). mtp=False drops them.
  * the byte-level BPE tokenizer as `gpt2` with its merges, special tokens as CONTROL, bos/eos/pad ids, and the
    chat template; the pre-tokenizer type is derived from tokenizer.json (ours, ByteLevel with the GPT-2 regex,
    is llama.cpp's "gpt-2").

Tensors are read one at a time from the safetensors files (FP8 ones dequantized with io.hf's helpers) and streamed
into `.OUT.tmp-PID` next to the output, renamed at the end: memory stays near the largest tensor (a layer's experts
are encoded one expert at a time into the stacked output), and a failure leaves no output. The whole checkpoint is
checked (every key, shape, FP8 scale) before the file is created, with errors that name the file and the tensor.

HF (`convert_hf`): load_hf, then save_hf as bf16, fp32 or FP8 (E4M3 + 128×128 scales), into a temporary directory
renamed at the end. This path holds the whole model in memory (fp32), as load_hf does.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ModelConfig
from . import hf

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
HF_DTYPES = ("bf16", "fp32", "fp8")
ARCH = "deepseek2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the `gguf` package: pip install 'nanoseek[gguf]'") from None
    return gguf


# ---- the source checkpoint, read tensor by tensor ---------------------------------------------------------------
class _Checkpoint:
    """Validates a checkpoint directory against its config without reading tensor data, then serves tensors
    one at a time as fp32 (FP8 weights dequantized)."""

    def __init__(self, directory: str, cfg: ModelConfig, mtp: bool):
        from safetensors import safe_open
        self.directory = directory
        self.files = hf._weight_files(directory)           # key -> file; errors name the index / directory
        present: dict[str, tuple[tuple[int, ...], str]] = {}
        by_file: dict[str, list[str]] = {}
        for key, path in self.files.items():
            by_file.setdefault(path, []).append(key)
        for path, keys in by_file.items():
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} (listed in {hf.INDEX}) is missing")
            stored = set(hf._keys_of(path))                  # raises "not a readable safetensors file"
            try:
                with safe_open(path, framework="pt") as f:
                    for key in keys:
                        if key not in stored:
                            raise ValueError(f"tensor '{key}' is listed in {hf.INDEX} but not stored in {path}")
                        s = f.get_slice(key)
                        present[key] = (tuple(s.get_shape()), s.get_dtype())
            except ValueError:
                raise
            except Exception as e:
                raise ValueError(f"{path}: failed reading tensor headers ({e})") from None
        has_mtp = any(hf._is_mtp_key(k, cfg) for k in present)
        if cfg.num_nextn_predict_layers and not has_mtp:
            cfg = cfg.replace(num_nextn_predict_layers=0)   # as load_hf: transformers-saved dirs have no MTP layers
        self.stored_cfg = cfg.replace(quantization_config=None)
        with torch.device("meta"):
            from ..model import DeepSeekV3
            expected = {k: tuple(t.shape) for k, t in hf.hf_tensors(DeepSeekV3(self.stored_cfg))}
        if cfg.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
        for key, shape in expected.items():
            if key not in present:
                raise ValueError(f"missing tensor '{key}' in checkpoint {directory}")
        for key, (shape, dtype) in present.items():
            if key.endswith(".weight_scale_inv"):
                w = key[: -len("_scale_inv")]
                if w not in present:
                    raise ValueError(f"unexpected tensor '{key}' in {self.files[key]}: no matching weight")
                ws = present[w][0]
                want = tuple(-(-d // 128) for d in ws)
                if len(ws) != 2 or shape != want:
                    raise ValueError(f"tensor '{key}' in {self.files[key]} has shape {shape}, expected {want} "
                                     f"for the {ws} weight with 128x128 blocks")
                continue
            if key not in expected:
                if key == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                raise ValueError(f"unexpected tensor '{key}' in {self.files[key]}")
            if shape != expected[key]:
                raise ValueError(f"tensor '{key}' in {self.files[key]} has shape {shape}, expected {expected[key]}")
            if dtype.startswith("F8") and key + "_scale_inv" not in present:
                raise ValueError(f"FP8 tensor '{key}' in {self.files[key]} has no '{key}_scale_inv'")
        self.cfg = self.stored_cfg if mtp else self.stored_cfg.replace(num_nextn_predict_layers=0)
        self._open: dict[str, object] = {}

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open
        path = self.files[key]
        f = self._open.get(path)
        if f is None:
            f = self._open[path] = safe_open(path, framework="pt")
        return f.get_tensor(key)

    def get(self, key: str) -> torch.Tensor:
        try:
            t = self.read(key)
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                from ..fp8.quant import weight_dequant
                t = weight_dequant(t, self.read(key + "_scale_inv"))
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{self.files[key]}: failed reading tensor '{key}' ({e})") from None
        return t.float()

    def close(self):
        self._open.clear()


# ---- tokenizer --------------------------------------------------------------------------------------------------
def _pre_tokenizer_type(tj: dict, path: str) -> str:
    """The llama.cpp pre-tokenizer that splits text as tokenizer.json does."""
    pre, norm = tj.get("pre_tokenizer"), tj.get("normalizer")
    if norm is not None:
        raise ValueError(f"{path}: normalizer {norm.get('type')!r} has no llama.cpp equivalent "
                         f"(pass tokenizer_pre=NAME to override)")
    if (pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)):
        return "gpt-2"   # GPT-2's regex, then bytes -> unicode: llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2
    raise ValueError(f"{path}: no known llama.cpp pre-tokenizer matches {pre!r} "
                     f"(pass tokenizer_pre=NAME, e.g. 'deepseek-v3' for DeepSeek's tokenizer)")


def _add_tokenizer(writer, gguf, tok_dir: str, vocab_size: int, tokenizer_pre: str | None) -> dict:
    import json

    from ..data.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tok_dir)
    path = os.path.join(tok_dir, "tokenizer.json")
    tj = json.loads(tok.tok.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: GGUF export supports byte-level BPE tokenizers, got {model.get('type')!r}")
    pre = tokenizer_pre or _pre_tokenizer_type(tj, path)
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"{path}: token id {max(vocab.values())} does not fit the model's vocab_size {vocab_size}")
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        a = added.get(i)
        types[i] = (gguf.TokenType.NORMAL if a is None else
                    gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, fn in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id)):
        i = getattr(tok, f"{name}_id")
        if i is not None:
            fn(i)
    writer.add_add_bos_token(False)   # nanoseek's encode never adds bos on its own; prompts carry what they need
    writer.add_add_eos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
    return {"tokens": len(vocab), "merges": len(merges), "pre": pre}


# ---- metadata ---------------------------------------------------------------------------------------------------
def _add_hparams(writer, gguf, cfg: ModelConfig, name: str, n_mtp: int) -> None:
    if cfg.n_routed_experts and not cfg.n_shared_experts:
        raise ValueError("config field 'n_shared_experts': llama.cpp's deepseek2 needs at least one shared expert "
                         f"(got {cfg.n_shared_experts})")
    L = cfg.num_hidden_layers
    w = writer
    w.add_name(name)
    w.add_block_count(L + n_mtp)
    if n_mtp:
        w.add_nextn_predict_layers(n_mtp)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)                         # MLA runs as MQA over the latent in llama.cpp
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    # 0 = no q compression (q_proj, as V2-Lite): llama.cpp then loads attn_q; it requires the key unless the
    # layer count is one of its hard-coded "lite" ones
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_type == "yarn":
        rs = cfg.rope_scaling
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        # llama.cpp's deepseek2 takes mscale = mscale_all_dim (llama-context.cpp: it assumes mscale 1 unless
        # mscale_all_dim != 1, then mscale_all_dim), so RoPE's magnitude is 1 and the softmax scale carries
        # mscale(factor, mscale_all_dim)²: nanoseek (and HF) compute the same only when both are set and equal,
        # as in DeepSeek-V2/V3's configs (1.0 / 1.0, 0.707 / 0.707)
        if not mscale_all or mscale != mscale_all:
            raise ValueError(f"config field 'rope_scaling': llama.cpp's deepseek2 computes YaRN like nanoseek only "
                             f"when mscale and mscale_all_dim are set and equal, got {rs}")
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(rs.get("beta_fast") or 32))
        w.add_rope_scaling_yarn_beta_slow(float(rs.get("beta_slow") or 1))
        w.add_rope_scaling_yarn_log_mul(0.1 * float(mscale_all))
    moe = cfg.n_routed_experts > 0
    w.add_leading_dense_block_count(min(cfg.first_k_dense_replace, L) if moe else L + n_mtp)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    if moe:
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        if cfg.norm_topk_prob:
            w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)


# ---- tensors ----------------------------------------------------------------------------------------------------
@dataclass
class _Tensor:
    name: str                                   # GGUF name
    shape: tuple[int, ...]                      # numpy order (ggml's ne reversed)
    make: Callable[[], torch.Tensor]            # fp32, `shape`; stacked: an iterator of the shape[1:] slices
    keep_f32: bool = False                      # norms, router, bias: always F32
    stacked: bool = False                       # experts: read, encoded and placed one expert at a time


def _rope_perm(d: int) -> torch.Tensor:
    """(x_0..x_{d/2-1}, x_{d/2}..) pairs -> adjacent pairs (x_0, x_{d/2}, x_1, x_{d/2+1}, ...)."""
    return torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=-1).flatten()


def _plan(ck: _Checkpoint, gguf) -> list[_Tensor]:
    cfg = ck.cfg
    T, N = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    H, V, nh = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    nope, rope, vd, kvr = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    get = ck.get
    out: list[_Tensor] = []

    def add(kind, bid, suffix, key_or_fn, shape, keep_f32=False, stacked=False):
        name = N[kind].format(bid=bid) + "." + suffix
        fn = key_or_fn if callable(key_or_fn) else (lambda k=key_or_fn: get(k))
        out.append(_Tensor(name, tuple(shape), fn, keep_f32 or len(shape) == 1, stacked))

    add(T.TOKEN_EMBD, None, "weight", "model.embed_tokens.weight", (V, H))
    add(T.OUTPUT_NORM, None, "weight", "model.norm.weight", (H,))
    if not cfg.tie_word_embeddings:
        add(T.OUTPUT, None, "weight", "lm_head.weight", (V, H))

    def q_rows(t):   # (nh*(nope+rope), in): rope rows of every head into adjacent-pair order
        if cfg.rope_interleave:
            return t
        t = t.view(nh, nope + rope, -1)
        return torch.cat([t[:, :nope], t[:, nope:][:, _rope_perm(rope)]], dim=1).reshape(nh * (nope + rope), -1)

    def kv_a(p):
        t = get(p + "self_attn.kv_a_proj_with_mqa.weight")
        return t if cfg.rope_interleave else torch.cat([t[:kvr], t[kvr:][_rope_perm(rope)]])

    def kv_b(p, part):
        t = get(p + "self_attn.kv_b_proj.weight").view(nh, nope + vd, kvr)
        return t[:, :nope].transpose(1, 2).contiguous() if part == "k" else t[:, nope:].contiguous()

    def experts(p, proj):
        return (get(f"{p}mlp.experts.{e}.{proj}.weight") for e in range(cfg.n_routed_experts))

    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    I, Ie, E = cfg.intermediate_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    for i in range(L + D):
        p = f"model.layers.{i}."
        add(T.ATTN_NORM, i, "weight", p + "input_layernorm.weight", (H,))
        if cfg.q_lora_rank is not None:
            add(T.ATTN_Q_A, i, "weight", p + "self_attn.q_a_proj.weight", (cfg.q_lora_rank, H))
            add(T.ATTN_Q_A_NORM, i, "weight", p + "self_attn.q_a_layernorm.weight", (cfg.q_lora_rank,))
            add(T.ATTN_Q_B, i, "weight", lambda p=p: q_rows(get(p + "self_attn.q_b_proj.weight")),
                (nh * (nope + rope), cfg.q_lora_rank))
        else:
            add(T.ATTN_Q, i, "weight", lambda p=p: q_rows(get(p + "self_attn.q_proj.weight")), (nh * (nope + rope), H))
        add(T.ATTN_KV_A_MQA, i, "weight", lambda p=p: kv_a(p), (kvr + rope, H))
        add(T.ATTN_KV_A_NORM, i, "weight", p + "self_attn.kv_a_layernorm.weight", (kvr,))
        add(T.ATTN_K_B, i, "weight", lambda p=p: kv_b(p, "k"), (nh, kvr, nope))
        add(T.ATTN_V_B, i, "weight", lambda p=p: kv_b(p, "v"), (nh, vd, kvr))
        add(T.ATTN_OUT, i, "weight", p + "self_attn.o_proj.weight", (H, nh * vd))
        add(T.FFN_NORM, i, "weight", p + "post_attention_layernorm.weight", (H,))
        if cfg.is_moe_layer(i):
            add(T.FFN_GATE_INP, i, "weight", p + "mlp.gate.weight", (E, H), keep_f32=True)
            add(T.FFN_EXP_PROBS_B, i, "bias", p + "mlp.gate.e_score_correction_bias", (E,))
            add(T.FFN_GATE_EXP, i, "weight", lambda p=p: experts(p, "gate_proj"), (E, Ie, H), stacked=True)
            add(T.FFN_UP_EXP, i, "weight", lambda p=p: experts(p, "up_proj"), (E, Ie, H), stacked=True)
            add(T.FFN_DOWN_EXP, i, "weight", lambda p=p: experts(p, "down_proj"), (E, H, Ie), stacked=True)
            Is = Ie * cfg.n_shared_experts
            add(T.FFN_GATE_SHEXP, i, "weight", p + "mlp.shared_experts.gate_proj.weight", (Is, H))
            add(T.FFN_UP_SHEXP, i, "weight", p + "mlp.shared_experts.up_proj.weight", (Is, H))
            add(T.FFN_DOWN_SHEXP, i, "weight", p + "mlp.shared_experts.down_proj.weight", (H, Is))
        else:
            add(T.FFN_GATE, i, "weight", p + "mlp.gate_proj.weight", (I, H))
            add(T.FFN_UP, i, "weight", p + "mlp.up_proj.weight", (I, H))
            add(T.FFN_DOWN, i, "weight", p + "mlp.down_proj.weight", (H, I))
        if i >= L:
            add(T.NEXTN_EH_PROJ, i, "weight", p + "eh_proj.weight", (H, 2 * H))
            add(T.NEXTN_ENORM, i, "weight", p + "enorm.weight", (H,))
            add(T.NEXTN_HNORM, i, "weight", p + "hnorm.weight", (H,))
            add(T.NEXTN_SHARED_HEAD_NORM, i, "weight", p + "shared_head.norm.weight", (H,))
            # the embedding / head copies DeepSeek stores per depth: only kept when they differ from the shared
            # ones (llama.cpp falls back to token_embd / output when absent)
            if not torch.equal(ck.read(p + "embed_tokens.weight"), ck.read("model.embed_tokens.weight")):
                add(T.NEXTN_EMBED_TOKENS, i, "weight", p + "embed_tokens.weight", (V, H))
            head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
            if not torch.equal(ck.read(p + "shared_head.head.weight"), ck.read(head)):
                add(T.NEXTN_SHARED_HEAD_HEAD, i, "weight", p + "shared_head.head.weight", (V, H))
    return out


def _encode(t: np.ndarray, qtype, gguf) -> np.ndarray:
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return t
    if qtype == Q.F16:
        return t.astype(np.float16)
    return gguf.quants.quantize(t, qtype)       # BF16 (round to nearest even), Q8_0: uint8 bytes


def _qtype(t: _Tensor, out_type: str, gguf):
    Q = gguf.GGMLQuantizationType
    if t.keep_f32 or out_type == "f32":
        return Q.F32
    if out_type == "q8_0":
        # Q8_0 packs 32 values of a row per block; rows of other lengths fall back to F16 (as llama.cpp's convert)
        return Q.Q8_0 if t.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[out_type]


def _nbytes(shape, qtype, gguf) -> int:
    Q = gguf.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        return int(np.prod(shape)) * (4 if qtype == Q.F32 else 2)
    return int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))


def export_gguf(ckpt: str, out: str, out_type: str = "f16", tokenizer: str | None = None, mtp: bool = True,
                tokenizer_pre: str | None = None, progress: bool | None = None) -> dict:
    """Write `out` (a .gguf file) from the checkpoint directory `ckpt`. tokenizer: directory with tokenizer.json
    (default: ckpt). mtp=False leaves the MTP layers out. Returns a summary dict."""
    gguf = _gguf()
    if out_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {out_type!r}; choose from {', '.join(GGUF_TYPES)}")
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a directory; give the .gguf file to write")
    cfg = ModelConfig.from_json(ckpt)
    ck = _Checkpoint(ckpt, cfg, mtp)
    cfg = ck.cfg
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        name = os.path.basename(os.path.normpath(ckpt))
        _add_hparams(writer, gguf, cfg, name, cfg.num_nextn_predict_layers)
        writer.add_file_type(int(file_type))
        if out_type == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tok_info = _add_tokenizer(writer, gguf, tokenizer or ckpt, cfg.vocab_size, tokenizer_pre)
        plan = _plan(ck, gguf)
        qtypes = [_qtype(t, out_type, gguf) for t in plan]
        for t, q in zip(plan, qtypes):
            Q = gguf.GGMLQuantizationType
            if q in (Q.F32, Q.F16):
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32 if q == Q.F32 else np.float16),
                                       _nbytes(t.shape, q, gguf))
            else:
                writer.add_tensor_info(t.name, gguf.quants.quant_shape_to_byte_shape(t.shape, q), np.dtype(np.uint8),
                                       _nbytes(t.shape, q, gguf), raw_dtype=q)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        from tqdm import tqdm
        total = sum(int(np.prod(t.shape)) for t in plan)
        with tqdm(total=total, unit="param", unit_scale=True, desc=f"GGUF {out_type}",
                  disable=(not progress) if progress is not None else None) as bar:
            for t, q in zip(plan, qtypes):
                arr = None
                # a stacked tensor (a layer's experts) is filled one expert at a time, already encoded: memory is
                # one expert in fp32 plus the encoded stack (for q8_0 ~1/4 of the stack in fp32)
                for j, x in enumerate(t.make() if t.stacked else [t.make()]):
                    want = t.shape[1:] if t.stacked else t.shape
                    if tuple(x.shape) != want:
                        raise ValueError(f"GGUF tensor {t.name}: built shape {tuple(x.shape)}, expected {want}")
                    enc = _encode(x.contiguous().numpy().astype(np.float32, copy=False), q, gguf)
                    if not t.stacked:
                        arr = enc
                    else:
                        if arr is None:
                            arr = np.empty((t.shape[0], *enc.shape), enc.dtype)
                        arr[j] = enc
                    bar.update(x.numel())
                    del x, enc
                writer.write_tensor_data(arr)
                del arr
        writer.close()
        writer = None
        os.replace(tmp, out)
    except BaseException:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        ck.close()
    return {"out": out, "type": out_type, "tensors": len(plan), "params": total,
            "mtp_layers": cfg.num_nextn_predict_layers, "bytes": os.path.getsize(out), **tok_info}


# ---- HF -> HF (dtype) -----------------------------------------------------------------------------------------------
def convert_hf(ckpt: str, out: str, dtype: str = "bf16", progress: bool | None = None) -> dict:
    """Rewrite an HF checkpoint directory as bf16, fp32 or FP8 (E4M3 weights + 128×128 weight_scale_inv; other
    tensors bf16) with io.hf's load_hf / save_hf; tokenizer files are copied. `out` must not exist or be empty."""
    if dtype not in HF_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(HF_DTYPES)}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out {out} exists and is not an empty directory")
    if os.path.abspath(out) == os.path.abspath(ckpt):
        raise ValueError("--out must differ from --ckpt")
    from tqdm import tqdm
    with tqdm(total=3, desc=f"HF {dtype}", disable=(not progress) if progress is not None else None) as bar:
        bar.set_postfix_str("load")
        model = hf.load_hf(ckpt)                     # strict, all-or-nothing; FP8 dequantized
        bar.update()
        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(os.path.normpath(out))}.tmp-{os.getpid()}")
        try:
            bar.set_postfix_str("save")
            torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
            hf.save_hf(model, tmp, dtype=torch_dtype, fp8=dtype == "fp8")
            bar.update()
            for name in TOKENIZER_FILES:
                src = os.path.join(ckpt, name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(tmp, name))
            if os.path.isdir(out):
                os.rmdir(out)                           # empty (checked above)
            os.rename(tmp, out)
            bar.update()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    files = sorted(os.listdir(out))
    return {"out": out, "dtype": dtype, "files": files,
            "bytes": sum(os.path.getsize(os.path.join(out, f)) for f in files)}

