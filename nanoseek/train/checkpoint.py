"""Training checkpoints: atomic, self-contained, and loaded without unpickling anything.

A checkpoint is a directory `<out_dir>/checkpoints/step-XXXXXXXX` that is also an HF deepseek_v3 checkpoint
(config.json, model.safetensors, tokenizer files), so `load_hf` and `nanoseek generate --ckpt` read it as is,
plus the trainer's state:
    trainer.json      step, tokens seen, data position, the train config (plain JSON)
    trainer.pt        optimizer state and RNG states: tensors and numbers only, read with weights_only=True
    ema.safetensors   the EMA weights, when enabled
The aux-loss-free balance biases are model buffers, so they are in model.safetensors with the weights.

Atomicity: everything is written into a hidden temporary directory beside the target, fsynced, and renamed
into place in one step. A crash or a full disk before the rename leaves only the temporary directory (cleared by
the next save) and the previous checkpoints untouched.
"""
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file

from ..io import load_hf, save_hf

META, STATE, EMA_FILE = "trainer.json", "trainer.pt", "ema.safetensors"
_STEP_DIR = re.compile(r"step-(\d{8})$")


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints of a run, oldest first."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "step-*")):
        m = _STEP_DIR.search(path)
        if m and os.path.isfile(os.path.join(path, META)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve(path: str) -> str:
    """A checkpoint directory, or a run directory -> its latest checkpoint."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    found = checkpoints(path)
    if not found:
        what = "directory" if os.path.isdir(path) else "path"
        raise FileNotFoundError(f"no training checkpoint in {what} {path}")
    return found[-1][1]


def model_dir(path: str) -> str:
    """Where the HF weights of `path` are: an HF checkpoint directory itself (a training checkpoint is one),
    a run directory's final export, or else its latest checkpoint."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if os.path.isfile(os.path.join(path, "final", "config.json")):
        return os.path.join(path, "final")
    if checkpoints(path):
        return resolve(path)
    raise FileNotFoundError(f"{path}: not an HF checkpoint directory (no config.json), nor a run directory "
                            f"with final/ or checkpoints/")


def save(run_dir: str, step: int, model, meta: dict, state: dict, ema: dict | None = None,
         files: list[str] = (), keep: int = 3) -> str:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`. `files` (tokenizer files) are
    copied in so that the checkpoint is usable on its own."""
    target = os.path.join(run_dir, "checkpoints", f"step-{step:08d}")

    def write(tmp):
        save_hf(model, tmp)
        for f in files:
            shutil.copy2(f, tmp)
        torch.save(state, os.path.join(tmp, STATE))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, os.path.join(tmp, EMA_FILE))
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=2)

    write_atomic(target, write)
    for _, old in checkpoints(run_dir)[:-keep]:
        _remove(old)
    return target


def export(model, directory: str, files: list[str] = ()) -> str:
    """An HF checkpoint directory (weights kept in their dtype, config.json, tokenizer files), written atomically."""
    def write(tmp):
        save_hf(model, tmp)
        for f in files:
            shutil.copy2(f, tmp)
    write_atomic(directory, write)
    return directory


def read_meta(ckpt: str) -> dict:
    try:
        with open(os.path.join(ckpt, META)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {ckpt} is corrupt or incomplete: {META} unreadable ({e})") from None


def load(ckpt: str, device="cpu"):
    """-> (model, meta, state, ema or None). Any unreadable part raises ValueError naming the checkpoint."""
    meta = read_meta(ckpt)
    part = "weights"
    try:
        model = load_hf(ckpt, dtype=torch.float32, device=device)
        part = STATE
        state = torch.load(os.path.join(ckpt, STATE), map_location="cpu", weights_only=True)
        part = EMA_FILE
        ema = load_file(os.path.join(ckpt, EMA_FILE)) if os.path.exists(os.path.join(ckpt, EMA_FILE)) else None
    except FileNotFoundError as e:
        raise ValueError(f"checkpoint {ckpt} is corrupt or incomplete: {os.path.basename(e.filename or part)} "
                         f"is missing") from None
    except Exception as e:  # safetensors, torch.load and load_hf errors all mean the same to the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"checkpoint {ckpt} is corrupt or incomplete: {part}: {reason}") from None
    return model, meta, state, ema


def discard_after(run_dir: str, step: int) -> list[str]:
    """Delete checkpoints newer than `step` (a run resumed from an earlier checkpoint abandons them)."""
    later = [path for s, path in checkpoints(run_dir) if s > step]
    for path in later:
        _remove(path)
    return later


# ---- atomic directory writes -------------------------------------------------------------------------------
def write_atomic(target: str, write: Callable[[str], None]) -> None:
    """Run write(tmp) into a fresh hidden directory beside `target`, fsync it, and rename it to `target`."""
    parent, name = os.path.split(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    _recover(parent)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
    try:
        write(tmp)
        for f in os.listdir(tmp):
            _fsync(os.path.join(tmp, f))
        _fsync(tmp)
        if os.path.exists(target):  # replacing: move the old one aside, then swap in the new one
            os.rename(target, os.path.join(parent, f".old-{name}"))
        os.rename(tmp, target)
        _fsync(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"writing {target} failed ({e.strerror or e}); previous checkpoints are "
                                   f"intact") from None
        raise
    shutil.rmtree(os.path.join(parent, f".old-{name}"), ignore_errors=True)


def _recover(parent: str) -> None:
    """Clear what an interrupted write left: temporary directories, and a replaced target moved aside whose
    replacement never arrived (that one is put back)."""
    for path in glob.glob(os.path.join(parent, ".tmp-*")) + glob.glob(os.path.join(parent, ".del-*")):
        shutil.rmtree(path, ignore_errors=True)
    for path in glob.glob(os.path.join(parent, ".old-*")):
        target = os.path.join(parent, os.path.basename(path)[len(".old-"):])
        if os.path.exists(target):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.rename(path, target)


def _remove(path: str) -> None:
    """Rename first, so a deletion cut short never leaves a half-deleted checkpoint that looks complete."""
    parent, name = os.path.split(path)
    doomed = os.path.join(parent, f".del-{name}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
