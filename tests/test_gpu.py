"""GPU paths against their references (run on the device machine: pytest -m gpu)."""
import copy

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from nanoseek.config import preset
from nanoseek.kernels.grouped_mm import grouped_mm, grouped_mm_reference
from nanoseek.model.mla import MLA, document_mask
from nanoseek.model.rope import inv_frequencies, rope_cos_sin

from .helpers import packed_doc_ids, random_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_grouped_mm_cuda_matches_float64_reference():
    E, K, N = 8, 256, 384
    counts = torch.tensor([100, 0, 250, 53, 300, 0, 197, 100])  # empty groups and odd sizes
    M = int(counts.sum())
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = grouped_mm(x, w, counts.cuda())
    ref = grouped_mm_reference(x.double(), w.double(), counts)
    assert (out.double() - ref).norm() / ref.norm() < 1e-2
    out.float().square().sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_model_bf16_cuda_matches_fp32_cpu_loss():
    cfg = preset("tiny", hidden_size=128, moe_intermediate_size=64, intermediate_size=256)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    ref = model.loss(ids, ids).ce.item()
    gpu = model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = gpu.loss(ids.cuda(), ids.cuda()).ce.item()
    assert abs(got - ref) / ref < 2e-2


def test_flex_document_mask_matches_float64_dense_on_cuda():
    """FlexAttention with `document_mask`'s BlockMask (compiled, as training runs it) against SDPA with the dense
    mask in float64: MLA's output and the gradients of its input and weights (CPU has no FlexAttention backward)."""
    cfg = preset("tiny")
    B, T = 2, 300
    doc_ids = packed_doc_ids("cuda")
    cos, sin = rope_cos_sin(inv_frequencies(cfg), torch.arange(T, device="cuda").expand(B, T))
    x = torch.randn(B, T, cfg.hidden_size, device="cuda")
    mla = MLA(cfg, 0).cuda()
    results = []
    for dtype, mask in ((torch.float32, document_mask(doc_ids)), (torch.float64, document_mask(doc_ids, flex=False))):
        m = copy.deepcopy(mla).to(dtype)
        xi = x.to(dtype, copy=True).requires_grad_()
        out = m(xi, cos.to(dtype), sin.to(dtype), mask=mask)
        out.square().sum().backward()
        results.append([out, xi.grad] + [p.grad for p in m.parameters()])
    assert isinstance(document_mask(doc_ids), BlockMask)
    for got, ref in zip(*results):
        assert (got.double() - ref).norm() / ref.norm() < 5e-3   # TF32 matmuls in the flex kernel


def test_moe_row_kernels_on_cuda_match_references():
    """The Triton row kernels (kernels/moe_rows_triton.py) on the GPU: the gather is a copy (exact), the sum one
    rounding of an fp32 sum, and a MoE layer through them gives the float64 CPU reference's output and gradients."""
    from nanoseek.kernels import moe_rows, moe_rows_triton
    torch.manual_seed(0)
    src = torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16)
    index = torch.randperm(1200, device="cuda")
    assert torch.equal(moe_rows_triton.gather_rows(src, index, 4), moe_rows.gather_rows_reference(src, index, 4))
    rows = torch.randn(1200, 1000, device="cuda", dtype=torch.bfloat16)
    fp32 = rows.float()[index].view(300, 4, 1000).sum(1)
    assert torch.equal(moe_rows_triton.sum_rows(rows, index, 4), fp32.bfloat16())

    cfg = preset("tiny", n_routed_experts=8, num_experts_per_tok=3, hidden_size=256, moe_intermediate_size=96)
    moe = random_model(cfg).layers[1].mlp
    x = torch.randn(2, 100, cfg.hidden_size)
    results = []
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
        m = copy.deepcopy(moe).to(device, dtype)
        xi = x.to(device, dtype).requires_grad_()
        y = m(xi)
        y.square().sum().backward()
        results.append([t.double().cpu() for t in (y, xi.grad, m.experts.gate_up_proj.grad,
                                                   m.experts.down_proj.grad, m.gate.weight.grad)])
    for ref, got in zip(*results):
        assert (got - ref).norm() / ref.norm() < 1e-4


def test_bf16_gate_logits_on_cuda_equal_the_fp32_gemm():
    """With bf16 weights the gate runs one bf16 GEMM with an fp32 output (model/moe.py _GateLogits): the same
    logits as the fp32 GEMM on the upcast operands up to summation order, and fp32-exact gradients."""
    from nanoseek.model.moe import _GateLogits
    torch.manual_seed(0)
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(64, 1024, device="cuda") * 0.05).bfloat16()
    g = torch.randn(4096, 64, device="cuda")
    results = []
    for a, b in ((x, w), (x.double(), w.double())):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        logits = _GateLogits.apply(a, b)
        (logits * g.to(logits.dtype)).sum().backward()
        results.append((logits, a.grad, b.grad))
    (got, dx, dw), (ref, dx64, dw64) = results
    assert got.dtype == torch.float32 and dx.dtype == dw.dtype == torch.bfloat16
    assert (got.double() - ref).abs().max() < 1e-4 * ref.abs().max()        # fp32 sums of exact products
    for a, b in ((dx, dx64), (dw, dw64)):
        assert (a.double() - b).norm() / b.norm() < 4e-3                   # one bf16 rounding


def test_chunked_cross_entropy_on_cuda_matches_float64():
    """The head's weight gradient accumulates over row chunks in fp32 inside cuBLAS (addmm with an fp32 out_dtype),
    or comes from one fp32-output GEMM when all rows fit one chunk (the default here), G written over the logits:
    loss and both gradients against float64 on the CPU."""
    from nanoseek.model.loss import chunked_cross_entropy
    torch.manual_seed(0)
    h = torch.randn(1000, 256, dtype=torch.float64)
    w = torch.randn(3000, 256, dtype=torch.float64) * 0.05
    labels = torch.randint(0, 3000, (1000,))
    labels[::7] = -100
    results = []
    # 4 chunks, the last partial; then one chunk
    for device, dtype, chunk in (("cpu", torch.float64, 300), ("cuda", torch.bfloat16, 300),
                                 ("cuda", torch.bfloat16, None)):
        hi, wi = (t.to(device, dtype).detach().requires_grad_() for t in (h, w))   # leaves on both devices
        loss = chunked_cross_entropy(hi, wi, labels.to(device), chunk_rows=chunk)
        loss.backward()
        results.append([t.double().cpu() for t in (loss, hi.grad, wi.grad)])
    for got in results[1:]:
        for ref, g in zip(results[0], got):
            assert (g - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float32])
def test_adamw_triton_matches_cpu_and_replays_as_a_cuda_graph(p_dtype):
    """train/optim.py's AdamW with bf16 moments on CUDA (the Triton kernel) against the same optimizer on the CPU
    (the foreach path) over four steps, the last three replayed from one captured CUDA graph: the step count lives
    on the device, so each replay applies its own bias corrections. The two compute m by different fp32 formulas
    (lerp, and β1·m + (1 − β1)·g), so a stored bf16 moment can differ by an ulp, which moves that step's update
    by lr·2⁻⁸ ≈ 4e-5: fp32 parameters agree within 2e-4. bf16 ones within an ulp a step, since the foreach path
    rounds p after the decay and again after the update (a decay below half an ulp is lost there) and the kernel
    rounds once. A wrong bias correction or decay would move parameters by ~lr = 1e-2 a step."""
    from nanoseek.train.optim import AdamW
    torch.manual_seed(0)
    p0, grads = torch.randn(3, 5000), [torch.randn(3, 5000) for _ in range(4)]
    finals = []
    for device in ("cpu", "cuda"):
        p = torch.nn.Parameter(p0.to(device, p_dtype, copy=True))
        opt = AdamW([{"params": [p], "weight_decay": 0.1}], lr=1e-2, moment_dtype=torch.bfloat16)
        p.grad = grads[0].to(device, p_dtype)
        opt.step()
        if device == "cpu":
            for g in grads[1:]:
                p.grad = g.to(device, p_dtype)
                opt.step()
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            for g in grads[1:]:
                p.grad.copy_(g)
                graph.replay()
        finals.append(p.detach().float().cpu())
    tol = dict(rtol=1e-5, atol=2e-4) if p_dtype == torch.float32 else dict(rtol=4 * 2 ** -7, atol=1e-3)
    torch.testing.assert_close(finals[1], finals[0], **tol)
    assert (finals[1] - p0).abs().max() > 1e-2   # the graph did update


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_qk_cuda_matches_float64_reference_forward_and_backward(interleave):
    """MLA's q/k assembly with RoPE (kernels/rope_triton.py) in bf16, on strided views of GEMM outputs as MLA
    passes them and compiled as the blocks run it, against the float64 reference on the CPU: outputs and all three
    gradients within bf16 rounding (2⁻⁸ relative)."""
    from nanoseek.kernels.rope import rope_qk, rope_qk_reference
    torch.manual_seed(0)
    B, T, H, d_nope, d_rope = 2, 300, 8, 64, 32
    q = torch.randn(B, T, H, d_nope + d_rope)
    kv = torch.randn(B, T, H, d_nope + 64)
    kv_a = torch.randn(B, T, 288)
    cos, sin = rope_cos_sin(inv_frequencies(preset("small")), torch.arange(T).expand(B, T))
    gq, gk = torch.randn(B, T, H, d_nope + d_rope), torch.randn(B, T, H, d_nope + d_rope)
    results = []
    for device, dtype, fn in (("cpu", torch.float64, rope_qk_reference), ("cuda", torch.bfloat16, rope_qk),
                              ("cuda", torch.bfloat16, torch.compile(rope_qk, fullgraph=True))):
        leaves = [t.to(device, dtype).requires_grad_() for t in (q, kv, kv_a)]
        q_, kv_, kv_a_ = leaves
        outs = fn(q_, kv_[..., :d_nope], kv_a_[..., 256:], cos.to(device), sin.to(device), interleave)
        torch.autograd.backward(outs, [gq.to(device, dtype), gk.to(device, dtype)])
        results.append([t.double().cpu() for t in (*outs, *(leaf.grad for leaf in leaves))])
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            assert (a - b).norm() / b.norm() < 2 ** -8


def test_shared_expert_overlap_on_cuda_equals_in_line_and_captures():
    """MoE._overlapped on real streams (bf16, `small`'s MoE widths at 4,096 tokens): forward and backward equal
    the in-line layer's bit for bit, eagerly and replayed from a CUDA graph that captured both streams (forward,
    backward and the gradients the side stream accumulates)."""
    from nanoseek.train.compile import overlap_shared_experts
    cfg = preset("small", num_hidden_layers=2, num_nextn_predict_layers=0)
    model = random_model(cfg).cuda().to(torch.bfloat16)
    moe = model.layers[1].mlp
    x = torch.randn(2, 2048, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)

    def step():
        xi = x.detach().requires_grad_()
        y, stats = moe(xi, return_stats=True)
        (y * g).sum().backward()
        return [y, stats.load, stats.balance_loss, xi.grad, *(p.grad for p in moe.parameters())]

    def run():   # detached copies: a copy of y with its graph would keep the AccumulateGrad nodes of the default
        # stream alive into the capture, and accumulating there would make the legacy stream wait on it
        out = [t.detach().clone() for t in step()]
        moe.zero_grad(set_to_none=True)
        return out

    ref = run()
    overlap_shared_experts(model)
    assert moe.overlap_shared
    eager = run()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()   # warm-up off the default stream, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x0 = x.clone()
    x.normal_()   # a replay on another input first, so the one compared cannot be a leftover
    graph.replay()
    other = captured[0].clone()
    x.copy_(x0)
    graph.replay()
    for a, b in zip(ref, eager):
        assert torch.equal(a, b)
    assert not torch.allclose(other, ref[0])
    for a, b in zip(ref, captured):   # the same kernels, but cuBLAS may pick others under capture
        torch.testing.assert_close(b, a)
