"""Checkpoints: atomic under failures mid-write, keep-last-K, and one-line errors for corrupt ones."""
import errno
import os

import pytest
import torch

from nanoseek import DeepSeekV3, preset
from nanoseek.train import checkpoint
from nanoseek.train.optim import AdamW

from .helpers import randomize


def make_state(model):
    opt = AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return {"optimizer": opt.state_dict(), "rng_cpu": torch.get_rng_state()}


def save(run, step, model, **kw):
    return checkpoint.save(str(run), step, model, {"step": step, "tokens": 0}, make_state(model), **kw)


@pytest.fixture
def model():
    return randomize(DeepSeekV3(preset("tiny")))


def test_save_load_round_trip(tmp_path, model):
    path = save(tmp_path, 10, model, ema={"w": torch.ones(3)})
    loaded, meta, state, ema = checkpoint.load(path)
    assert meta["step"] == 10 and torch.equal(ema["w"], torch.ones(3))
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert set(state) == {"optimizer", "rng_cpu"}
    assert checkpoint.resolve(str(tmp_path)) == path == checkpoint.model_dir(path)


@pytest.mark.parametrize("where", ["torch.save", "save_hf"])
def test_failure_mid_write_keeps_the_previous_checkpoint(tmp_path, model, monkeypatch, where):
    first = save(tmp_path, 10, model)
    before = {n: t.clone() for n, t in model.state_dict().items()}

    def disk_full(*args, **kwargs):
        # write part of the file first, as a real full disk would
        target = args[1] if where == "torch.save" else os.path.join(args[1], "model.safetensors")
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "torch.save":
        monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    else:
        monkeypatch.setattr(checkpoint, "save_hf", disk_full)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="No space left on device.*previous checkpoints are intact"):
        save(tmp_path, 20, model)
    monkeypatch.undo()

    assert checkpoint.resolve(str(tmp_path)) == first
    assert os.listdir(tmp_path / "checkpoints") == ["step-00000010"]   # no temporary leftovers
    loaded, meta, _, _ = checkpoint.load(first)
    assert meta["step"] == 10
    assert all(torch.equal(before[n], t) for n, t in loaded.state_dict().items())


def test_crash_between_renames_recovers(tmp_path, model):
    """A process killed while replacing step-10 leaves `.old-step-00000010` and a `.tmp-` directory; the next save
    puts the old one back and clears the temporary one."""
    path = save(tmp_path, 10, model)
    root = tmp_path / "checkpoints"
    os.rename(path, root / ".old-step-00000010")
    os.makedirs(root / ".tmp-step-00000020-xyz")
    save(tmp_path, 20, model)
    assert sorted(os.listdir(root)) == ["step-00000010", "step-00000020"]
    checkpoint.load(str(root / "step-00000010"))


def test_keeps_last_k(tmp_path, model):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, keep=2)
    assert [s for s, _ in checkpoint.checkpoints(str(tmp_path))] == [3, 4]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("damage", ["truncate weights", "garbage state", "bad json", "missing state"])
def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, model, damage):
    path = save(tmp_path, 10, model)
    if damage == "truncate weights":
        f = os.path.join(path, "model.safetensors")
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    elif damage == "garbage state":
        with open(os.path.join(path, checkpoint.STATE), "wb") as fh:
            fh.write(b"\x80\x04not a pickle")
    elif damage == "bad json":
        with open(os.path.join(path, checkpoint.META), "w") as fh:
            fh.write("{")
    else:
        os.remove(os.path.join(path, checkpoint.STATE))
    with pytest.raises(ValueError, match=f"checkpoint {path} is corrupt or incomplete") as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training checkpoint in directory"):
        checkpoint.resolve(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not an HF checkpoint directory"):
        checkpoint.model_dir(str(tmp_path))
