"""Data layer: tokenizer files interoperable with transformers, corpus, prepare, deterministic loader."""
import json

import numpy as np
import pytest
import torch

from nanoseek.data import TokenLoader, Tokenizer, default_corpus, prepare, train_tokenizer
from nanoseek.data.tokenizer import SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(default_corpus(n_docs=300) + ["héllo wörld 你好 🙂"], 400)


def test_round_trip_and_special_tokens(tok):
    for text in ["  leading spaces\n\ttabs", "héllo wörld 你好 🙂", "<think>why</think> 42<|end_of_text|>"]:
        assert tok.decode(tok.encode(text)) == text
    for s in SPECIAL_TOKENS:
        ids = tok.encode(f"a{s}b")
        assert tok.token_to_id(s) in ids and len([i for i in ids if i == tok.token_to_id(s)]) == 1
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.encode("x", add_bos=True)[0] == tok.bos_id


def test_transformers_reads_the_same_files(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Mia has 3 apples.<|end_of_text|> Q: Where? <think>x</think>"
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf.eos_token == "<|end_of_text|>"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>add</think>4"}, {"role": "user", "content": "3+3?"}]
    ours = tok.apply_chat_template(msgs)
    assert ours == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours == "<|system|>Be brief.<|user|>2+2?<|assistant|><think>add</think>4<|end_of_text|><|user|>3+3?<|assistant|>"
    assert Tokenizer.from_dir(str(tmp_path)).encode(text) == tok.encode(text)


def test_corpus_is_deterministic():
    assert default_corpus(seed=3, n_docs=50) == default_corpus(seed=3, n_docs=50)
    assert default_corpus(seed=3, n_docs=50) != default_corpus(seed=4, n_docs=50)


def test_prepare_default_corpus_and_loader(tmp_path, monkeypatch):
    import importlib
    prep = importlib.import_module("nanoseek.data.prepare")
    monkeypatch.setattr(prep, "default_corpus", lambda seed: default_corpus(seed, n_docs=400))
    info = prepare(None, str(tmp_path), vocab_size=350, val_fraction=0.05)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["val_docs"] == 20 and info["train_docs"] == 380
    train = np.memmap(tmp_path / "train.bin", dtype=np.uint16, mode="r")
    assert (train == meta["eos_id"]).sum() == 380          # each document ends with eos
    loader = TokenLoader(str(tmp_path), "train", batch_size=4, seq_len=32, seed=1)
    x, y = loader.batch(5)
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(loader.batch(5)[0], x) and not torch.equal(loader.batch(6)[0], x)
    x2, _, docs = loader.batch(5, doc_ids=True)
    assert torch.equal(x2, x) and (docs.diff(dim=1) >= 0).all()
    assert len(loader.val_batches(3)) == 3


def test_prepare_jsonl_and_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i} text"}) for i in range(30)))
    (tmp_path / "b.txt").write_text("first doc\nstill first\n\nsecond doc\n")
    info = prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "o1"), vocab_size=300, text_key="body")
    assert info["train_docs"] + info["val_docs"] == 30
    info = prepare([str(tmp_path / "b.txt")], str(tmp_path / "o2"), vocab_size=300, val_fraction=0.5)
    assert info["train_docs"] + info["val_docs"] == 2


def test_errors_name_the_problem(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        prepare([str(tmp_path / "empty.txt")], str(tmp_path / "o"))
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"x.jsonl:1: no field 'text'"):
        prepare([str(tmp_path / "x.jsonl")], str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="input not found"):
        prepare([str(tmp_path / "nope.txt")], str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(str(tmp_path))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"w{i}"}) for i in range(10)))
    prepare([str(tmp_path / "d.jsonl")], str(tmp_path / "short"), vocab_size=300, val_fraction=0.1)
    with pytest.raises(ValueError, match=r"val.bin has \d+ tokens, need at least seq_len\+1 = 65"):
        TokenLoader(str(tmp_path / "short"), "val", 2, 64)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TokenLoader(str(tmp_path), "train", 2, 8)
