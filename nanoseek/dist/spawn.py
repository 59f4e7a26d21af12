"""Run a function on N local processes joined in a gloo process group: multi-rank tests and CPU benchmarks
without torchrun. `spawn(fn, n, *args)` calls fn(rank, world_size, *args) on each rank and returns the list of
what they returned (anything torch.save can write)."""
from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args, threads):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args, threads: int = 1, start_method: str = "spawn") -> list:
    """fn must be importable (a module-level function) for the spawn start method. "fork" starts in well under
    a second instead of seconds per process (no re-import of torch): fine on CPU with one thread per rank, as
    here; not after CUDA was initialized in the parent."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, free_port(), out_dir, fn, args, threads), nprocs=world_size,
                           join=True, start_method=start_method)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
