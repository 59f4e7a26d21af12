"""`nanoseek prepare`: documents -> tokenizer + token shards (numpy memmaps) + meta.json.

Inputs: `.txt` (documents separated by blank lines), `.jsonl` (one document per line, field `text_key`),
`.parquet` (column `text_key`, needs pyarrow), or directories of those; none = the embedded default corpus.
Every document is followed by eos, which marks document boundaries in the stream. The train/val split is by
document (deterministic in seed); with a single document the last val_fraction of its tokens is held out.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np

from .corpus import default_corpus
from .tokenizer import Tokenizer, train_tokenizer

SUFFIXES = (".txt", ".jsonl", ".parquet")


def _files(inputs: list[str]) -> list[str]:
    out = []
    for p in inputs:
        if os.path.isdir(p):
            out += sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs if f.endswith(SUFFIXES))
        elif os.path.isfile(p):
            if not p.endswith(SUFFIXES):
                raise ValueError(f"{p}: unsupported file type (use {', '.join(SUFFIXES)})")
            out.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    if not out:
        raise ValueError(f"no {', '.join(SUFFIXES)} files in {', '.join(inputs)}")
    return out


def read_documents(path: str, text_key: str = "text") -> list[str]:
    try:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                return [d.strip() for d in f.read().split("\n\n") if d.strip()]
        if path.endswith(".jsonl"):
            docs = []
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if not isinstance(row, dict) or text_key not in row:
                        raise ValueError(f"{path}:{i}: no field '{text_key}'")
                    docs.append(str(row[text_key]))
            return docs
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        if text_key not in table.column_names:
            raise ValueError(f"{path}: no column '{text_key}' (columns: {', '.join(table.column_names)})")
        return [str(t) for t in table.column(text_key).to_pylist()]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None


def _write(path: str, ids: np.ndarray) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        ids.tofile(f)
    os.replace(tmp, path)


def prepare(inputs: list[str] | None, out_dir: str, vocab_size: int = 4096, tokenizer: str | None = None,
            val_fraction: float = 0.01, seed: int = 0, text_key: str = "text") -> dict:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if inputs:
        files = _files(inputs)
        docs = [d for p in files for d in read_documents(p, text_key) if d.strip()]
        source = ", ".join(files)
    else:
        docs, source = default_corpus(seed), "embedded default corpus (generated, MIT)"
    if not docs:
        raise ValueError(f"no non-empty documents in {source}")
    if tokenizer:
        tok = Tokenizer.from_dir(tokenizer)
    else:
        sample = random.Random(seed).sample(docs, min(len(docs), 50_000))
        tok = train_tokenizer(sample, vocab_size)
    if tok.eos_id is None:
        raise ValueError("the tokenizer has no eos token (needed to mark document boundaries)")
    os.makedirs(out_dir, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    encoded = [ids + [tok.eos_id] for ids in tok.encode_batch(docs)]
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    if len(encoded) >= 2:
        n_val = max(1, round(len(encoded) * val_fraction))
        val_docs, train_docs = order[:n_val], order[n_val:]
        train = np.fromiter((t for i in train_docs for t in encoded[i]), dtype=dtype)
        val = np.fromiter((t for i in val_docs for t in encoded[i]), dtype=dtype)
    else:
        stream = np.asarray(encoded[0], dtype=dtype)
        cut = len(stream) - max(1, int(len(stream) * val_fraction))
        train, val, train_docs, val_docs = stream[:cut], stream[cut:], [0], []
    tok.save(out_dir)
    _write(os.path.join(out_dir, "train.bin"), train)
    _write(os.path.join(out_dir, "val.bin"), val)
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "train_tokens": int(train.size), "val_tokens": int(val.size), "train_docs": len(train_docs),
            "val_docs": len(val_docs), "source": source}
    with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))
    return {k: meta[k] for k in ("vocab_size", "train_tokens", "val_tokens", "train_docs", "val_docs")}
