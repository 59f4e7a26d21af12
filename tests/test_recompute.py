"""Recomputation in backward (train/recompute.py): every mode gives the gradients of "none", and each mode keeps
fewer activation bytes between forward and backward than the one before it."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from nanoseek.config import preset
from nanoseek.train.compile import compile_blocks
from nanoseek.train.recompute import MODES, apply_recompute

from .helpers import random_model

CFG = preset("tiny", num_hidden_layers=3, first_k_dense_replace=1)


def _loss_and_kept_bytes(model, x, y):
    """The loss, and the CPU bytes that its forward left allocated (what autograd keeps for backward; the
    profiler's allocations minus frees)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model.loss(x, y, mtp_lambda=0.3, balance_alpha=1e-3)
    return out, sum(e.self_cpu_memory_usage for e in prof.events())


def _run(mode):
    model = random_model(CFG).train()
    apply_recompute(model, mode)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CFG.vocab_size, (2, 65), generator=g)
    out, kept = _loss_and_kept_bytes(model, ids[:, :-1], ids[:, 1:])
    out.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.total.item(), grads, kept


def test_modes_same_gradients_less_memory():
    results = {mode: _run(mode) for mode in MODES}
    loss, grads, _ = results["none"]
    assert len(grads) > 50
    for mode in MODES[1:]:
        assert results[mode][0] == loss, mode
        assert results[mode][1].keys() == grads.keys(), mode
        for name, g in grads.items():
            torch.testing.assert_close(results[mode][1][name], g, rtol=1e-6, atol=1e-7, msg=f"{mode}: {name}")
    kept = [results[mode][2] for mode in MODES]
    assert all(a > b for a, b in zip(kept, kept[1:])), dict(zip(MODES, kept))


def test_eval_and_unknown_mode():
    model = random_model(CFG)
    apply_recompute(model, "cheap")
    ids = torch.randint(0, CFG.vocab_size, (1, 16))
    with torch.no_grad():   # no checkpointing without grad: same logits as the plain model
        torch.testing.assert_close(model(ids).logits, random_model(CFG)(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="recompute mode"):
        apply_recompute(model, "some")


def test_fp8_layers_recompute_to_the_same_gradients():
    from nanoseek.fp8 import convert_to_fp8

    def fp8_grads(mode):
        model = random_model(CFG).train()
        convert_to_fp8(model)
        apply_recompute(model, mode)
        ids = torch.randint(0, CFG.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
        model.loss(ids[:, :-1], ids[:, 1:]).total.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref, cheap = fp8_grads("none"), fp8_grads("cheap")
    assert ref.keys() == cheap.keys()
    for name in ref:
        torch.testing.assert_close(cheap[name], ref[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["v3", "full"])
def test_compiled_blocks_recompute_to_the_same_gradients(mode):
    """As the trainer runs on CUDA: recomputation applied, then each block (the MTP module's too) and the final norm
    compiled (train/compile.py; the policy then runs while torch.compile traces, where the MLA up-projections are
    known by their GEMM shapes). Run alone too: a first grouped GEMM inside a checkpointed region once broke it."""
    torch._dynamo.reset()
    model = random_model(CFG).train()
    apply_recompute(model, mode)
    compile_blocks(model)
    ids = torch.randint(0, CFG.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    model.loss(ids[:, :-1], ids[:, 1:], mtp_lambda=0.3, balance_alpha=1e-3).total.backward()
    _, ref, _ = _run("none")
    for name, g in ref.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, rtol=1e-5, atol=1e-6, msg=name)
