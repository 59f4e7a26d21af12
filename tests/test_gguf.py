"""`nanoseek convert`: GGUF for llama.cpp (run through llama-cpp-python, logits and greedy text against nanoseek's),
HF dtype conversions (run through transformers), and the failures on corrupt or mismatched checkpoints.

The model is the tiny preset trained for a few dozen steps by nanoseek's own trainer on a slice of the embedded
corpus, with its own byte-level BPE tokenizer: logits are far from uniform and greedy text is corpus-like, so a
swapped, transposed or mis-scaled tensor shows in every comparison.

llama_cpp and transformers are imported inside the tests without importorskip: a missing package fails them.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from nanoseek.cli import main as cli
from nanoseek.config import ModelConfig
from nanoseek.data.corpus import default_corpus
from nanoseek.data.prepare import prepare
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.fp8.quant import weight_dequant, weight_quant
from nanoseek.io import load_hf
from nanoseek.io import gguf as convert
from nanoseek.train.config import load
from nanoseek.train.loop import Trainer

PROMPT = "Q: Where does Ava live? A: Ava lives in the"
GREEDY = 24          # new tokens compared between llama.cpp and nanoseek


# ---- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """HF directory of the tiny preset trained 50 steps (final/ with tokenizer files)."""
    root = tmp_path_factory.mktemp("gguf")
    src = root / "corpus.txt"
    src.write_text("\n\n".join(default_corpus(n_docs=600)))
    prepare([str(src)], str(root / "data"), vocab_size=400, val_fraction=0.05)
    cfg = load(None, [f"run.out_dir={root / 'run'}", f"data.dir={root / 'data'}", "run.steps=50",
                      "data.batch_size=8", "data.seq_len=64", "eval.every=0", "checkpoint.every=0",
                      "schedule.warmup_steps=3", "optim.lr=1e-2", "eval.batches=1", "logging.progress=false"])
    Trainer(cfg).fit()
    return str(root / "run" / "final")


@pytest.fixture(scope="module")
def model(trained):
    return load_hf(trained).eval()


@pytest.fixture(scope="module")
def tok(trained):
    return Tokenizer.from_dir(trained)


@pytest.fixture(scope="module")
def gguf_files(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    out = {}
    for t in convert.GGUF_TYPES:
        out[t] = str(root / f"tiny-{t}.gguf")
        assert cli(["convert", "--to", "gguf", "--ckpt", trained, "--out", out[t], "--type", t]) == 0
    return out


def _llama(path, n_ctx=256):
    import llama_cpp   # not importorskip: without llama-cpp-python these tests fail
    # f32 K/V cache (the default f16 cache would add its own rounding), no flash attention, all logits kept
    # one thread: the models are tiny, and a second OpenMP team spinning next to torch's only slows both down
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=1, n_threads_batch=1,
                           logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False)


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)


def _ours(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _greedy_llama(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def _greedy_ours(model, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- GGUF: metadata -------------------------------------------------------------------------------------------------
def test_gguf_metadata_and_tensors(trained, gguf_files, model, tok):
    import gguf
    cfg = ModelConfig.from_json(trained)
    r = gguf.GGUFReader(gguf_files["f32"])
    f = {k: v.contents() for k, v in r.fields.items()}
    a = "deepseek2."
    assert f["general.architecture"] == "deepseek2" and f["general.file_type"] == gguf.LlamaFileType.ALL_F32
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    expect = {"block_count": L + D, "nextn_predict_layers": D, "context_length": cfg.max_position_embeddings,
              "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
              "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": 1,
              "attention.q_lora_rank": cfg.q_lora_rank, "attention.kv_lora_rank": cfg.kv_lora_rank,
              "attention.key_length": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
              "attention.value_length": cfg.kv_lora_rank,
              "attention.key_length_mla": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
              "attention.value_length_mla": cfg.v_head_dim, "rope.dimension_count": cfg.qk_rope_head_dim,
              "leading_dense_block_count": cfg.first_k_dense_replace, "expert_count": cfg.n_routed_experts,
              "expert_used_count": cfg.num_experts_per_tok, "expert_shared_count": cfg.n_shared_experts,
              "expert_feed_forward_length": cfg.moe_intermediate_size, "expert_group_count": cfg.n_group,
              "expert_group_used_count": cfg.topk_group, "expert_weights_norm": True,
              "expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID), "vocab_size": cfg.vocab_size}
    for k, v in expect.items():
        assert f[a + k] == v, k
    assert f[a + "expert_weights_scale"] == pytest.approx(cfg.routed_scaling_factor)
    assert f[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert f[a + "rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert a + "rope.scaling.type" not in f     # the trained model has plain RoPE (YaRN: test_gguf_variants)
    # tokenizer: every id, the merges, special ids, the chat template
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    types = f["tokenizer.ggml.token_type"]
    assert all(types[tok.token_to_id(s)] == gguf.TokenType.CONTROL for s in ("<|user|>", "<think>", tok.eos_token))
    assert types[tok.encode("the")[0]] == gguf.TokenType.NORMAL
    merges = json.load(open(os.path.join(trained, "tokenizer.json")))["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (tok.bos_id, tok.eos_id)
    assert f["tokenizer.ggml.padding_token_id"] == tok.pad_id and f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == tok.chat_template
    # tensors: values against the model's (numpy shape = ggml ne reversed)
    t = {x.name: x for x in r.tensors}

    def arr(name):
        x = t[name]
        return torch.from_numpy(np.array(x.data).reshape(list(reversed([int(n) for n in x.shape]))))

    sd = model.state_dict()
    assert torch.equal(arr("token_embd.weight"), sd["embed_tokens.weight"])
    assert torch.equal(arr("output.weight"), sd["lm_head.weight"])
    nh, nope, vd = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    kv_b = sd["layers.1.self_attn.kv_b_proj.weight"].view(nh, nope + vd, -1)
    assert torch.equal(arr("blk.1.attn_k_b.weight"), kv_b[:, :nope].transpose(1, 2))   # (nh, kv_lora, nope)
    assert torch.equal(arr("blk.1.attn_v_b.weight"), kv_b[:, nope:])                    # (nh, v, kv_lora)
    assert torch.equal(arr("blk.2.exp_probs_b.bias"), sd["layers.2.mlp.gate.e_score_correction_bias"])
    assert sd["layers.2.mlp.gate.e_score_correction_bias"].abs().sum() > 0      # training moved the balance bias
    gate_up = sd["layers.2.mlp.experts.gate_up_proj"]
    inter = cfg.moe_intermediate_size
    assert torch.equal(arr("blk.2.ffn_gate_exps.weight"), gate_up[:, :inter])
    assert torch.equal(arr("blk.2.ffn_up_exps.weight"), gate_up[:, inter:])
    assert torch.equal(arr("blk.2.ffn_down_exps.weight"), sd["layers.2.mlp.experts.down_proj"])
    # MTP depth 1 as block L with its nextn tensors; the embedding / head copies equal the shared ones: left out
    assert torch.equal(arr(f"blk.{L}.nextn.eh_proj.weight"), sd["mtp.0.eh_proj.weight"])
    assert torch.equal(arr(f"blk.{L}.nextn.shared_head_norm.weight"), sd["mtp.0.norm.weight"])
    assert torch.equal(arr(f"blk.{L}.ffn_gate_inp.weight"), sd["mtp.0.block.mlp.gate.weight"])
    assert f"blk.{L}.nextn.embed_tokens.weight" not in t and f"blk.{L}.nextn.shared_head_head.weight" not in t
    n_params = sum(int(np.prod([int(n) for n in x.shape])) for x in r.tensors)
    assert n_params == sum(v.numel() for v in sd.values())     # every weight once (MTP included, no copies)
    # q8_0: matrices Q8_0 (rows of 16, attn_k_b here, fall back to F16), norms / router / bias F32
    q = {x.name: x.tensor_type for x in gguf.GGUFReader(gguf_files["q8_0"]).tensors}
    Q = gguf.GGMLQuantizationType
    assert q["blk.1.ffn_gate_exps.weight"] == Q.Q8_0 and q["token_embd.weight"] == Q.Q8_0
    assert q["blk.1.attn_k_b.weight"] == Q.F16 and q["blk.1.ffn_gate_inp.weight"] == Q.F32
    assert q["blk.1.exp_probs_b.bias"] == Q.F32 and q["output_norm.weight"] == Q.F32
    assert {x.tensor_type for x in gguf.GGUFReader(gguf_files["bf16"]).tensors} == {Q.BF16, Q.F32}


# ---- GGUF in llama.cpp ---------------------------------------------------------------------------------------------
def test_llama_cpp_tokenizes_like_nanoseek(gguf_files, tok):
    """The gpt2 vocab + 'gpt-2' pre-tokenizer split and merge exactly as tokenizer.json does."""
    llm = _llama(gguf_files["f32"])
    texts = [PROMPT, "Mia has 3 red apples. She gives 1 to Tom. Now Mia has", "6 + 7 = 13, 120 + 45 = 165",
             "  two  spaces,\ttab\nnew line\n\n\nthree   ", "don't won't it's we're I'll you've they'd",
             "Ünïcödé ñ 日本語 emoji 🙂 — dash «quotes»",
             "CamelCase snake_case x=y+z*(a-b)/c; f(x)[0]{1}",
             tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Where does Ava live?"},
                                      {"role": "assistant", "content": "<think>Ava</think>In the town."},
                                      {"role": "user", "content": "And Leo?"}])]
    for text in texts:
        ours = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours, text
        assert llm.detokenize(ours, special=True).decode() == text
    assert llm.token_bos() == tok.bos_id and llm.token_eos() == tok.eos_id


def test_llama_cpp_f32_logits_and_greedy(gguf_files, model, tok):
    llm = _llama(gguf_files["f32"])
    ids = tok.encode(PROMPT)
    got, ref = _llama_logits(llm, ids), _ours(model, ids)
    assert ref.std() > 1.0                       # trained: far from uniform
    print(f"f32: max |dlogit| {(got - ref).abs().max():.3g}, relative {_rel(got, ref):.3g}")
    # f32 everywhere (weights, K/V cache, activations): the only differences are summation order and ggml's
    # vectorized exp/silu, ~1e-7 relative per op; through 3 layers + MoE routing we measure ~3e-7 of the logit
    # range, so 1e-5 leaves a 30x margin for other CPUs' SIMD paths while any wrong layout, scale or routing
    # (O(1e-1) and more) fails it.
    assert _rel(got, ref) < 1e-5, _rel(got, ref)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    ours = _greedy_ours(model, ids, GREEDY)
    print(f"greedy: {PROMPT!r} -> {tok.decode(ours)!r}")
    assert _greedy_llama(llm, ids, GREEDY) == ours
    assert len(set(ours)) > 3 and tok.decode(ours).strip()


def _pos_err(a, b):
    """Per position: max |a - b| over the vocab, relative to the reference's logit range."""
    return (a - b).abs().amax(-1) / b.abs().max()


# Reduced precision moves every logit a little, and where two experts' routing scores are nearly tied a rounded
# weight can flip the top-k choice at a position, which moves that position's logits by O(0.1): so most positions
# (not all) must be within `tol`. Measured per-position error, median / max over positions: f16 1.4e-4 / 2.3e-4,
# bf16 1.1e-3 / 1.9e-3, q8_0 3.9e-3 / 3.5e-2 of the logit range (a 20-step model once gave q8_0 a 0.12 position:
# a flipped expert), from weight rounding (2^-11, 2^-8, ~2^-8 of a block's max) plus llama.cpp rounding the
# activations to f16 / bf16 / q8_0 in its matmuls. Each tol is ~5-10x the median error, which must stay below tol/2.
@pytest.mark.parametrize("kind,tol", [("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 3e-2)])
def test_llama_cpp_reduced_precision(gguf_files, model, tok, kind, tol):
    """f16 / bf16 / q8_0 weights: logits near nanoseek's; greedy picks what nanoseek ranks (near) first."""
    llm = _llama(gguf_files[kind])
    ids = tok.encode(PROMPT + " town. Q: What pet does Tom have? A: Tom has a")
    got, ref = _llama_logits(llm, ids), _ours(model, ids)
    err = _pos_err(got, ref)
    print(f"{kind}: per-position relative error median {err.median():.3g}, max {err.max():.3g}")
    assert (err < tol).float().mean() >= 0.9, err
    assert err.median() < tol / 2, err
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    # llama.cpp's greedy continuation, scored by nanoseek (teacher-forced on llama.cpp's tokens): every pick is
    # nanoseek's argmax or within tol of it
    theirs = _greedy_llama(llm, ids, 12)
    scored = _ours(model, ids + theirs)[len(ids) - 1: -1]
    picked = scored.gather(-1, torch.tensor(theirs)[:, None])[:, 0]
    assert ((scored.max(-1).values - picked) <= tol * ref.abs().max()).all(), (theirs, scored.argmax(-1))
    assert (scored.argmax(-1) == torch.tensor(theirs)).float().mean() >= 0.75


def test_llama_cpp_loads_the_mtp_layer(trained, gguf_files):
    """With load_mtp, llama.cpp creates block L and its nextn tensors, checking every shape against deepseek2's."""
    import llama_cpp
    cfg = ModelConfig.from_json(trained)
    llama_cpp.llama_backend_init()
    for kind in ("f32", "q8_0"):
        params = llama_cpp.llama_model_default_params()
        params.load_mtp = True
        m = llama_cpp.llama_model_load_from_file(gguf_files[kind].encode(), params)
        assert m, kind
        try:
            assert llama_cpp.llama_model_n_layer_nextn(m) == cfg.num_nextn_predict_layers == 1
            assert llama_cpp.llama_model_n_layer(m) == cfg.num_hidden_layers
        finally:
            llama_cpp.llama_model_free(m)


def _variant(trained, root, **overrides):
    d = os.path.join(root, "-".join(overrides) or "plain")
    shutil.copytree(trained, d)
    conf = json.load(open(os.path.join(d, "config.json")))
    conf.pop("rope_parameters", None)
    conf.update(overrides)
    json.dump(conf, open(os.path.join(d, "config.json"), "w"))
    return d


@pytest.mark.parametrize("overrides", [
    # DeepSeek-V3's YaRN (mscale == mscale_all_dim == 1) at a short original context so it matters at T~40
    {"rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 16, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}},
    # V2-Lite's YaRN (mscale == mscale_all_dim == 0.707)
    {"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 8, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}},
    # half-split RoPE pairs: the export permutes q_b / kv_a rope rows into llama.cpp's adjacent pairs
    {"rope_interleave": False},
])
def test_gguf_variants(trained, tmp_path, tok, overrides):
    """The same weights read under other RoPE configs: llama.cpp matches nanoseek under each (f32)."""
    import gguf
    d = _variant(trained, str(tmp_path), **overrides)
    out = str(tmp_path / "v.gguf")
    convert.export_gguf(d, out, "f32")
    f = {k: v.contents() for k, v in gguf.GGUFReader(out).fields.items()}
    if "rope_scaling" in overrides:
        rs = overrides["rope_scaling"]
        assert f["deepseek2.rope.scaling.type"] == "yarn"
        assert f["deepseek2.rope.scaling.factor"] == pytest.approx(rs["factor"])
        assert f["deepseek2.rope.scaling.original_context_length"] == rs["original_max_position_embeddings"]
        assert f["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * rs["mscale_all_dim"])
    model = load_hf(d).eval()
    ids = tok.encode(PROMPT + " town. Q: What pet does Tom have? A:")
    got, ref = _llama_logits(_llama(out), ids), _ours(model, ids)
    plain = _ours(load_hf(trained).eval(), ids)
    print(f"{list(overrides)}: relative {_rel(got, ref):.3g} (vs the plain model {_rel(plain, ref):.3g})")
    assert _rel(plain, ref) > 1e-2           # the variant really changes the model's output
    assert _rel(got, ref) < 1e-5, _rel(got, ref)


def test_gguf_v2_lite_like_random_weights(trained, tmp_path, tok):
    """The other branches, on random weights: no q compression (attn_q), tied embeddings (no output.weight), MoE
    from layer 0, 2 shared experts, one group, unnormalized top-k, V2-Lite's YaRN, no MTP, and a vocab larger than
    the tokenizer's (padded with unused tokens)."""
    import gguf

    from nanoseek.config import preset
    from nanoseek.io import save_hf

    from .helpers import random_model
    cfg = preset("tiny", vocab_size=512, q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0,
                 norm_topk_prob=False, tie_word_embeddings=True, n_shared_experts=2, routed_scaling_factor=1.0,
                 num_nextn_predict_layers=0, qk_nope_head_dim=32, v_head_dim=32,
                 rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                               "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
    model = random_model(cfg)
    d = str(tmp_path / "v2lite")
    save_hf(model, d)
    Tokenizer.from_dir(trained).save(d)        # (not the shared fixture: save() rebinds its directory)
    out = str(tmp_path / "v2lite.gguf")
    convert.export_gguf(d, out, "f32")
    r = gguf.GGUFReader(out)
    names = {t.name for t in r.tensors}
    f = {k: v.contents() for k, v in r.fields.items()}
    assert "blk.0.attn_q.weight" in names and "blk.0.attn_q_a.weight" not in names and "output.weight" not in names
    assert f["deepseek2.leading_dense_block_count"] == 0 and f["deepseek2.attention.q_lora_rank"] == 0
    assert "deepseek2.expert_weights_norm" not in f and len(f["tokenizer.ggml.tokens"]) == 512
    assert f["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED
    ids = tok.encode(PROMPT + " town. Q: What pet does Tom have? A:")
    got, ref = _llama_logits(_llama(out), ids), _ours(model, ids)
    print(f"v2-lite-like: relative {_rel(got, ref):.3g}")
    assert _rel(got, ref) < 1e-5, _rel(got, ref)
    bad = cfg.replace(rope_scaling={**cfg.rope_scaling, "mscale": 1.0})   # mscale != mscale_all_dim
    bad.save(d)
    with pytest.raises(ValueError, match="mscale"):
        convert.export_gguf(d, str(tmp_path / "bad.gguf"), "f32")
    assert not os.path.exists(tmp_path / "bad.gguf")


def test_gguf_from_fp8_checkpoint_and_no_mtp(trained, tmp_path, tok):
    """An FP8 checkpoint (E4M3 + weight_scale_inv) exports its dequantized weights; --no-mtp drops block L."""
    import gguf
    fp8 = str(tmp_path / "fp8")
    assert cli(["convert", "--to", "hf", "--ckpt", trained, "--out", fp8, "--dtype", "fp8"]) == 0
    out = str(tmp_path / "fp8.gguf")
    assert cli(["convert", "--to", "gguf", "--ckpt", fp8, "--out", out, "--type", "f32", "--no-mtp"]) == 0
    r = gguf.GGUFReader(out)
    f = {k: v.contents() for k, v in r.fields.items()}
    L = ModelConfig.from_json(trained).num_hidden_layers
    assert f["deepseek2.block_count"] == L and "deepseek2.nextn_predict_layers" not in f
    assert not any(t.name.startswith(f"blk.{L}.") for t in r.tensors)
    model = load_hf(fp8).eval()               # the same dequantized weights
    orig = load_hf(trained).state_dict()
    w = orig["layers.1.self_attn.q_b_proj.weight"]
    assert torch.equal(model.state_dict()["layers.1.self_attn.q_b_proj.weight"], weight_dequant(*weight_quant(w)))
    ids = tok.encode(PROMPT)
    got, ref = _llama_logits(_llama(out), ids), _ours(model, ids)
    assert _rel(got, ref) < 1e-5, _rel(got, ref)


# ---- HF conversions through transformers ---------------------------------------------------------------------------
def _hf_logits(d, ids):
    import transformers   # not importorskip
    m = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return m.eval()(torch.tensor([ids])).logits[0]


def test_convert_hf_dtypes_through_transformers(trained, tmp_path, model, tok):
    from safetensors import safe_open
    ids = tok.encode(PROMPT)
    ref = _ours(model, ids)
    outs = {}
    for dtype in ("fp32", "bf16", "fp8"):
        outs[dtype] = str(tmp_path / dtype)
        assert cli(["convert", "--to", "hf", "--ckpt", trained, "--out", outs[dtype], "--dtype", dtype]) == 0
        assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(os.listdir(outs[dtype]))
        assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    with safe_open(os.path.join(outs["fp8"], "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.self_attn.q_b_proj.weight").dtype == torch.float8_e4m3fn
        assert "model.layers.1.self_attn.q_b_proj.weight_scale_inv" in f.keys()
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    with safe_open(os.path.join(outs["bf16"], "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert json.load(open(os.path.join(outs["fp8"], "config.json")))["quantization_config"]["quant_method"] == "fp8"
    # fp32: the same model in transformers
    assert _rel(_hf_logits(outs["fp32"], ids), ref) < 1e-4
    # bf16: transformers and nanoseek agree on the rounded weights; both near the fp32 model at most positions
    # (a bf16-rounded router weight may flip a near-tied expert choice at one, see test_llama_cpp_reduced_precision)
    bf16 = _hf_logits(outs["bf16"], ids)
    assert _rel(bf16, _ours(load_hf(outs["bf16"]).eval(), ids)) < 1e-4
    err = _pos_err(bf16, ref)
    assert err.max() > 0 and (err < 1e-2).float().mean() >= 0.9 and err.median() < 5e-3, err
    # fp8 -> bf16 back: transformers loads it; close to the original (E4M3 has a 3-bit mantissa)
    back = str(tmp_path / "back")
    assert cli(["convert", "--to", "hf", "--ckpt", outs["fp8"], "--out", back, "--dtype", "bf16"]) == 0
    fp8_logits = _ours(load_hf(outs["fp8"]).eval(), ids)
    err = _pos_err(_hf_logits(back, ids), fp8_logits)          # bf16 rounding of the FP8 model's other tensors
    assert (err < 1e-2).float().mean() >= 0.9, err
    err = _pos_err(fp8_logits, ref)                              # E4M3 has a 3-bit mantissa
    print(f"fp8 vs fp32: per-position relative error median {err.median():.3g}, max {err.max():.3g}")
    assert err.median() < 0.1 and (fp8_logits.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8, err


# ---- failures: clear errors, no output ----------------------------------------------------------------------------
def _broken(trained, root, how):
    d = os.path.join(root, how)
    shutil.copytree(trained, d)
    st = os.path.join(d, "model.safetensors")
    if how == "truncated":
        with open(st, "r+b") as f:
            f.truncate(os.path.getsize(st) // 2)
        return d, "model.safetensors"
    if how == "garbage_config":
        open(os.path.join(d, "config.json"), "w").write("{not json")
        return d, "config.json"
    from safetensors.torch import load_file, save_file
    sd = load_file(st)
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    if how == "missing":
        del sd[key]
    elif how == "shape":
        sd[key] = sd[key][:, :-1].contiguous()
    elif how == "unexpected":
        sd["model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
        key = "model.layers.1.self_attn.extra.weight"
    elif how == "fp8_no_scale":
        sd[key] = sd[key].to(torch.float8_e4m3fn)
    elif how == "vocab":   # config.json from another model: vocab_size disagrees with the stored weights
        conf = json.load(open(os.path.join(d, "config.json")))
        conf["vocab_size"] = 300
        json.dump(conf, open(os.path.join(d, "config.json"), "w"))
        return d, "expected (300, 64)"
    save_file(sd, st)
    return d, key


@pytest.mark.parametrize("how", ["truncated", "garbage_config", "missing", "shape", "unexpected", "fp8_no_scale",
                                 "vocab"])
@pytest.mark.parametrize("to", ["gguf", "hf"])
def test_corrupt_checkpoint_fails_cleanly(trained, tmp_path, capsys, how, to):
    d, needle = _broken(trained, str(tmp_path), how)
    out_root = tmp_path / "outs"
    out_root.mkdir()
    out = str(out_root / ("m.gguf" if to == "gguf" else "hf"))
    capsys.readouterr()
    assert cli(["convert", "--to", to, "--ckpt", d, "--out", out]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoseek convert: error:") and "\n" not in err and needle in err, err
    assert os.listdir(out_root) == []          # no output, no temporary left behind


def test_gguf_tokenizer_mismatch(trained, tmp_path, capsys):
    """A tokenizer with more tokens than the model's vocab, or one llama.cpp cannot pre-tokenize alike."""
    from nanoseek.data.tokenizer import train_tokenizer
    big = train_tokenizer(default_corpus(n_docs=300), vocab_size=2000)
    assert big.vocab_size > ModelConfig.from_json(trained).vocab_size
    big.save(str(tmp_path / "big"))
    out = tmp_path / "outs"
    out.mkdir()
    assert cli(["convert", "--to", "gguf", "--ckpt", trained, "--out", str(out / "m.gguf"),
                "--tokenizer", str(tmp_path / "big")]) == 1
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "does not fit the model's vocab_size" in err
    odd = tmp_path / "odd"
    shutil.copytree(trained, odd)
    tj = json.load(open(odd / "tokenizer.json"))
    tj["pre_tokenizer"]["add_prefix_space"] = True         # llama.cpp's gpt2 vocab has no prefix-space option
    json.dump(tj, open(odd / "tokenizer.json", "w"))
    assert cli(["convert", "--to", "gguf", "--ckpt", str(odd), "--out", str(out / "m.gguf")]) == 1
    assert "no known llama.cpp pre-tokenizer" in capsys.readouterr().err
    assert os.listdir(out) == []


def test_failure_while_writing_leaves_no_file(trained, tmp_path, monkeypatch):
    """A failure after the header was written (here: the 20th tensor) removes the temporary file."""
    calls = {"n": 0}
    real = convert._encode

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk full (simulated)")
        return real(*a)

    monkeypatch.setattr(convert, "_encode", flaky)
    out = tmp_path / "m.gguf"
    with pytest.raises(OSError, match="disk full"):
        convert.export_gguf(trained, str(out), "q8_0")
    assert os.listdir(tmp_path) == [] and calls["n"] == 20


def test_convert_refuses_existing_outputs(trained, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    assert cli(["convert", "--to", "hf", "--ckpt", trained, "--out", str(tmp_path / "taken")]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]
    assert cli(["convert", "--to", "gguf", "--ckpt", trained, "--out", str(tmp_path / "taken")]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert cli(["convert", "--to", "gguf", "--ckpt", trained, "--out", str(tmp_path / "m.gguf"), "--dtype", "fp8"]) == 1
    assert "--dtype does not apply to --to gguf" in capsys.readouterr().err
    assert cli(["convert", "--to", "hf", "--ckpt", trained, "--out", str(tmp_path / "hf"), "--type", "q8_0"]) == 1
    assert "--type does not apply to --to hf" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["taken"]
