"""Packed-sequence batches from a token shard: random windows of seq_len+1 tokens (crossing document boundaries,
which eos marks), a pure function of (seed, step), so resuming needs only the step."""
from __future__ import annotations

import json
import os

import numpy as np
import torch


class TokenLoader:
    def __init__(self, data_dir: str, split: str, batch_size: int, seq_len: int, seed: int = 0):
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"no meta.json in {data_dir} (run `nanoseek prepare` first)")
        with open(meta_path) as f:
            meta = json.load(f)
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing {path}")
        self.tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"{path} has {len(self.tokens)} tokens, need at least seq_len+1 = {seq_len + 1}")
        self.eos_id = meta["eos_id"]
        self.batch_size, self.seq_len, self.seed, self.split = batch_size, seq_len, seed, split

    def batch(self, step: int, doc_ids: bool = False):
        """(x, y) int64 (batch_size, seq_len), y = x shifted by one; with doc_ids also the (B, T) index of each
        token's document inside its window (for document masking: a token attends only within its document)."""
        salt = 0 if self.split == "train" else 1
        rng = np.random.default_rng([self.seed, salt, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        win = torch.from_numpy(np.stack([self.tokens[s: s + self.seq_len + 1].astype(np.int64) for s in starts]))
        x, y = win[:, :-1], win[:, 1:]
        if not doc_ids:
            return x, y
        # a new document starts after each eos
        boundary = torch.zeros_like(x)
        boundary[:, 1:] = (x[:, :-1] == self.eos_id).long()
        return x, y, boundary.cumsum(dim=1)

    def val_batches(self, n: int) -> list:
        """A fixed list of n batches (steps 0..n-1 of this split's seed), for comparable evaluations."""
        return [self.batch(i) for i in range(n)]
