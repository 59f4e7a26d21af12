"""The trainer end to end on the tiny preset and a small synthetic corpus: it learns, balances, resumes bit for
bit, stops cleanly on SIGTERM, and the CLI verbs work and fail with one-line errors."""
import json
import os
import random
import signal

import pytest
import torch

from nanoseek.cli import main as cli
from nanoseek.data.prepare import prepare
from nanoseek.io import load_hf
from nanoseek.model import DeepSeekV3
from nanoseek.train import checkpoint
from nanoseek.train.config import load
from nanoseek.train.loop import Trainer
from nanoseek.train.metrics import read


def synthetic_text(n_lines: int = 1500, seed: int = 0) -> str:
    """Sentences from a tiny grammar: learnable structure, so the loss falls fast."""
    rng = random.Random(seed)
    names, verbs, things = ["the cat", "a dog", "my friend", "the bird"], ["sees", "likes", "eats"], \
        ["the fish", "a ball", "some bread", "the tree"]
    return "\n\n".join(f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)}." for _ in range(n_lines))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    src = root / "corpus.txt"
    src.write_text(synthetic_text())
    prepare([str(src)], str(root / "prepared"), vocab_size=300, val_fraction=0.1)
    return str(root / "prepared")


def config(out, data, *extra):
    return load(None, [f"run.out_dir={out}", f"data.dir={data}", "run.steps=16", "data.batch_size=4",
                       "data.seq_len=32", "eval.every=4", "eval.batches=2", "checkpoint.every=0",
                       "schedule.warmup_steps=4", "optim.lr=3e-3", "optim.grad_accum=2", "balance.gamma_start=0.01",
                       "logging.progress=false", *extra])


def train_records(run):
    return [{k: v for k, v in r.items() if k not in ("tok_per_s", "time")} for r in read(f"{run}/metrics.jsonl")]


def assert_same_weights(a, b):
    sa, sb = load_hf(a).state_dict(), load_hf(b).state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("extra", [(), ("optim.bf16_moments=true", "ema.enabled=true", "schedule.kind=\"wsd\"")])
def test_resume_equals_uninterrupted_bitwise(tmp_path, data_dir, extra):
    """Train 16 steps; separately train 7, stop (as on SIGTERM), resume from the checkpoint in fresh objects and
    finish. Loss records (train and val, every float) and final weights, balance biases included, are equal."""
    a, b = tmp_path / "a", tmp_path / "b"
    Trainer(config(a, data_dir, *extra)).fit()
    first = Trainer(config(b, data_dir, *extra)).fit(until=7)
    assert first["interrupted"] and [s for s, _ in checkpoint.checkpoints(str(b))] == [7]
    Trainer(config(b, data_dir, *extra), resume=str(b)).fit()
    assert train_records(a) == train_records(b)
    assert_same_weights(a / "final", b / "final")
    if extra:
        assert_same_weights(a / "final-ema", b / "final-ema")


def test_learns_logs_and_balances(tmp_path, data_dir):
    run = tmp_path / "run"
    summary = Trainer(config(run, data_dir, "run.steps=40", "eval.every=10")).fit()
    records = read(f"{run}/metrics.jsonl")
    meta = records[0]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert meta["routers"] == ["layer 1", "layer 2", "MTP 1"]
    assert len(train) == 40 and all(len(r["load_ratio"]) == 3 and "mtp" in r for r in train)
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.5, val
    assert summary["val_loss"] == val[-1]["val_loss"]
    model = load_hf(summary["final"])
    assert all(g.e_score_correction_bias.abs().sum() > 0 for g in model.moe_gates())
    assert os.path.isfile(os.path.join(summary["final"], "tokenizer.json"))
    # λ and γ follow their schedules: switch after 70% / 97% of the steps
    assert {r["mtp_lambda"] for r in train[:28]} == {0.3} and {r["mtp_lambda"] for r in train[28:]} == {0.1}
    assert train[-1]["gamma"] == 0.0 and train[-2]["gamma"] == 0.01


def test_document_mask_reaches_the_model(tmp_path, data_dir, monkeypatch):
    """data.document_mask: every training micro-batch and validation batch reaches the model with the document index
    of each token (documents end at eos), and the run trains (the masked attention itself: tests/test_model.py)."""
    seen = []
    loss = DeepSeekV3.loss

    def spy(self, input_ids, labels, **kw):
        seen.append((input_ids.cpu(), kw.get("doc_ids")))
        return loss(self, input_ids, labels, **kw)

    monkeypatch.setattr(DeepSeekV3, "loss", spy)
    trainer = Trainer(config(tmp_path / "run", data_dir, "data.document_mask=true", "run.steps=4"))
    trainer.fit()
    eos = trainer.train_data.eos_id
    assert len(seen) == 4 * 2 + 2 * 2   # 4 steps of 2 micro-batches, 2 evaluations of 2 batches
    for x, doc_ids in seen:
        docs = torch.cat([torch.zeros_like(x[:, :1]), (x[:, :-1] == eos).long().cumsum(1)], 1)
        assert doc_ids is not None and torch.equal(doc_ids.cpu(), docs)
    assert any(d.max() > 0 for _, d in seen)   # documents do end inside windows
    ce = [r["ce"] for r in read(f"{tmp_path}/run/metrics.jsonl") if r["split"] == "train"]
    assert len(ce) == 4 and all(c == c for c in ce)


def test_recompute_trains_identically(tmp_path, data_dir):
    """run.recompute changes what backward stores, not what it computes: the same records and weights as without."""
    a, b = tmp_path / "a", tmp_path / "b"
    Trainer(config(a, data_dir, "run.steps=4")).fit()
    Trainer(config(b, data_dir, "run.steps=4", "run.recompute=\"v3\"")).fit()
    assert train_records(a) == train_records(b)
    assert_same_weights(a / "final", b / "final")


def test_no_clipping_logs_the_same_norm_and_trains_alike(tmp_path, data_dir):
    """optim.grad_clip = 0 only measures the gradient norm for the log (no pass rescaling every gradient by 1):
    the same records, norms included, and weights as a clip threshold no gradient reaches."""
    a, b = tmp_path / "a", tmp_path / "b"
    Trainer(config(a, data_dir, "run.steps=3", "optim.grad_clip=0")).fit()
    Trainer(config(b, data_dir, "run.steps=3", "optim.grad_clip=1e9")).fit()
    assert train_records(a) == train_records(b)
    assert_same_weights(a / "final", b / "final")


def test_one_cuda_graph_step_per_optimizer_step(tmp_path, data_dir, monkeypatch):
    """With run.cuda_graphs the trainer marks one CUDA-graph step per optimizer step, however many micro-batches
    it accumulates (their gradients live in graph memory until the optimizer has used them), and one per
    evaluation batch. Counted on CPU, where the marks are the only part of graph mode that runs."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    trainer = Trainer(config(tmp_path / "run", data_dir, "run.steps=2"))   # grad_accum 2
    trainer.graphed = True
    trainer.train_step()
    trainer.train_step()
    assert len(marks) == 2
    trainer.evaluate()                                                       # eval.batches 2
    assert len(marks) == 4


def test_sigterm_saves_and_exits_cleanly(tmp_path, data_dir, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(config(run, data_dir))
    step = trainer.train_step

    def step_then_signal():
        rec = step()
        if rec["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return rec

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    summary = trainer.fit()
    assert summary["interrupted"] and summary["step"] == 5
    assert checkpoint.resolve(str(run)).endswith("step-00000005")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # handlers restored


def test_cli_train_plot_generate(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\nout_dir = "{run}"\nsteps = 6\n[data]\ndir = "{data_dir}"\nbatch_size = 2\nseq_len = 16\n'
                   '[logging]\nprogress = false\n')
    assert cli(["train", "--config", str(cfg)]) == 0
    assert cli(["train", "--resume", str(run), "--set", "run.steps=8"]) == 0      # config from the checkpoint
    assert [r["step"] for r in read(f"{run}/metrics.jsonl") if r["split"] == "train"] == list(range(1, 9))
    assert cli(["plot", str(run)]) == 0 and os.path.getsize(run / "loss.png") > 10_000
    capsys.readouterr()
    for ckpt in (run, run / "final", run / "checkpoints" / "step-00000008"):
        assert cli(["generate", "--ckpt", str(ckpt), "--prompt", "the cat", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("the cat")


def run_error(capsys, argv):
    capsys.readouterr()
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_one_line_errors(tmp_path, data_dir, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\ndir = "{tmp_path / "nothing"}"\n[run]\nout_dir = "{tmp_path / "run"}"\n')
    assert "nothing" in run_error(capsys, ["train", "--config", str(cfg)])
    assert "did you mean 'optim.lr'" in run_error(capsys, ["train", "--config", str(cfg), "--set", "optim.lrate=1"])
    assert "train config not found" in run_error(capsys, ["train", "--config", str(tmp_path / "missing.toml")])
    assert "no training checkpoint" in run_error(capsys, ["train", "--config", str(cfg), "--resume"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in run_error(capsys, ["prepare", "--input", str(empty), "--out", str(tmp_path / "e")]).lower()

    run = tmp_path / "good"
    Trainer(config(run, data_dir, "run.steps=2")).fit()
    ckpt = checkpoint.resolve(str(run))
    with open(os.path.join(ckpt, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    err = run_error(capsys, ["train", "--resume", str(run)])
    assert "corrupt or incomplete" in err and "model.safetensors" in err
    assert "not an HF checkpoint" in run_error(capsys, ["generate", "--ckpt", str(tmp_path), "--prompt", "x"])


def test_config_saved_in_checkpoint_is_plain_json(tmp_path, data_dir):
    run = tmp_path / "run"
    Trainer(config(run, data_dir, "run.steps=2")).fit()
    with open(os.path.join(checkpoint.resolve(str(run)), checkpoint.META)) as f:
        meta = json.load(f)
    assert meta["step"] == 2 and meta["train_config"]["optim"]["lr"] == 3e-3


def test_demo_runs_end_to_end(tmp_path, capsys):
    """The main job's wiring (prepare the embedded corpus, train, plot, sample) with a 3-step config."""
    from nanoseek.train.demo import main as demo

    cfg = tmp_path / "demo.toml"
    cfg.write_text("[run]\nsteps = 3\n[data]\nbatch_size = 2\nseq_len = 32\n[eval]\nevery = 0\nbatches = 1\n"
                   "[logging]\nprogress = false\n")
    summary = demo(out=str(tmp_path / "demo"), config=str(cfg), max_new_tokens=4)
    out = capsys.readouterr().out
    assert "[4/4] greedy samples" in out and "final val loss" in out and "HF checkpoint" in out
    assert os.path.isfile(tmp_path / "demo" / "loss.png") and summary["step"] == 3
    demo(out=str(tmp_path / "demo"), config=str(cfg), max_new_tokens=4)     # a finished run: re-plot, re-sample
    assert "already trained" in capsys.readouterr().out


def test_fp8_precision_trains_close_to_fp32_and_exports(tmp_path, data_dir):
    """run.precision="fp8" (exact FP8 emulation on CPU): the same run as fp32 from the same init and data, losses
    within a few percent at every step (FP8 E4M3 has 3 mantissa bits: ~3% per-element error, much less on
    averaged losses), the quantized model still learns, and the export is a plain HF checkpoint."""
    runs = {}
    for precision in ("fp32", "fp8"):
        out = tmp_path / precision
        Trainer(config(out, data_dir, f"run.precision=\"{precision}\"", "run.steps=8", "eval.every=0")).fit()
        runs[precision] = [r for r in read(f"{out}/metrics.jsonl") if r["split"] == "train"]
    fp32, fp8 = ([r["ce"] for r in runs[p]] for p in ("fp32", "fp8"))
    assert fp8[-1] < fp8[0] - 0.5
    for a, b in zip(fp32, fp8):
        assert abs(a - b) / a < 0.03, (fp32, fp8)
    assert fp32 != fp8  # the FP8 path really ran
    model = load_hf(str(tmp_path / "fp8" / "final"))
    assert all(type(m).__name__ != "FP8Linear" for m in model.modules())


def test_bad_precision_is_named(tmp_path, data_dir):
    with pytest.raises(ValueError, match="run.precision"):
        config(tmp_path, data_dir, "run.precision=\"fp16\"")


@pytest.mark.skipif(torch.cuda.is_available(), reason="run.device 'auto' must resolve to the CPU")
def test_step_graph_needs_a_cuda_device(tmp_path, data_dir):
    with pytest.raises(ValueError, match="'run.step_graph' needs a single CUDA device, got cpu"):
        Trainer(config(tmp_path, data_dir, "run.step_graph=true"))
