"""The MoE row kernels (kernels/moe_rows_triton.py) on CPU through Triton's interpreter, against the PyTorch
references beside them (kernels/moe_rows.py). Runs only when asked for (the CUDA check is tests/test_gpu.py):

    TRITON_INTERPRET=1 python -m pytest tests/test_moe_triton.py
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton interpreter tests: run with TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from nanoseek.kernels import moe_rows, moe_rows_triton  # noqa: E402


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
