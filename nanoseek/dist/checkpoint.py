"""Distributed checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards in
parallel, and a checkpoint saved at one world size / ep_size loads at another (DCP reshards by global offsets).

What DCP sees:
    model.<name>          FSDP2 parameters as they are (DTensors sharded over all ranks); the routed experts as
                          DTensors (Replicate over expert-DP, Shard(0) over EP) built around the local slices,
                          so their global shape is (n_routed_experts, …); buffers (the balance biases) are plain
                          tensors, identical on every rank, stored once
    optim.<name>.{exp_avg, exp_avg_sq, step}   AdamW state laid out like its parameter
The directory is an ordinary training checkpoint (`<run>/checkpoints/step-XXXXXXXX`, trainer.json, tokenizer
files, written atomically by rank 0's rename) whose weights are DCP files instead of model.safetensors.
`to_hf` turns one into an HF checkpoint directory in a single process; `export_hf` does it from a live run.
"""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Replicate, Shard

from .ep import EPExperts
from .parallel import DistEnv

DCP_METADATA = ".metadata"


def expert_names(model) -> set[str]:
    return {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, EPExperts)
            for pn, _ in m.named_parameters()}


def _global(t: torch.Tensor, env: DistEnv) -> DTensor:
    """A local expert slice as the DTensor of all experts (a view: loading into it writes the slice)."""
    return DTensor.from_local(t, env.experts_mesh, (Replicate(), Shard(0)), run_check=False)


def model_state(model, env: DistEnv) -> dict:
    experts = expert_names(model)
    return {name: _global(t, env) if name in experts else t for name, t in model.state_dict().items()}


def optim_state(model, optimizer, env: DistEnv, create: bool = False) -> dict:
    """AdamW state by parameter name; create: make zero state first (the layout a load fills in)."""
    experts = expert_names(model)
    out = {}
    for name, p in model.named_parameters():
        s = optimizer.state[p]
        if create and not s:
            s.update(step=0, exp_avg=torch.zeros_like(p, dtype=optimizer.moment_dtype),
                     exp_avg_sq=torch.zeros_like(p, dtype=optimizer.moment_dtype))
        if not s:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            t = s[key]
            out[f"{name}.{key}"] = _global(t, env) if name in experts else t
        out[f"{name}.step"] = torch.tensor(s["step"])
    return out


def save(directory: str, model, optimizer, env: DistEnv) -> None:
    """Collective: every rank calls it with the same directory."""
    dcp.save({"model": model_state(model, env), "optim": optim_state(model, optimizer, env)},
             checkpoint_id=directory)


def load(directory: str, model, optimizer, env: DistEnv) -> None:
    """Collective: load weights and optimizer state in place, resharded to this run's layout."""
    state = {"model": model_state(model, env), "optim": optim_state(model, optimizer, env, create=True)}
    dcp.load(state, checkpoint_id=directory)
    steps = state["optim"]
    for name, p in model.named_parameters():
        optimizer.state[p]["step"] = int(steps[f"{name}.step"])


def is_dcp(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, DCP_METADATA))


def full_state_dict(model, env: DistEnv) -> dict | None:
    """Collective: the plain (unsharded) state_dict, on rank 0 only (None elsewhere)."""
    out = {}
    for name, t in model_state(model, env).items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if env.is_main:
            out[name] = t.detach().cpu().clone()
    return out if env.is_main else None


def export_hf(model, env: DistEnv, directory: str, files=()) -> str:
    """Collective: gather the weights and write an HF checkpoint directory from rank 0."""
    from ..model import DeepSeekV3
    from ..train import checkpoint

    state = full_state_dict(model, env)
    if env.is_main:
        plain = DeepSeekV3(model.cfg)
        plain.load_state_dict(state)
        checkpoint.export(plain, directory, files)
    dist.barrier()
    return directory


def to_hf(ckpt: str, directory: str, files=()) -> str:
    """A DCP training checkpoint -> an HF checkpoint directory, in one process (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from ..config import ModelConfig
    from ..model import DeepSeekV3
    from ..train import checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pt")
        dcp_to_torch_save(ckpt, path)
        state = torch.load(path, weights_only=True)["model"]
    cfg = ModelConfig.from_json(os.path.join(ckpt, "config.json"))
    model = DeepSeekV3(cfg)
    model.load_state_dict(state)
    return checkpoint.export(model, directory, files)
