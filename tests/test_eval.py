"""Evaluation: multiple-choice log-likelihoods against values computed by hand from a model whose next-token
distribution is a known table, acc vs acc_norm, and generation metrics (exact match, pass@1, maj@k) on canned
completions; the `nanoseek eval` table and JSON."""
import json
import math

import pytest
import torch
from torch import nn

from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.eval import gen, mc, run
from nanoseek.post.rollout import Completion
from nanoseek.post.tasks import Problem, get_task


class Bigram(nn.Module):
    """p(next = v | current = u) = P[u, v]: hidden is the one-hot current token and the head holds log P, so the
    model's log-softmax is exactly log P."""

    def __init__(self, P: torch.Tensor):
        super().__init__()
        self.V = P.shape[0]
        self.lm_head = nn.Linear(self.V, self.V, bias=False)
        self.lm_head.weight.data = P.log().t().contiguous()   # logits[v] = W[v, u] = log P[u, v]

    def forward(self, ids, logits=False):
        return type("Out", (), {"hidden": nn.functional.one_hot(ids, self.V).float()})


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["the cat sat on the mat. a dog ran far away. yes no maybe."] * 20, 300)


def test_mc_loglikelihoods_by_hand(tok):
    g = torch.Generator().manual_seed(0)
    P = torch.rand(tok.vocab_size, tok.vocab_size, generator=g) ** 4
    P = P / P.sum(dim=1, keepdim=True)
    model = Bigram(P)
    items = [mc.Item("the cat sat on the", ["mat", "dog ran far away", "cat"], 0),
             mc.Item("a dog", ["ran", "sat", "yes no maybe"], 2),
             mc.Item("", ["yes", "no"], 1)]
    details = []
    result = mc.evaluate(model, tok, items, details=details)

    acc = acc_norm = 0
    for it, d in zip(items, details):
        context = tok.encode(it.question) or [tok.eos_id]
        by_hand = []
        for choice in it.choices:
            cont = tok.encode(" " + choice)
            prev, ll = context[-1], 0.0
            for t in cont:                       # Σ_t log p(c_t | c_{t-1})
                ll += math.log(float(P[prev, t]))
                prev = t
            by_hand.append(ll)
        assert d["loglikelihoods"] == pytest.approx(by_hand, rel=1e-5)
        acc += max(range(len(by_hand)), key=by_hand.__getitem__) == it.answer
        per_byte = [ll / len((" " + c).encode()) for ll, c in zip(by_hand, it.choices)]
        acc_norm += max(range(len(per_byte)), key=per_byte.__getitem__) == it.answer
    assert result == {"n": 3, "acc": acc / 3, "acc_norm": acc_norm / 3}


def test_acc_norm_differs_from_acc(tok):
    """A long option with more total log-likelihood loss but less per byte: acc picks the short one, acc_norm
    the long one."""
    V = tok.vocab_size
    P = torch.full((V, V), 1e-6)
    short, long = tok.encode(" no"), tok.encode(" dog ran far away")
    ctx = tok.encode("a")
    P[ctx[-1], short[0]] = 0.3
    P[ctx[-1], long[0]] = 0.2
    for a, b in zip(long, long[1:]):
        P[a, b] = 0.9
    P = P / P.sum(dim=1, keepdim=True)
    items = [mc.Item("a", ["no", "dog ran far away"], 1)]
    r = mc.evaluate(Bigram(P), tok, items)
    assert r["acc"] == 0 and r["acc_norm"] == 1


def test_read_mc(tmp_path):
    p = tmp_path / "mc.jsonl"
    p.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "b"}) + "\n"
                 + json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n")
    assert [it.answer for it in mc.read_mc(str(p))] == [1, 0]
    p.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(ValueError, match="choice index"):
        mc.read_mc(str(p))


def test_generation_metrics(monkeypatch):
    """exact match on the greedy completion; pass@1 = mean share of right samples; maj@k = the most frequent
    extracted answer (ties: first seen; no answer: no vote)."""
    task = get_task("addition")
    problems = [Problem("What is 1 + 1?", "2", "1+1", (1, 1)), Problem("What is 2 + 2?", "4", "2+2", (2, 2)),
                Problem("What is 3 + 3?", "6", "3+3", (3, 3))]
    box = lambda a: Completion([1], f"<think>x</think> \\boxed{{{a}}}", True)   # noqa: E731
    junk = Completion([1], "<think>x</think></think> \\boxed{6}", True)          # malformed: no answer
    greedy = [[box(2)], [box(5)], [box(6)]]
    sampled = [[box(2), box(3), box(3), box(2.0)],     # 2 right of 4; votes 2:2 3:2 tie -> first seen (2) -> right
               [box(4), box(5), box(5), junk],         # 1 right; majority 5 -> wrong
               [junk, junk, junk, box(6)]]             # 1 right; only one vote, 6 -> right
    calls = []

    def fake_sample(engine, prompts, n, max_tokens, temperature=1.0, **kw):
        calls.append((n, temperature))
        return greedy if n == 1 else sampled

    monkeypatch.setattr(gen, "sample", fake_sample)
    engine = type("E", (), {"tokenizer": type("T", (), {"encode": lambda self, s: [1],
                                                        "apply_chat_template": lambda self, m, **kw: "x"})()})()
    out = gen.evaluate(engine, task, problems, k=4, temperature=0.7)
    assert calls == [(1, 0.0), (4, 0.7)]
    assert out["exact_match"] == pytest.approx(2 / 3)
    assert out["pass@1"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)
    assert out["maj@4"] == pytest.approx(2 / 3)
    assert out["format"] == 1.0


def test_eval_table():
    text = run.table({"arc.jsonl": {"kind": "mc", "n": 10, "acc": 0.5, "acc_norm": 0.6},
                      "arithmetic": {"kind": "gen", "n": 200, "exact_match": 0.25}})
    assert "arc.jsonl" in text and "acc_norm 0.6000" in text and "exact_match 0.2500" in text
