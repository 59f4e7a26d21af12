"""The trainer on CUDA (run on the device machine: pytest -m gpu tests/test_train_gpu.py): bf16 autocast with
compiled blocks (with and without CUDA graphs and recomputation), and FP8 GEMMs, all learn and export a loadable
HF checkpoint."""
import pytest
import torch

from nanoseek.io import load_hf
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
