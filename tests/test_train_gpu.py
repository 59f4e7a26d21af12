"""The trainer on CUDA (run on the device machine: pytest -m gpu tests/test_train_gpu.py): bf16 autocast with
compiled blocks, and FP8 GEMMs, both learn and export a loadable HF checkpoint."""
import pytest
import torch

from nanoseek.io import load_hf
from nanoseek.train.loop import Trainer
from nanoseek.train.metrics import read

from .test_train import config, data_dir  # noqa: F401  (the module-scoped corpus fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("precision,compile", [("bf16", "true"), ("fp8", "false")])
def test_trains_on_cuda(tmp_path, data_dir, precision, compile):  # noqa: F811
    out = tmp_path / precision
    cfg = config(out, data_dir, "run.device=\"cuda\"", f"run.precision=\"{precision}\"", f"run.compile={compile}",
                 "run.steps=24", "eval.every=0", "balance.alpha=0.0001")
    summary = Trainer(cfg).fit()
    ce = [r["ce"] for r in read(f"{out}/metrics.jsonl") if r["split"] == "train"]
    assert all(c == c for c in ce) and ce[-1] < ce[0] - 0.5, ce
    model = load_hf(summary["final"])
    assert sum(p.numel() for p in model.parameters()) > 0
