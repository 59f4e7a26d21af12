"""Inference: sampler, text stream, batched generate, the continuous-batching engine, MTP speculation.

Reference equalities, all on a tiny random (or briefly trained) model on CPU:
  batched generate == one prompt at a time;  engine (fewer slots than requests, so requests join and leave
  between steps) == generate, greedy and seeded sampling;  speculative greedy == plain greedy.
"""
import pytest
import torch
from nanoseek.config import preset
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.infer.engine import Engine, QueueFull
from nanoseek.infer.generate import generate, generate_ids
from nanoseek.infer.sample import Sampler, SamplingParams, draw
from nanoseek.infer.speculative import verify
from nanoseek.infer.text import TextStream
from nanoseek.model import DeepSeekV3

from .helpers import random_model

TEXTS = ["the quick brown fox jumps over the lazy dog. ", "naïve café 東京 🙂 ", "hello world, hello nanoseek! "]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny ops: a second thread only adds synchronization (and stalls badly on a loaded machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS * 20, 300)


@pytest.fixture(scope="module")
def model():
    return random_model(preset("tiny"))


def _prompts(tok):
    return [tok.encode(s) for s in ["hello world", "the quick brown fox jumps over", "naïve", "東京 🙂 dog",
                                    "a", "lazy lazy lazy dog the fox"]]


# ---- sampling --------------------------------------------------------------------------------------------------
def test_sampler_greedy_and_filters():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    u = torch.rand(4)
    greedy = logits.argmax(-1)
    for p in [SamplingParams(), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)]:
        assert torch.equal(Sampler([p] * 4, "cpu").sample(logits, u), greedy)
    # top-k: only the k most likely tokens are ever drawn
    s = Sampler([SamplingParams(temperature=1.5, top_k=3)] * 4, "cpu")
    top3 = logits.topk(3).indices
    for _ in range(20):
        assert (s.sample(logits, torch.rand(4))[:, None] == top3).any(-1).all()


def test_draw_follows_the_distribution():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 40000
    probs, ids = p.sort(descending=True)
    tokens = draw(probs.expand(n, 4), ids.expand(n, 4), torch.rand(n, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(torch.bincount(tokens, minlength=4) / n, p, atol=0.01)


def test_speculative_sampling_follows_the_target():
    """Accept with p(d), else draw from p without d: the first token is distributed as p, whatever the draft."""
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0, 2.0]).log_softmax(-1)
    p = (logits / 0.8).softmax(-1)
    n = 40000
    g = torch.Generator().manual_seed(2)
    s = Sampler([SamplingParams(temperature=0.8)] * n, "cpu")
    two = logits.expand(n, 2, 5)
    drafts = torch.full((n,), 1)
    accepted, first, _ = verify(s, two, drafts, torch.rand(n, generator=g), torch.rand(n, generator=g))
    assert abs(accepted.float().mean() - p[1]) < 0.01
    assert torch.equal(first[accepted], drafts[accepted])
    assert torch.allclose(torch.bincount(first, minlength=5) / n, p, atol=0.01)


# ---- text -------------------------------------------------------------------------------------------------------
def test_text_stream_multibyte_and_stop(tok):
    ids = tok.encode("naïve café 東京 🙂 the end")
    s = TextStream(tok)
    deltas = [s.push(t) for t in ids] + [s.flush()]
    assert "".join(deltas) == tok.decode(ids) and all("\ufffd" not in d for d in deltas)
    # a stop string spanning tokens: nothing of it is emitted, and emission stops there
    s = TextStream(tok, stop=["東京 🙂"])
    out = ""
    for t in ids:
        out += s.push(t)
        if s.stopped:
            break
    out += s.flush()
    assert s.stopped and out == "naïve café " and s.text == out


# ---- generate -------------------------------------------------------------------------------------------------
def test_batched_generate_equals_one_at_a_time(model, tok):
    prompts = _prompts(tok)
    params = [SamplingParams(max_tokens=10 + i, ignore_eos=True) for i in range(len(prompts))]
    batched = generate_ids(model, prompts, params)
    assert batched == [generate_ids(model, [p], [q])[0] for p, q in zip(prompts, params)]
    assert [len(b) for b in batched] == [q.max_tokens for q in params]
    # seeded sampling: a prompt's draw depends on its own seed only
    params = [SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=i) for i in range(len(prompts))]
    assert generate_ids(model, prompts, params) == [generate_ids(model, [p], [q])[0]
                                                    for p, q in zip(prompts, params)]


def test_generate_text_api(model, tok):
    texts = ["hello world", "the quick brown fox"]
    out = generate(model, tok, texts, max_new_tokens=12)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert out == [generate(model, tok, [t], max_new_tokens=12)[0] for t in texts]
    cut = out[0][2:4]
    if cut:  # a stop string inside the greedy completion ends it just before its first occurrence
        assert generate(model, tok, texts[:1], max_new_tokens=12, stop=[cut])[0] == out[0][: out[0].find(cut)]
    with pytest.raises(ValueError):
        generate(model, tok, texts, temperature=-1)


# ---- engine ----------------------------------------------------------------------------------------------------
def _run_engine(model, tok, prompts, params, **kw):
    engine = Engine(model, tok, max_len=64, **kw)
    reqs = [engine.submit(p, q) for p, q in zip(prompts, params)]
    engine.run_until_done(max_steps=500)
    return engine, reqs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_equals_generate(model, tok, temperature):
    prompts = _prompts(tok) * 2
    params = [SamplingParams(max_tokens=5 + 3 * (i % 4), temperature=temperature, top_k=40, seed=i)
              for i in range(len(prompts))]
    ref = generate_ids(model, prompts, params, eos_id=tok.eos_id)
    engine, reqs = _run_engine(model, tok, prompts, params, max_batch=3)
    assert [r.tokens for r in reqs] == ref
    assert all(r.finish_reason in ("stop", "length") for r in reqs) and engine.running == 0
    # text events add up to the decoded completion
    for r in reqs:
        assert r.finish_reason == "stop" or len(r.tokens) == r.params.max_tokens
        assert "".join(ev.text for ev in iter_events(r)) == tok.decode(r.tokens)


def iter_events(req):
    events = []
    while not req._queue.empty():
        events.append(req._queue.get())
    assert events[-1].finish_reason == req.finish_reason
    return events


def test_engine_cancel_and_limits(model, tok):
    prompts = _prompts(tok)[:3]
    params = [SamplingParams(max_tokens=20, ignore_eos=True) for _ in prompts]
    ref = generate_ids(model, prompts, params)
    engine = Engine(model, tok, max_batch=2, max_len=64, max_waiting=3)
    reqs = [engine.submit(p, q) for p, q in zip(prompts, params)]
    with pytest.raises(QueueFull):
        engine.submit(prompts[0], params[0])
    with pytest.raises(ValueError, match="context"):
        engine.submit(prompts[0], SamplingParams(max_tokens=64))
    for _ in range(3):
        engine.step()
    reqs[0].cancel()
    engine.run_until_done(max_steps=100)
    assert reqs[0].finish_reason == "cancelled" and len(reqs[0].tokens) < 20
    assert [r.tokens for r in reqs[1:]] == ref[1:]   # the freed slot went to the waiting request


def test_engine_thread_streams_events(model, tok):
    engine = Engine(model, tok, max_batch=4, max_len=64).start()
    try:
        reqs = [engine.submit(p, SamplingParams(max_tokens=6, stop=["o"])) for p in _prompts(tok)]
        for r in reqs:
            events = list(r)
            assert events[-1].finish_reason in ("stop", "length")
            text = "".join(e.text for e in events)
            assert "o" not in text and text == r.stream.text
    finally:
        engine.stop()
    assert not engine._thread.is_alive()


# ---- speculative decoding ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    """A tiny model trained for a second on t_{i+1} = perm(t_i) over 32 tokens, so that its MTP module
    drafts well inside the pattern and arbitrarily outside it: acceptances and rejections both happen."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    m = DeepSeekV3(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(32, generator=g)
    for _ in range(12):
        seq = torch.empty(16, 25, dtype=torch.long)
        seq[:, 0] = torch.randint(0, 32, (16,), generator=g)
        for i in range(1, 25):
            seq[:, i] = perm[seq[:, i - 1]]
        loss = m.loss(seq[:, :-1] + 2, seq[:, 1:] + 2, mtp_lambda=1.0)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    in_pattern = [[2 + int(x) for x in (perm[perm[perm[torch.tensor(s)]]], perm[torch.tensor(s)])] for s in
                  range(4)]
    out_of_pattern = [torch.randint(34, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 7, 11, 5)]
    return m.eval(), in_pattern + out_of_pattern


@pytest.mark.parametrize("max_batch", [8, 3])
def test_speculative_greedy_equals_plain(trained, tok, max_batch):
    model, prompts = trained
    params = [SamplingParams(max_tokens=12 + i, ignore_eos=True) for i in range(len(prompts))]
    ref = generate_ids(model, prompts, params)
    engine, reqs = _run_engine(model, tok, prompts, params, max_batch=max_batch, speculative=True)
    assert [r.tokens for r in reqs] == ref
    accepted, drafted = engine.stats["accepted"], engine.stats["drafted"]
    assert 0 < accepted < drafted                      # both paths (accept, roll back) exercised
    assert engine.stats["steps"] < sum(q.max_tokens for q in params)


def test_speculative_sampling_runs(trained, tok):
    model, prompts = trained
    params = [SamplingParams(max_tokens=10, temperature=0.7, seed=i, stop=["\n"]) for i in range(len(prompts))]
    _, reqs = _run_engine(model, tok, prompts, params, max_batch=4, speculative=True)
    _, again = _run_engine(model, tok, prompts, params, max_batch=2, speculative=True)
    assert [r.tokens for r in reqs] == [r.tokens for r in again]   # seeded: reproducible, batch-independent
    assert all(r.finish_reason in ("stop", "length") for r in reqs)
