"""GPU paths against their references (run on the device machine: pytest -m gpu)."""
import pytest
import torch

from nanoseek.config import preset
from nanoseek.kernels.grouped_mm import grouped_mm, grouped_mm_reference

from .helpers import random_model

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
