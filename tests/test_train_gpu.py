"""The trainer on CUDA (run on the device machine: pytest -m gpu tests/test_train_gpu.py): bf16 autocast with
compiled blocks (with and without CUDA graphs and recomputation), and FP8 GEMMs, all learn and export a loadable
HF checkpoint."""
import functools

import pytest
import torch

from nanoseek.io import load_hf
from nanoseek.model import transformer
from nanoseek.model.mla import document_mask
from nanoseek.train.loop import Trainer
from nanoseek.train.metrics import read

from .test_train import config, data_dir  # noqa: F401  (the module-scoped corpus fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("precision,compile,graphs,recompute", [
    ("bf16", "true", "false", "none"), ("bf16", "true", "true", "none"), ("bf16", "true", "true", "v3"),
    ("fp8", "false", "false", "none"), ("fp8", "true", "true", "none")])
def test_trains_on_cuda(tmp_path, data_dir, precision, compile, graphs, recompute):  # noqa: F811
    out = tmp_path / precision
    cfg = config(out, data_dir, "run.device=\"cuda\"", f"run.precision=\"{precision}\"", f"run.compile={compile}",
                 f"run.cuda_graphs={graphs}", f"run.recompute=\"{recompute}\"", "run.steps=24", "eval.every=12",
                 "balance.alpha=0.0001")
    summary = Trainer(cfg).fit()
    ce = [r["ce"] for r in read(f"{out}/metrics.jsonl") if r["split"] == "train"]
    assert all(c == c for c in ce) and ce[-1] < ce[0] - 0.5, ce
    model = load_hf(summary["final"])
    assert sum(p.numel() for p in model.parameters()) > 0


def test_cuda_graphs_do_not_change_training(tmp_path, data_dir):  # noqa: F811
    """Replaying the compiled blocks as CUDA graphs runs the same kernels: per-step losses with and without them agree
    (2 micro-batches accumulate per step, the case where graph memory could overwrite gradients, and an eval)."""
    ce = {}
    for graphs in ("false", "true"):
        out = tmp_path / graphs
        cfg = config(out, data_dir, "run.device=\"cuda\"", "run.compile=true", f"run.cuda_graphs={graphs}",
                     "run.steps=8", "eval.every=4")
        Trainer(cfg).fit()
        records = read(f"{out}/metrics.jsonl")
        ce[graphs] = [r["ce"] if r["split"] == "train" else r["val_loss"] for r in records
                      if r["split"] in ("train", "val")]
    assert len(ce["true"]) == len(ce["false"]) == 11  # 8 steps, evaluations at steps 0, 4 and 8
    torch.testing.assert_close(torch.tensor(ce["true"]), torch.tensor(ce["false"]), rtol=2e-3, atol=0)


def test_document_mask_flex_trains_like_dense(tmp_path, data_dir, monkeypatch):  # noqa: F811
    """data.document_mask on CUDA, compiled blocks replayed as CUDA graphs: FlexAttention with each step's new
    BlockMask gives the per-step losses of SDPA with the dense mask, and after the first steps no training step
    compiles anything new (the BlockMask is an input of the compiled blocks, not a constant; the final evaluation,
    in eval mode, does compile its own graphs)."""
    ce = {}
    for impl in ("flex", "dense"):
        if impl == "dense":
            monkeypatch.setattr(transformer, "document_mask", functools.partial(document_mask, flex=False))
        out = tmp_path / impl
        cfg = config(out, data_dir, "run.device=\"cuda\"", "run.compile=true", "run.cuda_graphs=true",
                     "data.document_mask=true", "run.steps=10", "eval.every=0", "checkpoint.every=0")
        trainer = Trainer(cfg)
        trainer.fit(until=3)
        graphs = dict(torch._dynamo.utils.counters["stats"])
        trainer.fit(until=9)
        if impl == "flex":
            assert dict(torch._dynamo.utils.counters["stats"]) == graphs
        trainer.fit()
        ce[impl] = [r["ce"] for r in read(f"{out}/metrics.jsonl") if r["split"] == "train"]
    assert len(ce["flex"]) == 10 and ce["flex"][-1] < ce["flex"][0] - 0.5
    torch.testing.assert_close(torch.tensor(ce["flex"]), torch.tensor(ce["dense"]), rtol=1e-2, atol=0)


def _step_losses(out, data, graph: bool, steps: int, *extra, resume_at: int | None = None) -> list[float]:
    """A CUDA run with compiled blocks, stepped eagerly or by run.step_graph (resumed from its checkpoint at
    resume_at, if given): its per-step training losses and validation losses, in order. Every parameter must
    have been stepped `steps` times."""
    cfg = config(out, data, "run.device=\"cuda\"", "run.compile=true", "run.cuda_graphs=false",
                 f"run.step_graph={str(graph).lower()}", f"run.steps={steps}", *extra)
    if resume_at is not None:
        Trainer(cfg).fit(until=resume_at)
        trainer = Trainer(cfg, resume=str(out))
    else:
        trainer = Trainer(cfg)
    trainer.fit()
    assert {s["step"] for s in trainer.optimizer.state.values()} == {steps}
    return [r["loss"] if r["split"] == "train" else r["val_loss"] for r in read(f"{out}/metrics.jsonl")
            if r["split"] in ("train", "val")]


def test_step_graph_trains_like_eager_steps(tmp_path, data_dir):  # noqa: F811
    """run.step_graph: three warm-up steps, the capture, then replays. Per-step losses equal those of the same
    compiled blocks stepped eagerly, through a learning-rate warm-up and an MTP λ that changes mid-run (both read
    by the graph from device scalars), 2 micro-batches a step and evaluations; the checkpoint holds true step
    counts, and a run resumed from it (a fresh capture) finishes like the uninterrupted one."""
    extra = ("eval.every=5", "checkpoint.every=5", "schedule.warmup_steps=6", "mtp.lambda_start=0.3",
             "mtp.lambda_end=0.1", "mtp.lambda_switch=0.75")
    eager = _step_losses(tmp_path / "false", data_dir, False, 10, *extra)
    assert len(eager) == 13   # 10 steps, evaluations at steps 0, 5 and 10
    for run, resume_at in (("true", None), ("resumed", 5)):
        graph = _step_losses(tmp_path / run, data_dir, True, 10, *extra, resume_at=resume_at)
        torch.testing.assert_close(torch.tensor(graph), torch.tensor(eager), rtol=2e-3, atol=0)


def test_step_graph_with_document_mask_trains_like_eager_steps(tmp_path, data_dir):  # noqa: F811
    """run.step_graph with data.document_mask: each replay builds its FlexAttention BlockMask from the document ids
    copied into the graph's input buffer, so per-step losses equal those of eager steps over the same batches."""
    eager, graph = (_step_losses(tmp_path / str(g), data_dir, g, 8, "data.document_mask=true", "eval.every=4")
                    for g in (False, True))
    assert len(eager) == 11   # 8 steps, evaluations at steps 0, 4 and 8
    torch.testing.assert_close(torch.tensor(graph), torch.tensor(eager), rtol=2e-3, atol=0)


def test_step_graph_in_fp8_trains_like_eager_steps(tmp_path, data_dir):  # noqa: F811
    """run.step_graph with run.precision = 'fp8': the warm-up steps pick and check each FP8 GEMM's path against the
    emulation, then the quantizations and GEMMs (custom ops inside the compiled blocks) replay from the step's
    graph, the shared experts on their side stream. Per-step losses equal those of the same FP8 model stepped
    eagerly, with 2 micro-batches a step and evaluations."""
    eager, graph = (_step_losses(tmp_path / str(g), data_dir, g, 8, "run.precision=\"fp8\"", "eval.every=4",
                                 "optim.grad_accum=2", "checkpoint.every=0") for g in (False, True))
    assert len(eager) == 11   # 8 steps, evaluations at steps 0, 4 and 8
    torch.testing.assert_close(torch.tensor(graph), torch.tensor(eager), rtol=2e-3, atol=0)
