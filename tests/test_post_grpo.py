"""The GRPO loss against a direct, loop-by-loop implementation of its formula on random tensors (value and
gradient, both normalizations, micro-batches summing to the minibatch), group advantages, and per-token
log-probabilities against full-vocabulary log-softmax."""
import math

import pytest
import torch

from nanoseek.config import preset
from nanoseek.post.grpo_loss import group_advantages, grpo_loss
from nanoseek.post.logprobs import batch, completion_logprobs

from .helpers import random_model


def direct_objective(logp, old, ref, adv, lengths, eps, beta, norm, weights=None):
    """J of DeepSeekMath eq. 3 / R1 eq. 1-2, written out token by token with plain math per element; weights:
    per-token importance weights of the surrogate (truncated importance sampling), constants."""
    terms = []
    for i, n in enumerate(lengths):
        seq = []
        for t in range(n):
            ratio = torch.exp(logp[i, t] - old[i, t])
            r = float(ratio.detach())
            clipped = min(max(r, 1 - eps), 1 + eps)        # a constant: no gradient through the clipped branch
            surrogate = ratio * adv[i] if clipped == r else torch.minimum(ratio * adv[i], clipped * adv[i])
            w = 1.0 if weights is None else float(weights[i, t])
            d = torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1   # π_ref/π − log(π_ref/π) − 1
            seq.append(w * surrogate - beta * d)
        terms.append(seq)
    if norm == "seq":   # 1/G Σ_i 1/|o_i| Σ_t
        return sum(sum(seq) / len(seq) for seq in terms) / len(terms)
    return sum(sum(seq) for seq in terms) / sum(lengths)   # Σ_i Σ_t / Σ_i |o_i|


@pytest.mark.parametrize("norm", ["seq", "token"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_formula(norm, beta):
    g = torch.Generator().manual_seed(1)
    N, C, eps = 6, 7, 0.2
    lengths = [7, 3, 5, 1, 6, 4]
    mask = torch.arange(C)[None, :] < torch.tensor(lengths)[:, None]
    logp = (-torch.rand(N, C, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(N, C, generator=g)      # ratios well outside 1 ± ε, both ways
    ref = logp.detach() + 0.5 * torch.randn(N, C, generator=g)
    adv = torch.randn(N, generator=g)
    loss, stats = grpo_loss(logp, old, ref, adv, mask, eps, beta, norm)
    (grad,) = torch.autograd.grad(loss, logp)

    x = logp.detach().clone().requires_grad_()
    expected = -direct_objective(x, old, ref, adv, lengths, eps, beta, norm)
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert float(grad[~mask].abs().max()) == 0            # padding gets no gradient

    ratio = torch.exp(logp.detach() - old)[mask]
    a = adv[:, None].expand(N, C)[mask]
    clipped = ((ratio > 1 + eps) & (a > 0)) | ((ratio < 1 - eps) & (a < 0))
    assert math.isclose(float(stats.clip_frac), float(clipped.float().mean()), rel_tol=1e-6)
    assert 0 < float(stats.clip_frac) < 1
    if beta:
        lr = (ref - logp.detach())[mask]
        assert math.isclose(float(stats.kl), float((lr.exp() - lr - 1).mean()), rel_tol=1e-5)
        assert float(stats.kl) > 0


def test_on_policy_first_update_is_policy_gradient():
    """With π_old = π_θ (the first update of a step) the ratio is 1, nothing is clipped, and the gradient of the
    surrogate is −A_i/|o_i| per token ("seq") — the REINFORCE gradient with the group baseline."""
    logp = (-torch.rand(3, 4)).requires_grad_()
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    loss, stats = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
    loss.backward()
    expected = -(adv[:, None] / mask.sum(1, keepdim=True)) / 3 * mask
    torch.testing.assert_close(logp.grad, expected)
    assert float(stats.clip_frac) == 0 and float(stats.ratio) == 1


@pytest.mark.parametrize("norm", ["seq", "token"])
def test_importance_weights_scale_the_surrogate_only(norm):
    g = torch.Generator().manual_seed(3)
    N, C, eps, beta = 5, 6, 0.2, 0.04
    lengths = [6, 2, 4, 1, 5]
    mask = torch.arange(C)[None, :] < torch.tensor(lengths)[:, None]
    logp = (-torch.rand(N, C, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(N, C, generator=g)
    ref = logp.detach() + 0.5 * torch.randn(N, C, generator=g)
    adv = torch.randn(N, generator=g)
    engine = old + 0.5 * torch.randn(N, C, generator=g)           # the sampler's own log-probabilities
    w = (old - engine).exp().clamp(max=2.0)                          # min(π_old / π_engine, C)
    loss, _ = grpo_loss(logp, old, ref, adv, mask, eps, beta, norm, weights=w)
    (grad,) = torch.autograd.grad(loss, logp)
    x = logp.detach().clone().requires_grad_()
    expected = -direct_objective(x, old, ref, adv, lengths, eps, beta, norm, weights=w)
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    ones, _ = grpo_loss(logp, old, ref, adv, mask, eps, beta, norm, weights=torch.ones(N, C))
    torch.testing.assert_close(ones, grpo_loss(logp, old, ref, adv, mask, eps, beta, norm)[0])
    assert not torch.allclose(loss, ones)


@pytest.mark.parametrize("norm", ["seq", "token"])
def test_micro_batches_sum_to_the_minibatch_loss(norm):
    g = torch.Generator().manual_seed(2)
    N, C = 8, 5
    logp, old, ref = (-torch.rand(N, C, generator=g) for _ in range(3))
    adv = torch.randn(N, generator=g)
    mask = torch.rand(N, C, generator=g) < 0.8
    mask[:, 0] = True
    full, _ = grpo_loss(logp, old, ref, adv, mask, norm=norm)
    parts = sum(grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], norm=norm, n_outputs=N,
                          n_tokens=int(mask.sum()))[0] for s in (slice(0, 3), slice(3, 8)))
    torch.testing.assert_close(full, parts)


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.1, 1.1, 1.1, 1.1], [0.0, 0.0, 0.0, 1.1]])
    a = group_advantages(r, eps=1e-4)
    for row, out in zip(r, a):
        mean = sum(row.tolist()) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in row.tolist()) / 3)      # sample std, n − 1
        for x, y in zip(row.tolist(), out.tolist()):
            assert math.isclose(y, (x - mean) / (std + 1e-4), rel_tol=1e-5, abs_tol=1e-6)
    assert a[1].abs().max() == 0                                              # all equal: no signal
    assert torch.allclose(a.mean(dim=1), torch.zeros(3), atol=1e-6)


def test_completion_logprobs_against_full_log_softmax():
    model = random_model(preset("tiny"))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 2, 9)]
    completions = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (4, 7, 1)]
    ids, start, targets, mask = batch(prompts, completions, pad_id=2, device="cpu")
    with torch.no_grad():
        got = completion_logprobs(model, ids, start, targets, mask)
        for b, (p, c) in enumerate(zip(prompts, completions)):
            seq = torch.tensor([p + c])
            logits = model(seq).logits[0].log_softmax(-1)
            want = torch.stack([logits[len(p) - 1 + j, t] for j, t in enumerate(c)])
            torch.testing.assert_close(got[b, : len(c)], want, rtol=1e-4, atol=1e-5)
            assert (got[b, len(c):] == 0).all()
    # and the gradient reaches the model
    completion_logprobs(model, ids, start, targets, mask).sum().backward()
    assert model.lm_head.weight.grad is not None and model.embed_tokens.weight.grad.abs().sum() > 0
