"""SFT data: chat conversations -> token ids with assistant-only labels -> packed rows with document masks.

A conversation is rendered with the tokenizer's chat template one message at a time, so that every token
knows which message it came from. The loss falls only on what the model is meant to say: the content of each
assistant message and the eos that ends it, never the system prompt, the user's turn or the `<|assistant|>`
tag that opens the reply (the prompt already contains it at inference).

Packing: samples are concatenated into rows of seq_len tokens (next-fit, in a seeded shuffled order) and each
token attends only within its own sample (a block-diagonal causal mask), so packing changes the speed and
nothing else. RoPE scores depend only on relative positions, so a sample placed mid-row sees the same scores.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

import torch

from ..io.jsonl import read_jsonl

IGNORE = -100
ROLES = ("system", "user", "assistant")


def read_chat_jsonl(path: str) -> list[list[dict]]:
    """Conversations of a JSONL file, one {"messages": [{"role", "content"}, ...]} per line."""
    out = []
    for where, row in read_jsonl(path, "SFT data"):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: needs a non-empty 'messages' list")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: each message needs a role in {ROLES} and a string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: no assistant message to learn from")
        out.append(messages)
    return out


def write_chat_jsonl(path: str, conversations: list[list[dict]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(token ids, is_target per token). Each assistant message is split off from the text before it at the
    generation prompt (render(messages[:k], add_generation_prompt=True)); the segments are encoded separately,
    which for a template whose segments meet at special tokens gives the same ids as encoding the whole text."""
    ids, target, done = [], [], ""
    for k, m in enumerate(messages):
        reply = m["role"] == "assistant"
        cuts = [(tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True), False)] if reply else []
        cuts.append((tokenizer.apply_chat_template(messages[: k + 1], add_generation_prompt=False), reply))
        for text, is_target in cuts:
            if not text.startswith(done):
                raise ValueError("the chat template does not render a conversation as a prefix of its extension")
            piece = tokenizer.encode(text[len(done):])
            ids += piece
            target += [is_target] * len(piece)
            done = text
    return ids, target


@dataclass
class Packed:
    input_ids: torch.Tensor   # (N, seq_len)
    labels: torch.Tensor      # (N, seq_len): the next token where it is a target, else IGNORE
    docs: torch.Tensor        # (N, seq_len): sample index within the row, the model's doc_ids; padding is -1
    truncated: int            # samples cut to fit seq_len + 1 tokens
    targets: int              # supervised tokens in all rows

    def batch(self, step: int, batch_size: int, seed: int = 0):
        """Rows of optimizer step `step`: epoch after epoch of seeded permutations, a pure function of the step
        (a resumed run needs only the step)."""
        n = len(self.input_ids)
        perms, rows = {}, []
        for i in range(step * batch_size, (step + 1) * batch_size):
            epoch, j = divmod(i, n)
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            rows.append(int(perms[epoch][j]))
        rows = torch.tensor(rows)
        return self.input_ids[rows], self.labels[rows], self.docs[rows]


def pack(samples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int, seed: int = 0) -> Packed:
    """Next-fit packing of (ids, is_target) samples into rows of seq_len input tokens."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    rows: list[tuple[list[int], list[int], list[int]]] = []
    cur = ([], [], [])
    truncated = 0
    for i in order:
        ids, target = samples[i]
        if len(ids) > seq_len + 1:
            ids, target = ids[: seq_len + 1], target[: seq_len + 1]
            truncated += 1
        if len(ids) < 2:
            continue
        # a sample of n tokens gives n-1 (input, next token) pairs
        x = ids[:-1]
        y = [t if is_t else IGNORE for t, is_t in zip(ids[1:], target[1:])]
        if len(cur[0]) + len(x) > seq_len:
            rows.append(cur)
            cur = ([], [], [])
        doc = cur[2][-1] + 1 if cur[2] else 0
        cur[0].extend(x)
        cur[1].extend(y)
        cur[2].extend([doc] * len(x))
    if cur[0]:
        rows.append(cur)
    if not rows:
        raise ValueError("no SFT sample has two or more tokens")
    N = len(rows)
    input_ids = torch.full((N, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((N, seq_len), IGNORE, dtype=torch.long)
    docs = torch.full((N, seq_len), -1, dtype=torch.long)
    for r, (x, y, d) in enumerate(rows):
        input_ids[r, : len(x)] = torch.tensor(x)
        labels[r, : len(y)] = torch.tensor(y)
        docs[r, : len(d)] = torch.tensor(d)
    return Packed(input_ids, labels, docs, truncated, int((labels != IGNORE).sum()))
