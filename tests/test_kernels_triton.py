"""The MoE row kernels (kernels/moe_rows_triton.py) and the AdamW kernel (kernels/adamw_triton.py) on CPU through
Triton's interpreter, against their PyTorch references (kernels/moe_rows.py; the foreach path of train/optim.py).
Runs only when asked for (the CUDA checks are in tests/test_gpu.py):

    TRITON_INTERPRET=1 python -m pytest tests/test_kernels_triton.py
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton interpreter tests: run with TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from nanoseek.kernels import (adamw_triton, cross_entropy, cross_entropy_triton, moe_rows,  # noqa: E402
                              moe_rows_triton)
from nanoseek.train.optim import AdamW  # noqa: E402


@pytest.mark.parametrize("k, H", [(1, 1), (3, 200), (4, 2500)])   # one column (the routing weights), a partial
def test_gather_and_sum_rows_match_reference(k, H):                # block, more than one block of columns
    torch.manual_seed(0)
    N = 37
    src = torch.randn(N, H)
    index = torch.randperm(N * k)
    got = moe_rows_triton.gather_rows(src, index, k)
    assert torch.equal(got, moe_rows.gather_rows_reference(src, index, k))   # a copy: exact
    rows = torch.randn(N * k, H)
    got = moe_rows_triton.sum_rows(rows, index, k)
    torch.testing.assert_close(got, moe_rows.sum_rows_reference(rows, index, k), rtol=1e-6, atol=1e-6)


def test_sum_rows_in_bf16_sums_in_fp32():
    """bf16 rows are summed in fp32 and rounded once: the output is the fp32 sum cast to bf16. The interpreter
    casts by truncating (the GPU rounds to nearest), so either rounding of that one sum is accepted; a sum kept
    in bf16 would round after each of the k terms and match neither."""
    torch.manual_seed(0)
    rows = torch.randn(3 * 50, 96).bfloat16()
    index = torch.randperm(150)
    got = moe_rows_triton.sum_rows(rows, index, 3)
    fp32 = rows.float()[index].view(50, 3, 96).sum(1)
    truncated = (fp32.view(torch.int32) & ~0xFFFF).view(torch.float32).bfloat16()
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, fp32.bfloat16()) or torch.equal(got, truncated)


def test_sum_rows_adds_the_residual_in_the_same_sum():
    """With a residual (the block's, fp32 under autocast), bf16 rows and the residual are summed in fp32 and the
    output takes the residual's dtype: the sum is never rounded to bf16 on the way (as a bf16 combine followed
    by a separate residual add would)."""
    torch.manual_seed(0)
    rows, residual = torch.randn(4 * 37, 200).bfloat16(), torch.randn(37, 200)
    index = torch.randperm(4 * 37)
    got = moe_rows_triton.sum_rows(rows, index, 4, residual)
    assert got.dtype == torch.float32
    want = moe_rows.sum_rows_reference(rows, index, 4, residual)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.equal(want, residual + moe_rows.sum_rows_reference(rows, index, 4))   # that rounding is gone


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("I", [48, 700])   # one column block; two, the second partial
def test_swiglu_backward_matches_autograd(scaled, I):
    torch.manual_seed(0)
    M = 45
    gate_up = torch.randn(M, 2 * I, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(M, dtype=torch.float64, requires_grad=True) if scaled else None
    dh = torch.randn(M, I, dtype=torch.float64)
    gate, up = gate_up.chunk(2, dim=-1)
    h = torch.nn.functional.silu(gate) * up
    h = h * scale[:, None] if scaled else h
    grads = torch.autograd.grad(h, [gate_up] + ([scale] if scaled else []), dh)
    d_gate_up, d_scale = moe_rows_triton.swiglu_backward(gate_up.detach().float(),
                                                         scale.detach().float() if scaled else None, dh.float())
    torch.testing.assert_close(d_gate_up.double(), grads[0], rtol=1e-5, atol=1e-5)
    if scaled:
        torch.testing.assert_close(d_scale.double(), grads[1], rtol=1e-5, atol=1e-4)
    ref = moe_rows.swiglu_backward_reference(gate_up.detach(), scale.detach() if scaled else None, dh)
    torch.testing.assert_close(ref[0], grads[0])   # the CPU reference is the same formula


@pytest.mark.parametrize("p_dtype, m_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.float32)])
def test_adamw_kernel_matches_foreach_reference(p_dtype, m_dtype):
    """Three steps (weight decay on, a size that leaves a partial block) against train/optim.py's foreach path,
    which computes the same fp32 update. The interpreter stores bf16 by truncating (the GPU rounds to nearest), so
    where anything is stored in bf16 the two drift apart by an ulp or so a step: tolerances of three bf16 ulps, and
    1e-3 absolute for the parameters (a wrong bias correction or decay moves them by ~lr = 1e-2 a step)."""
    torch.manual_seed(0)
    ref = torch.nn.Parameter(torch.randn(5000).to(p_dtype))
    got = ref.detach().clone()
    opt = AdamW([{"params": [ref], "weight_decay": 0.1}], lr=1e-2, moment_dtype=m_dtype)
    m, v = torch.zeros(5000, dtype=m_dtype), torch.zeros(5000, dtype=m_dtype)
    for t in range(1, 4):
        g = torch.randn(5000).to(p_dtype)
        ref.grad = g.clone()
        opt.step()   # CPU tensors: the foreach path (or torch's fused kernel, all fp32)
        adamw_triton.adamw_step(got, g, m, v, torch.tensor(float(t)), 1e-2, 0.9, 0.95, 1e-8, 0.1)
    exact = p_dtype == m_dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-6) if exact else dict(rtol=3 * 2 ** -7, atol=1e-3)
    torch.testing.assert_close(got.float(), ref.detach().float(), **tol)
    for mine, theirs in ((m, opt.state[ref]["exp_avg"]), (v, opt.state[ref]["exp_avg_sq"])):
        theirs = theirs.float()   # moments cancel towards zero: absolute tolerance in ulps of their largest
        tol = dict(rtol=1e-5, atol=1e-6) if exact else dict(rtol=3 * 2 ** -7, atol=3 * 2 ** -7 * theirs.abs().max())
        torch.testing.assert_close(mine.float(), theirs, **tol)


def test_adamw_kernel_reads_the_learning_rate_from_memory():
    """lr as a device scalar (a captured step, train/step_graph.py) gives the update of lr as a number, and the
    kernel reads the value the tensor holds at launch."""
    torch.manual_seed(0)
    p0, g = torch.randn(3000), torch.randn(3000)
    results = []
    for lr in (3e-3, torch.tensor(1.0)):
        if isinstance(lr, torch.Tensor):
            lr.fill_(3e-3)
        p, m, v = p0.clone(), torch.zeros(3000), torch.zeros(3000)
        adamw_triton.adamw_step(p, g, m, v, torch.tensor(1.0), lr, 0.9, 0.95, 1e-8, 0.1)
        results.append(p)
    assert not torch.equal(results[0], p0) and torch.equal(results[0], results[1])


@pytest.mark.parametrize("block", [1024, 256])   # the row in one block; a loop of 4 (the online max and sum)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_kernel_matches_reference(block, dtype):
    """Summed loss and G = softmax − onehot against the PyTorch reference, with ignored rows (zero loss and zero
    G), labels at both ends of the vocabulary and a vocabulary that is not a multiple of the block."""
    torch.manual_seed(0)
    n, V = 37, 1000
    logits = (torch.randn(n, V) * 4).to(dtype)
    labels = torch.randint(0, V, (n,))
    labels[0], labels[1], labels[5::6] = 0, V - 1, -100
    loss, g = cross_entropy_triton.loss_and_grad(logits, labels, -100, True, block=block)
    ref_loss, ref_g = cross_entropy.loss_and_grad_reference(logits, labels, -100, True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    assert g.dtype == dtype and not g[5::6].any()
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=8e-3)   # bf16: one rounding
    torch.testing.assert_close(g.float(), ref_g.float(), **tol)
    loss_only, none = cross_entropy_triton.loss_and_grad(logits, labels, -100, False, block=block)
    assert none is None and torch.equal(loss_only, loss)
    buf = logits.clone()   # G written over the logits: the same values, in the same storage
    loss_in, g_in = cross_entropy_triton.loss_and_grad(buf, labels, -100, True, block=block, inplace=True)
    assert g_in.data_ptr() == buf.data_ptr() and torch.equal(g_in, g) and torch.equal(loss_in, loss)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("d_nope, d_rope", [(6, 8), (64, 32)])   # padded blocks; small's head dims
def test_rope_qk_kernels_match_reference(interleave, d_nope, d_rope):
    """q/k assembly with RoPE forward and backward (kernels/rope_triton.py) on strided views as MLA passes them, a
    token count that is not a multiple of the block, cos/sin broadcast over the batch."""
    from nanoseek.kernels import rope, rope_triton
    torch.manual_seed(0)
    B, T, H = 2, 37, 3
    q = torch.randn(B, T, H, d_nope + d_rope)
    k_nope = torch.randn(B, T, H, d_nope + 5)[..., :d_nope]
    k_rope = torch.randn(B, T, 9 + d_rope)[..., 9:]
    angles = torch.arange(T, dtype=torch.float32)[:, None] * torch.rand(d_rope // 2)
    cos, sin = angles.cos().expand(B, T, -1), angles.sin().expand(B, T, -1)
    got = rope_triton.rope_qk(q, k_nope, k_rope, cos, sin, interleave)
    ref = rope.rope_qk_reference(q, k_nope, k_rope, cos, sin, interleave)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    dq = torch.randn(B, H, T, d_nope + d_rope).transpose(1, 2)    # the attention kernel's (B, H, T, d) layout
    dk = torch.randn(B, T, H, d_nope + d_rope)
    got = rope_triton.rope_qk_backward(dq, dk, cos, sin, d_nope, interleave)
    ref = rope.rope_qk_backward_reference(dq, dk, cos, sin, d_nope, interleave)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
