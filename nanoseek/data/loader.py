"""Packed-sequence batches from a token shard written by `prepare`: random windows of seq_len+1 tokens that cross
document boundaries (eos separates documents). A batch is a pure function of (seed, split, step), so resuming a
run needs only the step, and no state has to be saved."""
from __future__ import annotations

import json
import os
import zlib

import numpy as np
import torch

EVAL_SEED = 1234   # val_batches ignore the run's seed: runs with different seeds are scored on the same windows


class TokenLoader:
    def __init__(self, data_dir: str, split: str, batch_size: int, seq_len: int, seed: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"no meta.json in {data_dir} (run `nanoseek prepare` first)")
        with open(meta_path) as f:
            meta = json.load(f)
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing {path}")
        dtype = np.dtype(meta["dtype"])
        n = os.path.getsize(path) // dtype.itemsize
        if n < seq_len + 1:
            raise ValueError(f"{path} has {n} tokens, need at least seq_len+1 = {seq_len + 1}")
        self.tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
        self.eos_id = meta["eos_id"]
        self.batch_size, self.seq_len, self.seed, self.split = batch_size, seq_len, seed, split
        self._split_key = zlib.crc32(split.encode())   # a stable number per split (Python's hash() is salted)

    def batch(self, step: int, doc_ids: bool = False):
        """(x, y) int64 (batch_size, seq_len), y = x shifted by one. With doc_ids, also a (batch_size, seq_len)
        int64 index of each x token's document within its row (0, 1, ...: it goes up after each eos), for
        document masking: a token attends only to earlier tokens with the same index."""
        return self._batch(self.seed, step, doc_ids)

    def val_batches(self, n: int, doc_ids: bool = False) -> list:
        """The same n batches on every call and in every run of this data, for comparable evaluations."""
        return [self._batch(EVAL_SEED, i, doc_ids) for i in range(n)]

    def _batch(self, seed: int, step: int, doc_ids: bool):
        rng = np.random.default_rng([seed, self._split_key, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        window = torch.from_numpy(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64))
        x, y = window[:, :-1], window[:, 1:]
        if not doc_ids:
            return x, y
        ends = (x[:, :-1] == self.eos_id).long()   # a new document starts right after each eos
        return x, y, torch.cat([torch.zeros_like(x[:, :1]), ends.cumsum(dim=1)], dim=1)
