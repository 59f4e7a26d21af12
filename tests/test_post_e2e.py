"""End to end on a tiny model: sft -> grpo for 2 steps each through the CLI functions, distillation's
rejection sampling, and a GRPO run resumed from its checkpoint equal to one that ran straight through."""
import json
import os

import pytest
import torch

from nanoseek.config import preset
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.io import save_hf
from nanoseek.post.distill import DistillConfig, distill
from nanoseek.post.grpo import GRPO, GRPOConfig, grpo
from nanoseek.post.rollout import Completion
from nanoseek.post.sft import SFTConfig, sft
from nanoseek.post.tasks import get_task
from nanoseek.train.metrics import read

from .helpers import random_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny model and a tokenizer that knows the task's text, saved as an HF checkpoint."""
    d = str(tmp_path_factory.mktemp("base"))
    task = get_task("arithmetic:3")
    texts = [m["content"] for p in task.problems("train", 300) for c in task.sft_samples(p) for m in c]
    tok = train_tokenizer(texts, 400)
    model = random_model(preset("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=1), seed=0)
    save_hf(model, d)
    tok.save(d)
    return d


def small_grpo(**kw):
    return GRPOConfig(**{**dict(task="arithmetic:3", steps=2, prompts_per_step=4, group_size=4, max_new_tokens=12,
                                micro_batch=8, lr=1e-3, eval_every=0, eval_problems=8, checkpoint_every=1), **kw})


def test_sft_then_grpo(base, tmp_path):
    out_sft, out_grpo = str(tmp_path / "sft"), str(tmp_path / "grpo")
    s = sft(SFTConfig(task="arithmetic:3", problems=50, steps=2, batch_size=2, seq_len=128, lr=1e-3,
                      eval_problems=8, max_new_tokens=12), base, out_sft, device="cpu", progress=False)
    assert s["step"] == 2 and 0 <= s["accuracy"] <= 1 and os.path.isfile(os.path.join(s["final"], "config.json"))
    g = grpo(small_grpo(), s["final"], out_grpo, device="cpu", progress=False)
    assert g["step"] == 2 and os.path.isfile(g["plot"]) and 0 < g["gen_share"] < 1 and g["rollout_tok_per_s"] > 0
    records = read(os.path.join(out_grpo, "metrics.jsonl"))
    train = [r for r in records if r.get("split") == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("reward", "accuracy", "format", "length", "kl", "clip_frac", "rollout_tok_per_s", "gen_share"):
        assert all(isinstance(r[key], float) for r in train), key
    assert train[0]["kl"] >= 0
    # the rollouts come from the policy being trained: the engine's log-probabilities of its samples equal the
    # trainer's π_old (both fp32 here; a wrong cache, position or weight copy in the engine shows up as a gap)
    assert all(abs(r["rollout_kl"]) < 1e-4 and r["rollout_max_gap"] < 1e-3 for r in train), train
    val = [r for r in records if r.get("split") == "val"]
    assert [r["step"] for r in val] == [0, 2]
    # held-out pass@1 / maj@k from eval_samples = 4 samples at T = 0.6: a mean over 4 × 8 samples, so a multiple of
    # 1/32, and what the run's summary reports
    assert all(0 <= r["pass@1"] <= 1 and (r["pass@1"] * 32) % 1 == 0 and 0 <= r["maj@4"] <= 1 for r in val)
    assert g["pass@1"] == val[-1]["pass@1"] and g["start_pass@1"] == val[0]["pass@1"]


def test_truncated_importance_weights_are_one_on_policy(base, tmp_path):
    """On CPU in fp32 the engine samples from exactly the trained policy, so min(π_old / π_engine, 2) is 1 (to
    rounding) and the step is the plain one: same rewards, same loss."""
    plain = GRPO(small_grpo(steps=1), base, str(tmp_path / "a"), device="cpu", log=lambda *a: None).step()
    tis = GRPO(small_grpo(steps=1, tis_cap=2.0), base, str(tmp_path / "b"), device="cpu", log=lambda *a: None).step()
    assert tis["reward"] == plain["reward"]
    assert tis["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="tis_cap"):
        GRPO(small_grpo(tis_cap=-1.0), base, str(tmp_path / "c"), device="cpu")


def test_time_limit_ends_the_run_like_its_last_step(base, tmp_path):
    """A run past its time_limit starts no further step, then evaluates, saves and exports as at its end."""
    g = grpo(small_grpo(steps=5, time_limit=1e-6, checkpoint_every=0), base, str(tmp_path / "a"), device="cpu",
             progress=False)
    assert g["step"] == 1 and os.path.isfile(os.path.join(g["final"], "config.json"))
    assert [r["step"] for r in read(str(tmp_path / "a" / "metrics.jsonl")) if r.get("split") == "val"] == [0, 1]
    with pytest.raises(ValueError, match="time_limit"):
        GRPO(small_grpo(time_limit=-1.0), base, str(tmp_path / "b"), device="cpu")


def test_grpo_resume_is_exact(base, tmp_path):
    straight = GRPO(small_grpo(steps=2), base, str(tmp_path / "a"), device="cpu", log=lambda *a: None)
    straight.fit(progress=False)
    first = GRPO(small_grpo(steps=2), base, str(tmp_path / "b"), device="cpu", log=lambda *a: None)
    rec = first.step()
    first.run.save()
    resumed = GRPO(small_grpo(steps=2), None, str(tmp_path / "b"), device="cpu", resume=True, log=lambda *a: None)
    assert resumed.run.step == 1 and resumed.ref is not None
    rec2 = resumed.step()
    ref = [r for r in read(str(tmp_path / "a" / "metrics.jsonl")) if r.get("split") == "train"]
    assert rec["reward"] == ref[0]["reward"] and rec2["reward"] == ref[1]["reward"]
    assert rec2["loss"] == pytest.approx(ref[1]["loss"], rel=1e-5)
    for p, q in zip(resumed.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already has checkpoints"):
        GRPO(small_grpo(), base, str(tmp_path / "b"), device="cpu")


def test_distill_keeps_only_checked_samples(base, tmp_path, monkeypatch):
    """A stand-in teacher answers each problem with a right response (twice), a wrong one, one with the right
    answer planted in the reasoning, and a right one cut off at max_new_tokens: only the first is kept."""
    import nanoseek.post.distill as distill_module
    task = get_task("arithmetic:3")
    problems = task.problems("train", 6)
    true_sample = distill_module.sample

    def teacher(engine, prompts, n, *args, **kw):
        true_sample(engine, prompts[:1], 1, 2)          # the real engine runs too
        out = []
        for p in problems:
            right = f"<think>{task.solution(p)}</think> \\boxed{{{p.answer}}}"
            wrong = f"<think>{task.solution(p)}</think> \\boxed{{{int(p.answer) + 1}}}"
            planted = f"<think>\\boxed{{{p.answer}}}</think> \\boxed{{{int(p.answer) + 1}}}"
            out.append([Completion([1], right, True), Completion([1], wrong, True), Completion([1], right, True),
                        Completion([1], planted, True), Completion([1], right + " more", False)])
        return out

    monkeypatch.setattr(distill_module, "sample", teacher)
    out = str(tmp_path / "distill")
    cfg = DistillConfig(task="arithmetic:3", problems=6, samples=5, keep=2, max_new_tokens=12,
                        sft=SFTConfig(steps=1, batch_size=2, seq_len=128, eval_problems=4, max_new_tokens=8))
    s = distill(cfg, teacher=base, student=base, out_dir=out, device="cpu", progress=False)
    with open(os.path.join(out, "distill.jsonl")) as f:
        kept = [json.loads(line)["messages"] for line in f]
    assert s["kept"] == len(kept) == 6 and s["sampled"] == 30 and s["step"] == 1
    by_question = {p.question: p for p in problems}
    for m in kept:
        p = by_question[m[1]["content"]]
        assert m[-1]["content"] == f"<think>{task.solution(p)}</think> \\boxed{{{p.answer}}}"


def test_cli_verbs(base, tmp_path, capsys):
    from nanoseek.cli import main
    data = str(tmp_path / "sft.jsonl")
    assert main(["sft", "--out", str(tmp_path / "x"), "--task", "arithmetic:3", "--problems", "5",
                 "--write-data", data]) == 0
    with open(data) as f:
        assert len(f.readlines()) == 10                      # two V3 sample kinds per problem
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "What is 1 + 1?", "choices": ["2", "3"], "answer": 0}) + "\n")
    out = str(tmp_path / "eval.json")
    assert main(["eval", "--ckpt", base, "--mc", str(mc), "--task", "arithmetic:3", "--limit", "4", "--k", "2",
                 "--max-new-tokens", "8", "--device", "cpu", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "acc_norm" in printed and "maj@2" in printed
    with open(out) as f:
        results = json.load(f)["results"]
    assert results["arithmetic:3"]["n"] == 4 and results[str(mc)]["n"] == 1
    assert main(["grpo", "--out", str(tmp_path / "g"), "--device", "cpu"]) == 1   # no --init: one-line error
    assert "--init is required" in capsys.readouterr().err
