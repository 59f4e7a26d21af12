"""`nanoseek prepare`: documents -> tokenizer + token shards (numpy memmaps) + meta.json.

Inputs: files or directories (searched recursively, in sorted order) of
  .txt      documents separated by blank lines (a line of only whitespace counts as blank); each is stripped
  .jsonl    one JSON object per line, the document in field `text_key` (null: an empty document)
  .parquet  column `text_key` (needs pyarrow)
or none at all: the embedded default corpus. Empty documents are dropped.

Output in out_dir: tokenizer.json + tokenizer_config.json, train.bin and val.bin (token ids, uint16 when the vocab
fits, else uint32; every document is followed by eos, which marks document boundaries in the stream), and
meta.json, written last: a directory with meta.json is complete. The split is by document, a seeded shuffle,
with at least one document in each split; a single document instead gives its last val_fraction of tokens to val.
"""
from __future__ import annotations

import json
import os
import random
import re

import numpy as np

from ..io.jsonl import read_jsonl
from .corpus import default_corpus
from .tokenizer import Tokenizer, train_tokenizer

SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKENIZER_SAMPLE_CHARS = 50_000_000   # BPE trains on a random sample of documents up to this much text
ENCODE_CHUNK = 4096                   # documents encoded (in parallel) and written at a time


def find_files(inputs: list[str]) -> list[str]:
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
        raise ValueError(f"no input files: nothing ending in {', '.join(SUFFIXES)} in {', '.join(inputs) or '[]'}")
    return out


def _text(where: str, value, text_key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field '{text_key}' is not a string ({type(value).__name__})")
    return value


def read_documents(path: str, text_key: str = "text") -> list[str]:
    """The documents of one file (see the module docstring for the formats). ValueError naming the file when
    it cannot be read or lacks text_key."""
    try:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                return [d.strip() for d in re.split(r"\n\s*\n", f.read())]
        if path.endswith(".jsonl"):
            docs = []
            for where, row in read_jsonl(path, "input file"):
                if text_key not in row:
                    raise ValueError(f"{where}: no field '{text_key}'")
                docs.append(_text(where, row[text_key], text_key))
            return docs
        return _read_parquet(path, text_key)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: unreadable ({e.strerror or e})") from None


def _read_parquet(path: str, text_key: str) -> list[str]:
    try:   # optional: only parquet inputs need it
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        names = pq.read_schema(path).names
        if text_key not in names:
            raise ValueError(f"{path}: no column '{text_key}' (columns: {', '.join(names)})")
        column = pq.read_table(path, columns=[text_key]).column(text_key).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: unreadable parquet ({e})") from None
    return [_text(f"{path} row {i}", v, text_key) for i, v in enumerate(column)]


def _tokenizer_sample(docs: list[str], seed: int) -> list[str]:
    """All documents if they are small enough, else a random subset of about TOKENIZER_SAMPLE_CHARS."""
    if sum(map(len, docs)) <= TOKENIZER_SAMPLE_CHARS:
        return docs
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    sample, total = [], 0
    for i in order:
        if total >= TOKENIZER_SAMPLE_CHARS:
            break
        sample.append(docs[i])
        total += len(docs[i])
    return sample


def _write_shards(tok: Tokenizer, docs: list[str], is_val: np.ndarray, paths: dict, dtype) -> dict:
    """Encodes documents chunk by chunk and appends each, eos-terminated, to its split's file; -> token counts.
    Memory stays at the text plus one chunk of ids."""
    counts = {"train": 0, "val": 0}
    files = {split: open(path, "wb") for split, path in paths.items()}
    try:
        for lo in range(0, len(docs), ENCODE_CHUNK):
            for i, ids in enumerate(tok.encode_batch(docs[lo: lo + ENCODE_CHUNK]), start=lo):
                split = "val" if is_val[i] else "train"
                np.asarray(ids + [tok.eos_id], dtype=dtype).tofile(files[split])
                counts[split] += len(ids) + 1
    finally:
        for f in files.values():
            f.close()
    return counts


def prepare(inputs: list[str] | None, out_dir: str, vocab_size: int = 4096, tokenizer: str | None = None,
            val_fraction: float = 0.01, seed: int = 0, text_key: str = "text") -> dict:
    """Writes out_dir (see the module docstring); -> a summary: vocab size, tokens and documents per split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if inputs is None:
        docs, source = default_corpus(seed), f"embedded default corpus (seed {seed}; generated text, MIT)"
    else:
        files = find_files(inputs)
        docs = [d for p in files for d in read_documents(p, text_key) if d.strip()]
        source = f"{', '.join(inputs)} ({len(files)} file{'s' * (len(files) != 1)})"
    if not docs:
        raise ValueError(f"no non-empty documents in {source}")

    if tokenizer:
        tok = Tokenizer.from_dir(tokenizer)
    else:
        tok = train_tokenizer(_tokenizer_sample(docs, seed), vocab_size)
    if tok.eos_id is None:
        raise ValueError(f"the tokenizer in {tokenizer} has no eos token (needed to mark document boundaries)")
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)

    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):   # until the new meta.json lands, the directory must not look finished
        os.remove(meta_path)
    paths = {s: os.path.join(out_dir, f"{s}.bin") for s in ("train", "val")}
    tmp = {s: p + ".tmp" for s, p in paths.items()}

    n = len(docs)
    is_val = np.zeros(n, dtype=bool)
    if n >= 2:
        n_val = min(n - 1, max(1, round(n * val_fraction)))
        is_val[random.Random(seed).sample(range(n), n_val)] = True
        counts = _write_shards(tok, docs, is_val, tmp, dtype)
        doc_counts = {"train": n - n_val, "val": n_val}
    else:   # one document: hold out its tail
        stream = np.asarray(tok.encode(docs[0]) + [tok.eos_id], dtype=dtype)
        cut = len(stream) - max(1, int(len(stream) * val_fraction))
        stream[:cut].tofile(tmp["train"])
        stream[cut:].tofile(tmp["val"])
        counts, doc_counts = {"train": cut, "val": len(stream) - cut}, {"train": 1, "val": 0}

    tok.save(out_dir)
    for s in paths:
        os.replace(tmp[s], paths[s])
    meta = {"dtype": dtype.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": tok.pad_id, "train_tokens": counts["train"], "val_tokens": counts["val"],
            "train_docs": doc_counts["train"], "val_docs": doc_counts["val"], "source": source,
            "tokenizer": tokenizer or f"trained here (vocab_size={vocab_size})", "val_fraction": val_fraction,
            "seed": seed}
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)
    return {k: meta[k] for k in ("vocab_size", "train_tokens", "val_tokens", "train_docs", "val_docs")}
