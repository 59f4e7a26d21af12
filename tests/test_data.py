"""Data layer: tokenizer files interoperable with transformers, chat template, corpus, prepare, deterministic loader."""
import importlib
import json
import re
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from nanoseek.data import SPECIAL_TOKENS, TokenLoader, Tokenizer, default_corpus, default_prompts, prepare, \
    train_tokenizer
from nanoseek.data.corpus import SHE, world

prep = importlib.import_module("nanoseek.data.prepare")   # the module; nanoseek.data.prepare is the function

TEXTS = ["  leading spaces\n\ttabs  \r\n", "héllo wörld 你好 🙂 naïve\u200b", "", " ",
         "<think>why</think> 42<|end_of_text|>", "x<|user|>y <|assistant|> z", "<|begin_of_text|><|pad|>"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>add</think>4"}, {"role": "user", "content": "3+3?"}]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(default_corpus(n_docs=300) + ["héllo wörld 你好 🙂"], 400)


@pytest.fixture(scope="module")
def small_corpus_dir(tmp_path_factory):
    """The default corpus at 400 documents, prepared once for the loader tests."""
    out = tmp_path_factory.mktemp("prepared")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prep, "default_corpus", lambda seed: default_corpus(seed, n_docs=400))
        info = prepare(None, str(out), vocab_size=350, val_fraction=0.05)
    return out, info


# ---- tokenizer ----------------------------------------------------------------------------------------------------
def test_round_trip_and_special_tokens(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for s in SPECIAL_TOKENS:   # one id wherever it appears, also glued to other text
        assert tok.encode(f"a{s}b").count(tok.token_to_id(s)) == 1
        assert tok.encode(s) == [tok.token_to_id(s)]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.encode("x", add_bos=True) == [tok.bos_id] + tok.encode("x")
    assert tok.encode_batch(TEXTS, add_bos=True) == [tok.encode(t, add_bos=True) for t in TEXTS]
    assert tok.decode(tok.encode("<think>a</think>b<|end_of_text|>"), skip_special=True) == "ab"
    assert tok.vocab_size == 400 and tok.token_to_id("never-a-token") is None


def test_transformers_reads_the_same_files(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS + ["Mia has 3 red apples.<|end_of_text|> Q: Where? <think>x</think>"]:
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == tok.decode(ids)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    for gen in (True, False):
        assert tok.apply_chat_template(MESSAGES, gen) == \
            hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    again = Tokenizer.from_dir(str(tmp_path))
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and again.chat_template == tok.chat_template
    assert sorted(p.rsplit("/", 1)[1] for p in again.files()) == ["tokenizer.json", "tokenizer_config.json"]
    assert not list(tmp_path.glob("*.tmp"))

    # transformers' own save_pretrained moves the template to chat_template.jinja; we read it from there
    hf.save_pretrained(str(tmp_path / "hf"))
    from_hf = Tokenizer.from_dir(str(tmp_path / "hf"))
    assert from_hf.encode(TEXTS[4]) == tok.encode(TEXTS[4]) and from_hf.eos_id == tok.eos_id
    assert from_hf.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)


def test_from_dir_without_config(tok, tmp_path):
    tok.tok.save(str(tmp_path / "tokenizer.json"))       # a bare tokenizer.json: the known names, if in the vocab
    bare = Tokenizer.from_dir(str(tmp_path))
    assert (bare.bos_id, bare.eos_id, bare.pad_id) == (0, 1, 2) and bare.chat_template is not None

    foreign = HFTokenizer(models.BPE())                  # someone else's vocab, with other special tokens
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel()
    foreign.train_from_iterator(["just some text"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "foreign").mkdir()
    foreign.save(str(tmp_path / "foreign" / "tokenizer.json"))
    other = Tokenizer.from_dir(str(tmp_path / "foreign"))
    assert (other.bos_id, other.eos_id, other.pad_id, other.chat_template) == (None, None, None, None)
    with pytest.raises(ValueError, match="no chat_template"):
        other.apply_chat_template(MESSAGES)
    with pytest.raises(ValueError, match="no bos token"):
        other.encode("x", add_bos=True)
    (tmp_path / "foreign" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}))
    other = Tokenizer.from_dir(str(tmp_path / "foreign"))
    assert (other.bos_id, other.eos_id, other.pad_id) == (0, 1, None)


def test_chat_template(tok):
    assert tok.apply_chat_template(MESSAGES) == ("<|system|>Be brief.<|user|>2+2?<|assistant|><think>add</think>4"
                                                 "<|end_of_text|><|user|>3+3?<|assistant|>")
    assert tok.apply_chat_template(MESSAGES[1:2], add_generation_prompt=False) == "<|user|>2+2?"
    ids = tok.encode(tok.apply_chat_template(MESSAGES))
    assert ids[0] == tok.token_to_id("<|system|>") and ids[-1] == tok.token_to_id("<|assistant|>")
    assert ids.count(tok.token_to_id("<think>")) == 1 and ids.count(tok.eos_id) == 1
    with pytest.raises(ValueError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\] needs 'role' and 'content'"):
        tok.apply_chat_template([{"role": "user"}])


# ---- corpus -------------------------------------------------------------------------------------------------------
def test_corpus_is_deterministic_and_consistent():
    docs = default_corpus(seed=3, n_docs=300)
    assert docs == default_corpus(seed=3, n_docs=300) and docs != default_corpus(seed=4, n_docs=300)
    assert default_corpus(seed=3, n_docs=500)[:300] == docs          # the size knob only adds documents
    w, text = world(3), " ".join(docs)
    lives = [(a, c) for a, c in re.findall(r"(\w+) lives in (\w+)\.", text) if a not in ("He", "She")]
    assert len(lives) > 50 and all(w[name]["city"] == city for name, city in lives)
    stories = re.findall(r"(\w+) has (\d+) (\w+) \w+\. (\w+) (gives|finds) (\d+) .*?\. Now \1 has (\d+) \3 ", text)
    assert len(stories) > 50
    for a, n, color, pronoun, verb, k, m in stories:
        assert int(m) == int(n) + (int(k) if verb == "finds" else -int(k))
        assert pronoun == ("She" if a in SHE else "He") and color == w[a]["color"]
    for x, y, z in re.findall(r"(\d+) \+ (\d+) = (\d+)\.", text):
        assert int(x) + int(y) == int(z)
    assert all(isinstance(p, str) and p for p in default_prompts())


# ---- prepare ------------------------------------------------------------------------------------------------------
def test_prepare_default_corpus(small_corpus_dir):
    out, info = small_corpus_dir
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and (meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (0, 1, 2)
    assert (meta["train_docs"], meta["val_docs"]) == (380, 20) and meta["vocab_size"] == 350
    assert info == {k: meta[k] for k in ("vocab_size", "train_tokens", "val_tokens", "train_docs", "val_docs")}
    assert "embedded default corpus" in meta["source"]
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        assert ids.size == meta[f"{split}_tokens"] and ids[-1] == meta["eos_id"]
        assert (ids == meta["eos_id"]).sum() == meta[f"{split}_docs"]    # each document ends with eos
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "tokenizer_config.json",
                                                     "train.bin", "val.bin"]
    tok = Tokenizer.from_dir(str(out))
    assert tok.decode(np.fromfile(out / "val.bin", dtype=np.uint16)).count("<|end_of_text|>") == 20


def test_prepare_files_and_directories(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(
        "\n".join(json.dumps({"body": f"doc {i} text", "n": i}) for i in range(30)) + "\n\n" +
        json.dumps({"body": None}) + "\n")
    (tmp_path / "in" / "b.txt").write_text("first doc\nstill first\n \nsecond doc\n\n\n\nthird\n")
    (tmp_path / "in" / "notes.md").write_text("ignored: not a known suffix")
    info = prepare([str(tmp_path / "in" / "a.jsonl")], str(tmp_path / "o1"), vocab_size=300, text_key="body")
    assert (info["train_docs"], info["val_docs"]) == (29, 1)
    info = prepare([str(tmp_path / "in" / "b.txt")], str(tmp_path / "o2"), vocab_size=300, val_fraction=0.5)
    assert info["train_docs"] + info["val_docs"] == 3
    tok = Tokenizer.from_dir(str(tmp_path / "o2"))
    text = tok.decode(np.concatenate([np.fromfile(tmp_path / "o2" / f"{s}.bin", np.uint16) for s in ("train", "val")]))
    assert sorted(text.split("<|end_of_text|>")[:-1]) == ["first doc\nstill first", "second doc", "third"]

    # a directory, a reused tokenizer, and the seed: same seed -> same files, another seed -> another split
    runs = [prepare([str(tmp_path / "in")], str(tmp_path / f"d{i}"), tokenizer=str(tmp_path / "o1"),
                    text_key="body", seed=s, val_fraction=0.2) for i, s in enumerate((0, 0, 1))]
    assert runs[0] == runs[1] and runs[0]["train_docs"] + runs[0]["val_docs"] == 33
    val = [(tmp_path / f"d{i}" / "val.bin").read_bytes() for i in range(3)]
    assert val[0] == val[1] != val[2]
    meta = json.loads((tmp_path / "d0" / "meta.json").read_text())
    assert meta["tokenizer"] == str(tmp_path / "o1") and "(2 files)" in meta["source"]
    assert (tmp_path / "d0" / "tokenizer.json").read_text() == (tmp_path / "o1" / "tokenizer.json").read_text()


def test_prepare_single_document_holds_out_its_tail(tmp_path):
    (tmp_path / "one.txt").write_text("one long document " * 50)
    info = prepare([str(tmp_path / "one.txt")], str(tmp_path / "o"), vocab_size=300, val_fraction=0.1)
    assert (info["train_docs"], info["val_docs"]) == (1, 0) and info["val_tokens"] >= 1
    assert info["train_tokens"] > 5 * info["val_tokens"]


def test_prepare_errors_name_the_problem(tmp_path, monkeypatch):
    def fails(content, match, exc=ValueError, name="x.jsonl", **kw):
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(exc, match=match):
            prepare([str(path)], str(tmp_path / "out"), vocab_size=300, **kw)

    fails("\n\n  \n", "no non-empty documents in .*empty.txt", name="empty.txt")
    fails(json.dumps({"content": "hi"}) + "\n", r"x.jsonl:1: no field 'text'")
    fails('{"text": "ok"}\n{"text": 5}\n', r"x.jsonl:2: field 'text' is not a string \(int\)")
    fails('{"text": "ok"}\n{"text": \n', r"x.jsonl:2: not JSON")
    fails(b"\xff\xfe bad bytes", r"bad.txt: not UTF-8", name="bad.txt")
    fails("a,b\n", "data.csv: unsupported file type", name="data.csv")
    fails(None, "input not found: .*nope.txt", FileNotFoundError, name="nope.txt")
    fails("text\n", "val_fraction must be in", name="v.txt", val_fraction=1.0)
    monkeypatch.setitem(sys.modules, "pyarrow", None)          # as if pyarrow were not installed
    fails(b"PAR1", r"t.parquet: reading parquet needs pyarrow \(pip install pyarrow\)", name="t.parquet")
    with pytest.raises(ValueError, match="no input files"):
        prepare([], str(tmp_path / "out"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no input files: nothing ending in .txt, .jsonl, .parquet in .*nothing"):
        prepare([str(tmp_path / "nothing")], str(tmp_path / "out"))


def test_prepare_crash_leaves_no_finished_looking_directory(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\nthree\n")
    prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"), vocab_size=300)
    before = (tmp_path / "out" / "train.bin").read_bytes()

    def crash(*args):
        raise RuntimeError("disk full")
    monkeypatch.setattr(prep, "_write_shards", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"), vocab_size=300, seed=1)
    assert not (tmp_path / "out" / "meta.json").exists()     # the old meta.json no longer vouches for the files
    assert (tmp_path / "out" / "train.bin").read_bytes() == before


def test_tokenizer_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no tokenizer.json in {re.escape(str(tmp_path))}"):
        Tokenizer.from_dir(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'tokenizer.json'))}: unreadable"):
        Tokenizer.from_dir(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text(train_tokenizer(["x"], 300).tok.to_str())
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'tokenizer_config.json'))}: unreadable"):
        Tokenizer.from_dir(str(tmp_path))
    with pytest.raises(ValueError, match="vocab_size must be at least 264"):
        train_tokenizer(["x"], 100)


# ---- loader -------------------------------------------------------------------------------------------------------
def test_loader_is_deterministic_and_shifted(small_corpus_dir):
    out, _ = small_corpus_dir
    loader = TokenLoader(str(out), "train", batch_size=4, seq_len=32, seed=1)
    x, y = loader.batch(5)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(TokenLoader(str(out), "train", 4, 32, seed=1).batch(5)[0], x)   # a fresh loader, same step
    assert not torch.equal(loader.batch(6)[0], x)
    assert not torch.equal(TokenLoader(str(out), "train", 4, 32, seed=2).batch(5)[0], x)
    tokens = np.fromfile(out / "train.bin", dtype=np.uint16)
    row = x[0].numpy()   # each row is a real window of the shard
    assert any(np.array_equal(tokens[s: s + 32], row) for s in np.flatnonzero(tokens == row[0]))

    x2, y2, docs = loader.batch(5, doc_ids=True)
    assert torch.equal(x2, x) and torch.equal(y2, y) and docs.shape == x.shape
    eos = loader.eos_id
    assert (docs[:, 0] == 0).all()
    assert torch.equal(docs[:, 1:] - docs[:, :-1], (x[:, :-1] == eos).long())   # +1 right after each eos

    val = TokenLoader(str(out), "val", 4, 32, seed=1)
    batches = val.val_batches(3)
    assert len(batches) == 3 and not torch.equal(batches[0][0], batches[1][0])
    other = TokenLoader(str(out), "val", 4, 32, seed=7).val_batches(3)   # independent of the run's seed
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, other))
    assert len(val.val_batches(2, doc_ids=True)[0]) == 3


def test_loader_errors(tmp_path, small_corpus_dir):
    out, info = small_corpus_dir
    n = info["val_tokens"]
    with pytest.raises(ValueError, match=rf"val.bin has {n} tokens, need at least seq_len\+1 = {n + 1}"):
        TokenLoader(str(out), "val", 2, n)
    TokenLoader(str(out), "val", 2, n - 1)     # exactly seq_len+1 tokens is enough
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TokenLoader(str(tmp_path), "train", 2, 8)
    with pytest.raises(FileNotFoundError, match="missing .*test.bin"):
        TokenLoader(str(out), "test", 2, 8)
