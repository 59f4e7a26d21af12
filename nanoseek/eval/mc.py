"""Perplexity-based multiple choice (the V3 report's HellaSwag / PIQA / ARC / MMLU style): no generation; the
model scores each option as a continuation of the question and the likeliest option is its answer.

    LL(option)  = Σ_t log p(c_t | question, c_<t)     over the option's tokens c (delimiter + option text)
    acc         = share of items where argmax LL is the right option
    acc_norm    = the same with LL / (bytes of delimiter + option): long options are not penalized for their
                  length (lm-evaluation-harness's acc_norm, normalized by the continuation's length in bytes)
The question and the option are tokenized separately (as the harness does), so every option is scored on the
same question tokens. JSONL: {"question": ..., "choices": [...], "answer": index or the right choice's text}.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..io.jsonl import read_jsonl
from ..post.logprobs import batch, completion_logprobs


@dataclass
class Item:
    question: str
    choices: list[str]
    answer: int


def read_mc(path: str) -> list[Item]:
    items = []
    for where, row in read_jsonl(path, "multiple-choice file"):
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(row.get("question"), str) or not isinstance(choices, list) or len(choices) < 2:
            raise ValueError(f"{where}: needs 'question' and a list of at least 2 'choices'")
        if isinstance(answer, str):
            if answer not in choices:
                raise ValueError(f"{where}: answer {answer!r} is not one of the choices")
            answer = choices.index(answer)
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: 'answer' must be a choice index or a choice's text")
        items.append(Item(row["question"], [str(c) for c in choices], answer))
    if not items:
        raise ValueError(f"{path}: no items")
    return items


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32) -> list[float]:
    """Σ log p(continuation | context) of each (context, continuation) pair."""
    device = next(model.parameters()).device
    # an empty context still needs a token to predict the first continuation token from
    contexts = [tokenizer.encode(c) or [tokenizer.eos_id] for c, _ in pairs]
    conts = [tokenizer.encode(c) for _, c in pairs]
    if any(not c for c in conts):
        raise ValueError("an empty continuation has no likelihood to compare")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    out = []
    for lo in range(0, len(pairs), batch_size):
        ids, start, targets, mask = batch(contexts[lo: lo + batch_size], conts[lo: lo + batch_size], pad, device)
        out += completion_logprobs(model, ids, start, targets, mask).sum(dim=1).tolist()
    return out


def evaluate(model, tokenizer, items: list[Item], delimiter: str = " ", batch_size: int = 32,
             details: list | None = None) -> dict:
    pairs = [(it.question, delimiter + c) for it in items for c in it.choices]
    ll = loglikelihoods(model, tokenizer, pairs, batch_size)
    acc = acc_norm = 0
    k = 0
    for it in items:
        scores = ll[k: k + len(it.choices)]
        conts = pairs[k: k + len(it.choices)]
        k += len(it.choices)
        norm = [s / len(c.encode("utf-8")) for s, (_, c) in zip(scores, conts)]
        pick, pick_norm = max(range(len(scores)), key=scores.__getitem__), max(range(len(norm)), key=norm.__getitem__)
        acc += pick == it.answer
        acc_norm += pick_norm == it.answer
        if details is not None:
            details.append({"question": it.question, "answer": it.answer, "loglikelihoods": scores,
                            "pick": pick, "pick_norm": pick_norm})
    n = len(items)
    return {"n": n, "acc": acc / n, "acc_norm": acc_norm / n}
