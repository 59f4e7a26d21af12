"""The trainer on CUDA (run on the device machine: pytest -m gpu tests/test_train_gpu.py): bf16 autocast with
compiled blocks, and FP8 GEMMs, both learn and export a loadable HF checkpoint."""
import pytest
import torch

from nanoseek.io import load_hf
from nanoseek.train.loop import Trainer
from nanoseek.train.metrics import read

from .test_train import config, data_dir  # noqa: F401  (the module-scoped corpus fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("precision,compile,graphs", [
    ("bf16", "true", "false"), ("fp8", "false", "false"),
    pytest.param("bf16", "true", "true", marks=pytest.mark.xfail(
        reason="failed on the H200 on 2026-12-01 (a RuntimeError, message cut off) while the trainer marked a "
               "graph step per micro-batch; now marked once per optimizer step, not yet re-run on a GPU"))])
def test_trains_on_cuda(tmp_path, data_dir, precision, compile, graphs):  # noqa: F811
    out = tmp_path / precision
    cfg = config(out, data_dir, "run.device=\"cuda\"", f"run.precision=\"{precision}\"", f"run.compile={compile}",
                 f"run.cuda_graphs={graphs}", "run.steps=24", "eval.every=12", "balance.alpha=0.0001")
    summary = Trainer(cfg).fit()
    ce = [r["ce"] for r in read(f"{out}/metrics.jsonl") if r["split"] == "train"]
    assert all(c == c for c in ce) and ce[-1] < ce[0] - 0.5, ce
    model = load_hf(summary["final"])
    assert sum(p.numel() for p in model.parameters()) > 0
