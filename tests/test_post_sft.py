"""SFT data: assistant-only labels from the chat template, both V3 sample kinds, and packing that changes
nothing but speed (a packed row with a document mask scores each sample as if it were alone)."""
import json

import pytest
import torch

from nanoseek.config import preset
from nanoseek.data.tokenizer import SPECIAL_TOKENS, train_tokenizer
from nanoseek.model.mla import document_mask
from nanoseek.post.chat import IGNORE, encode_chat, pack, read_chat_jsonl
from nanoseek.post.tasks import REASONING_PROMPT, get_task

from .helpers import random_model


@pytest.fixture(scope="module")
def tok():
    texts = ["What is 12 + 7? The answer is 19.", "Think step by step, then answer in \\boxed{19}.",
             "7 + 5 = 12. 4 + 8 + 1 = 13."] * 30
    return train_tokenizer(texts, 400)


def test_assistant_only_labels(tok):
    messages = [{"role": "system", "content": "Think."}, {"role": "user", "content": "What is 12 + 7?"},
                {"role": "assistant", "content": "<think>2 + 7 = 9.</think> \\boxed{19}"},
                {"role": "user", "content": "And 1 + 1?"}, {"role": "assistant", "content": "\\boxed{2}"}]
    ids, target = encode_chat(tok, messages)
    assert ids == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False))
    supervised = tok.decode([i for i, t in zip(ids, target) if t])
    eos = tok.eos_token
    assert supervised == f"<think>2 + 7 = 9.</think> \\boxed{{19}}{eos}\\boxed{{2}}{eos}"
    context = tok.decode([i for i, t in zip(ids, target) if not t])
    assert context == "<|system|>Think.<|user|>What is 12 + 7?<|assistant|><|user|>And 1 + 1?<|assistant|>"


def test_task_gives_both_v3_sample_kinds():
    task = get_task("arithmetic")
    p = task.problems("train", 1)[0]
    plain, reasoning = task.sft_samples(p)
    assert [m["role"] for m in plain] == ["user", "assistant"]
    assert plain[-1]["content"] == f"\\boxed{{{p.answer}}}"
    assert [m["role"] for m in reasoning] == ["system", "user", "assistant"]
    assert reasoning[0]["content"] == REASONING_PROMPT
    assert reasoning[-1]["content"].startswith("<think>") and "</think> \\boxed{" in reasoning[-1]["content"]


def test_packing_is_exact(tok):
    task = get_task("arithmetic")
    samples = [encode_chat(tok, m) for p in task.problems("train", 3) for m in task.sft_samples(p)]
    packed = pack(samples, seq_len=256, pad_id=tok.pad_id)
    assert packed.input_ids.shape[0] == 1 and packed.truncated == 0
    assert packed.targets == sum(sum(t[1:]) for _, t in samples)
    model = random_model(preset("tiny", vocab_size=tok.vocab_size))
    with torch.no_grad():
        got = model.loss(packed.input_ids, packed.labels, doc_ids=packed.docs).ce
        total, count = 0.0, 0
        for ids, target in samples:   # each sample alone, from position 0
            x = torch.tensor([ids[:-1]])
            y = torch.tensor([[t if m else IGNORE for t, m in zip(ids[1:], target[1:])]])
            n = int((y != IGNORE).sum())
            total += float(model.loss(x, y).ce) * n
            count += n
    torch.testing.assert_close(float(got), total / count, rtol=1e-5, atol=1e-6)


def test_pack_rows_batches_and_truncation(tok):
    samples = [([5] * n, [False] + [True] * (n - 1)) for n in (10, 30, 50, 70, 300)]
    packed = pack(samples, seq_len=100, pad_id=tok.pad_id, seed=0)
    assert packed.truncated == 1
    assert packed.input_ids.shape[1] == 100
    for row_docs, row_labels in zip(packed.docs, packed.labels):
        assert ((row_docs == -1) <= (row_labels == IGNORE)).all()        # padding is never a target
    x1, _, _ = packed.batch(3, 2, seed=1)
    x2, _, _ = packed.batch(3, 2, seed=1)
    assert torch.equal(x1, x2)
    mask = document_mask(torch.tensor([[0, 0, 1, 1, -1]]))
    assert mask[0].tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                                [0, 0, 0, 0, 1]]


def test_read_chat_jsonl(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n\n")
    assert len(read_chat_jsonl(str(good))) == 1
    for row, err in [({"messages": []}, "non-empty"), ({"messages": [{"role": "bot", "content": "x"}]}, "role"),
                     ({"messages": [{"role": "user", "content": "x"}]}, "no assistant")]:
        bad = tmp_path / "b.jsonl"
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=err):
            read_chat_jsonl(str(bad))
    assert set(SPECIAL_TOKENS) >= {"<think>", "</think>"}
