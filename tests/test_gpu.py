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
