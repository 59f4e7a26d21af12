"""Model behaviour: cached absorbed decoding equals the full forward; gate, MTP and stats shapes."""
import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from nanoseek.config import preset
from nanoseek.infer.cache import LatentCache
from nanoseek.model.mla import MLA, document_mask
from nanoseek.model.rope import inv_frequencies, rope_cos_sin

from .helpers import packed_doc_ids, random_model


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "rope_interleave": False, "n_group": 1,
                                            "topk_group": 1, "first_k_dense_replace": 0}])
def test_cached_decoding_equals_full_forward(overrides):
    cfg = preset("tiny", **overrides)
    model = random_model(cfg)
    lens = [5, 9, 3]
    total = 14
    seqs = [torch.randint(0, cfg.vocab_size, (total,)) for _ in lens]
    with torch.no_grad():
        full = [model(s[None]).logits[0] for s in seqs]
        cache = LatentCache(cfg, batch_size=3, max_len=32)
        T = max(lens)
        prompt = torch.zeros(3, T, dtype=torch.long)
        for b, n in enumerate(lens):
            prompt[b, :n] = seqs[b][:n]
        out = model(prompt, cache=cache, seq_lens=torch.tensor(lens)).logits
        got = [[out[b, :n]] for b, n in enumerate(lens)]
        assert cache.lengths.tolist() == lens
        # then one token per row per step, rows at different positions
        for step in range(total - max(lens)):
            nxt = torch.stack([seqs[b][n + step] for b, n in enumerate(lens)])[:, None]
            step_logits = model(nxt, cache=cache).logits
            for b in range(3):
                got[b].append(step_logits[b])
    for b, n in enumerate(lens):
        g = torch.cat([x.reshape(-1, cfg.vocab_size) for x in got[b]])
        ref = full[b][: g.shape[0]]
        assert ((g - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_cache_overflow_is_an_error():
    cfg = preset("tiny")
    model = random_model(cfg)
    cache = LatentCache(cfg, 1, 4)
    with pytest.raises(ValueError, match="max_len 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_gate_selection_uses_bias_weights_do_not():
    cfg = preset("tiny", n_group=1, topk_group=1, num_experts_per_tok=2)
    model = random_model(cfg)
    gate = model.moe_gates()[0]
    x = torch.randn(16, cfg.hidden_size)
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
        gate.e_score_correction_bias[3] = 10.0   # expert 3 always selected, but its weight is its plain score
        w, idx, scores = gate(x)
    assert (idx == 3).any(dim=1).all()
    s = torch.sigmoid(x @ gate.weight.t())
    sel = s.gather(1, idx)
    assert torch.allclose(w, sel / sel.sum(1, keepdim=True) * cfg.routed_scaling_factor, atol=1e-6)


def test_group_limited_routing_stays_in_topk_groups():
    cfg = preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    gate = random_model(cfg).moe_gates()[0]
    x = torch.randn(64, cfg.hidden_size)
    with torch.no_grad():
        _, idx, scores = gate(x)
    biased = scores + gate.e_score_correction_bias
    group_score = biased.view(64, 4, 4).topk(2, dim=-1).values.sum(-1)
    kept = group_score.topk(2, dim=-1).indices
    for t in range(64):
        assert set((idx[t] // 4).tolist()) <= set(kept[t].tolist())


def test_no_token_dropped_and_loads_sum():
    cfg = preset("tiny")
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    loss = model.loss(ids, ids, mtp_lambda=0.3)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) + cfg.num_nextn_predict_layers
    assert loss.expert_load.shape == (n_moe, cfg.n_routed_experts)
    tokens = torch.tensor([32] * (n_moe - 1) + [30])  # the MTP depth-1 block sees T-1 positions
    assert torch.equal(loss.expert_load.sum(1), tokens.float() * cfg.num_experts_per_tok)


def test_grouped_mm_reference_matches_loop():
    from nanoseek.kernels.grouped_mm import grouped_mm_reference
    x, w = torch.randn(10, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    counts = torch.tensor([4, 0, 6])
    ref = torch.cat([x[:4] @ w[0].t(), x[4:] @ w[2].t()])
    assert torch.allclose(grouped_mm_reference(x, w, counts), ref)


def _naive_moe(moe, x):
    """Token by token, expert by expert: the DeepSeekMoE formula with no sorting or grouping."""
    w, idx, _ = moe.gate(x)
    out = []
    for t in range(x.shape[0]):
        acc = moe.shared_experts(x[t])
        for k in range(idx.shape[1]):
            e = idx[t, k]
            gate_up = moe.experts.gate_up_proj[e] @ x[t]
            g, u = gate_up.chunk(2)
            acc = acc + w[t, k] * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(g) * u))
        out.append(acc)
    return torch.stack(out)


def test_grouped_mm_one_kernel_matches_float64_reference():
    """The path fp32 training takes on CPU (torch._grouped_mm where the build has it), forward and gradients,
    with empty groups and an expanded output gradient."""
    from nanoseek.kernels.grouped_mm import grouped_mm, grouped_mm_reference
    torch.manual_seed(0)
    x, w = torch.randn(40, 24, requires_grad=True), torch.randn(5, 16, 24, requires_grad=True)
    counts = torch.tensor([9, 0, 20, 0, 11])
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    out, ref = grouped_mm(x, w, counts), grouped_mm_reference(x64, w64, counts)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_moe_sorted_grouped_path_matches_naive_forward_and_grad():
    cfg = preset("tiny", n_routed_experts=8, num_experts_per_tok=3)
    moe = random_model(cfg).layers[1].mlp.double()
    x = torch.randn(1, 40, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    fast = moe(x)[0]
    ref = _naive_moe(moe, x[0])
    assert torch.allclose(fast, ref, atol=1e-10)
    g = torch.randn_like(ref)
    grads_fast = torch.autograd.grad((fast * g).sum(), [x, moe.experts.gate_up_proj, moe.gate.weight])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, moe.experts.gate_up_proj, moe.gate.weight])
    for a, b in zip(grads_fast, grads_ref):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("overlap", [False, True])
def test_moe_sums_the_residual_with_the_experts_rows(overlap):
    """MoE(h, residual=x), the block's residual add folded into the experts' combine: x + MoE(h), forward and
    gradients (x's is the output's), in float64, in line and with the shared experts overlapped."""
    cfg = preset("tiny", n_routed_experts=8, num_experts_per_tok=3)
    moe = random_model(cfg).layers[1].mlp.double()
    moe.overlap_shared = overlap
    h = torch.randn(2, 20, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 20, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    fast = moe(h, residual=x)
    ref = x + torch.stack([_naive_moe(moe, row) for row in h])
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-10)
    g = torch.randn_like(ref)
    params = [h, x, moe.experts.down_proj, moe.shared_experts.down_proj.weight]
    for a, b in zip(torch.autograd.grad((fast * g).sum(), params), torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("compiled", [False, True])
def test_shared_expert_overlap_equals_in_line_layer(compiled):
    """run.overlap_shared_experts (MoE._overlapped; CPU streams are stand-ins, so this checks the path, its graph
    break and the separately compiled halves, not concurrency): the block's output, router stats and gradients
    equal the in-line layer's, bit for bit in eager mode (the same ops in the same order), and within fp32
    reassociation when compiled (inductor fuses the halves differently from the eager block)."""
    from nanoseek.train.compile import _compile_halves, overlap_shared_experts
    cfg = preset("tiny", n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2)
    torch._dynamo.reset()
    model = random_model(cfg)
    block = model.layers[1]
    x = torch.randn(2, 24, cfg.hidden_size)
    cos, sin = rope_cos_sin(inv_frequencies(cfg), torch.arange(24).expand(2, 24))
    outs = []
    for overlap in (False, True):
        if overlap:
            overlap_shared_experts(model)
            if compiled:   # what train/compile.py's compile_blocks does
                block.compile()
                _compile_halves(block.mlp)
        assert block.mlp.overlap_shared is overlap
        xi = x.clone().requires_grad_()
        y, stats = block(xi, cos, sin, return_stats=True)
        y.square().sum().backward()
        outs.append([y, stats.load, stats.balance_loss, xi.grad,
                     *(p.grad for p in block.parameters() if p.grad is not None)])
        block.zero_grad(set_to_none=True)
    assert len(outs[0]) == len(outs[1]) > 10
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4 if compiled else 0, atol=1e-5 if compiled else 0)


def test_chunked_cross_entropy_matches_plain():
    from nanoseek.model.loss import chunked_cross_entropy
    h = torch.randn(3, 50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (3, 50))
    labels[0, :7] = -100
    got = chunked_cross_entropy(h, w, labels, chunk_rows=32)
    ref = torch.nn.functional.cross_entropy((h @ w.t()).flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert torch.allclose(got, ref)
    # gradients are computed in forward and scaled by the incoming gradient in backward
    grads, grads_ref = torch.autograd.grad(2.5 * got, [h, w]), torch.autograd.grad(2.5 * ref, [h, w])
    assert all(torch.allclose(a, b) for a, b in zip(grads, grads_ref))
    (gw,) = torch.autograd.grad(chunked_cross_entropy(h.detach(), w, labels, chunk_rows=32), [w])
    assert torch.allclose(gw, grads_ref[1] / 2.5)
    with torch.no_grad():   # evaluation: the loss alone, no gradients computed
        assert torch.allclose(chunked_cross_entropy(h, w, labels, chunk_rows=32), ref)


def test_chunk_size_follows_the_logits_budget(monkeypatch):
    """Without chunk_rows, a chunk holds CHUNK_BYTES of logits in the compute dtype: 40 float64 logits a row and a
    budget of 10 rows cut the 150 rows into 15 chunks, with the same loss and gradients."""
    from nanoseek.model import loss as loss_mod
    h = torch.randn(150, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64)
    labels = torch.randint(0, 40, (150,))
    calls = []
    real = loss_mod.loss_and_grad
    monkeypatch.setattr(loss_mod, "loss_and_grad", lambda z, *a, **k: calls.append(z.shape[0]) or real(z, *a, **k))
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 10 * 40 * 8)
    got = loss_mod.chunked_cross_entropy(h, w, labels)
    assert calls == [10] * 15
    ref = torch.nn.functional.cross_entropy(h @ w.t(), labels)
    assert torch.allclose(got, ref)
    assert torch.allclose(torch.autograd.grad(got, h)[0], torch.autograd.grad(ref, h)[0])


def test_attention_masked_path_equals_causal_path():
    """The document-mask path with one document per row (a plain causal mask) equals the is_causal fast path."""
    cfg = preset("tiny")
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        a, b = model(ids).logits, model(ids, doc_ids=torch.zeros_like(ids)).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_document_mask_gives_each_document_alone():
    """Packed documents with the document mask: every token's logits (main head and MTP depth 1) equal those of
    its document run on its own. An independent check of both the mask (data/loader.py) and the masked attention:
    nothing but attention mixes tokens, and RoPE scores depend on relative positions only. On CPU the model takes
    the dense mask; the FlexAttention mask that CUDA takes is checked against it below."""
    cfg = preset("tiny")
    model = random_model(cfg).double()
    eos = 0
    lengths = [5, 9, 1, 7]
    docs = [torch.randint(1, cfg.vocab_size, (n,)) for n in lengths]
    for d in docs:
        d[-1] = eos
    ids = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.zeros(1, 1, dtype=torch.long), (ids[:, :-1] == eos).long().cumsum(1)], 1)
    assert doc_ids[0].tolist() == sum(([i] * n for i, n in enumerate(lengths)), [])
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids, mtp=True)
        alone = [model(d[None], mtp=True) for d in docs]
        unmasked = model(ids).logits[0]
    # float64 model, but RoPE's angles and the gate run in fp32 by design: agreement to fp32 rounding
    torch.testing.assert_close(packed.logits[0], torch.cat([a.logits[0] for a in alone]), rtol=0, atol=1e-5)
    # MTP depth 1 at a document's last token pairs it with the next document's first: only the others compare
    # (a 1-token document has none)
    inside = torch.cat([torch.arange(n - 1) + start for n, start in zip(lengths, [0, 5, 14, 15])])
    alone_mtp = torch.cat([a.mtp_logits[0][0] for a in alone if a.mtp_logits])
    torch.testing.assert_close(packed.mtp_logits[0][0, inside], alone_mtp, rtol=0, atol=1e-5)
    assert not torch.allclose(unmasked[lengths[0]:], packed.logits[0, lengths[0]:], atol=1e-3)   # the mask matters


def test_flex_document_mask_equals_dense():
    """The two forms of `document_mask`: FlexAttention with a BlockMask (what CUDA runs) and SDPA with the dense
    mask, in float64, over rows whose documents span several 128-token blocks (some blocks skipped whole) and a
    padding tail (-1, as SFT packs it). Forward only: FlexAttention has no CPU backward (the gradients are compared
    on the GPU, tests/test_train_gpu.py)."""
    cfg = preset("tiny")
    mla = MLA(cfg, 0).double()
    B, T = 2, 300
    doc_ids = packed_doc_ids()
    x = torch.randn(B, T, cfg.hidden_size, dtype=torch.float64)
    cos, sin = (t.double() for t in rope_cos_sin(inv_frequencies(cfg), torch.arange(T).expand(B, T)))
    flex, dense = document_mask(doc_ids, flex=True), document_mask(doc_ids, flex=False)
    assert isinstance(flex, BlockMask) and dense.shape == (B, T, T)
    with torch.no_grad():
        torch.testing.assert_close(mla(x, cos, sin, mask=flex), mla(x, cos, sin, mask=dense), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(mla(x, cos, sin), mla(x, cos, sin, mask=dense))   # the documents do matter


def test_balance_bias_stays_fp32_when_model_is_cast():
    model = random_model(preset("tiny"))
    before = model.moe_gates()[0].e_score_correction_bias.clone()
    model.to(torch.bfloat16)
    after = model.moe_gates()[0].e_score_correction_bias
    assert after.dtype == torch.float32 and torch.equal(after, before)
    assert model.embed_tokens.weight.dtype == torch.bfloat16


def test_rope_frequencies_stay_fp32_when_model_is_cast():
    model = random_model(preset("tiny")).to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32


def test_compiled_gate_routes_like_eager():
    """Under torch.compile the gate's top-k runs as rounds of max-and-mask (model/moe.py top_k): same experts,
    same weights as aten topk in eager, with group-limited routing on."""
    from nanoseek.model.moe import Gate
    torch.manual_seed(0)
    gate = Gate(preset("tiny", n_routed_experts=32, n_group=4, topk_group=2, num_experts_per_tok=4))
    torch.nn.init.normal_(gate.weight, std=0.5)
    gate.e_score_correction_bias.normal_(std=0.1)
    x = torch.randn(256, gate.weight.shape[1])
    w_eager, i_eager, s_eager = gate(x)
    torch._dynamo.reset()
    w_comp, i_comp, s_comp = torch.compile(gate, dynamic=False)(x)
    assert torch.equal(i_comp, i_eager)
    assert torch.allclose(w_comp, w_eager, atol=1e-6) and torch.allclose(s_comp, s_eager, atol=1e-6)


def test_gate_backward_same_eager_and_compiled_under_autocast():
    """The gate's backward (model/moe.py _GateLogits) rounds the logits' gradient g to the activations' dtype and
    sums in fp32, eager as compiled. Traced under the forward's bf16 autocast, its GEMMs used to be cast by autocast
    in compiled steps only, so dx differed from eager's fp32 dx."""
    from nanoseek.model.moe import _GateLogits
    torch.manual_seed(0)
    x0, w0, g = torch.randn(256, 64).bfloat16(), torch.randn(16, 64), torch.randn(256, 16)

    def grads(fn):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn(x, w).backward(g)
        return x.grad, w.grad

    def logits(x, w):
        with torch.autocast("cpu", enabled=False):
            return _GateLogits.apply(x, w)
    dx, dw = grads(logits)
    torch._dynamo.reset()
    dx_c, dw_c = grads(torch.compile(logits))
    gb = g.bfloat16()
    assert torch.equal(dx, gb @ w0.bfloat16()) and torch.equal(dw, gb.float().t() @ x0.float())
    assert torch.equal(dx_c, dx)
    # inductor may keep g unrounded inside its fused fp32 GEMM: within g's bf16 rounding
    assert (dw_c - dw).norm() / dw.norm() < 4e-3


@pytest.mark.parametrize("bias", [False, True])
def test_parallel_linear_equals_separate_linears(bias):
    """The one-GEMM path (training) gives each linear's output and each parameter's gradient as the linears run
    one by one (the inference path); a missing bias among present ones counts as zero."""
    from nanoseek.model.layers import parallel_linear
    torch.manual_seed(0)
    linears = [torch.nn.Linear(16, n, bias=bias).double() for n in (12, 5)] + [torch.nn.Linear(16, 3, bias=False)
                                                                             .double()]
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    fused = parallel_linear(x, *linears)
    with torch.no_grad():
        separate = parallel_linear(x, *linears)
    params = [x] + [p for m in linears for p in m.parameters()]
    g = [torch.randn_like(y) for y in fused]
    grads = torch.autograd.grad(sum((y * gy).sum() for y, gy in zip(fused, g)), params)
    grads_ref = torch.autograd.grad(sum((m(x) * gy).sum() for m, gy in zip(linears, g)), params)
    for y, ref in zip(fused, separate):
        assert y.shape == ref.shape and torch.allclose(y, ref, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)


def _mla_rope_inputs(B=2, T=5, H=3, d_nope=6, d_rope=8, dtype=torch.float64):
    """q as W_UQ's output, k_nope and k_rope as strided views of W_UKV's and W_DKV's outputs (as MLA passes them)."""
    torch.manual_seed(0)
    q = torch.randn(B, T, H, d_nope + d_rope, dtype=dtype)
    kv = torch.randn(B, T, H, d_nope + 4, dtype=dtype)
    kv_a = torch.randn(B, T, 7 + d_rope, dtype=dtype)
    angles = torch.arange(T, dtype=dtype)[:, None] * torch.rand(d_rope // 2, dtype=dtype)
    cos, sin = (f(angles).expand(B, T, -1) for f in (torch.cos, torch.sin))   # broadcast over the batch
    return q, kv[..., :d_nope], kv_a[..., 7:], cos, sin


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_qk_op_matches_rope_and_concat_with_gradients(interleave):
    """The fused q/k assembly (kernels/rope.py) against RoPE written out per pair, q·k invariant to position
    shifts, and its registered backward against autograd through the reference."""
    from nanoseek.kernels.rope import rope_qk, rope_qk_reference
    q, k_nope, k_rope, cos, sin = _mla_rope_inputs()
    q, k_nope, k_rope = (t.requires_grad_() for t in (q, k_nope, k_rope))
    q_out, k_out = rope_qk(q, k_nope, k_rope, cos, sin, interleave)
    d_nope = k_nope.shape[-1]
    pairs = (slice(0, None, 2), slice(1, None, 2)) if interleave else (slice(0, 4), slice(4, 8))
    c, s = cos[:, :, None], sin[:, :, None]
    x1, x2 = q[..., d_nope:][..., pairs[0]], q[..., d_nope:][..., pairs[1]]
    assert torch.allclose(q_out[..., d_nope:][..., pairs[0]], x1 * c - x2 * s)
    assert torch.allclose(q_out[..., d_nope:][..., pairs[1]], x2 * c + x1 * s)
    assert torch.equal(q_out[..., :d_nope], q[..., :d_nope]) and torch.equal(k_out[..., :d_nope], k_nope)
    assert torch.equal(k_out[:, :, 0, d_nope:], k_out[:, :, 2, d_nope:])       # one k_rope for every head
    # rotations by θ_t: the rope part of q_t·k_s depends on t − s only (here both at t = s)
    rope_dot = (q_out[..., d_nope:] * k_out[..., d_nope:]).sum(-1)
    assert torch.allclose(rope_dot, (q[..., d_nope:] * k_rope[:, :, None]).sum(-1))
    g = [torch.randn_like(q_out), torch.randn_like(k_out)]
    got = torch.autograd.grad([q_out, k_out], [q, k_nope, k_rope], g)
    ref = torch.autograd.grad(rope_qk_reference(q, k_nope, k_rope, cos, sin, interleave), [q, k_nope, k_rope], g)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)
    torch.library.opcheck(torch.ops.nanoseek.rope_qk.default, (q, k_nope, k_rope, cos, sin, interleave))
