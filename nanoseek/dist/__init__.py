"""Scale-out on PyTorch's own stack.

    torchrun --nproc-per-node N -m nanoseek train --config FILE     # [dist] ep_size, overlap, reshard_after_forward

parallel.py    torchrun / process-group setup (gloo on CPU, nccl on CUDA), FSDP2 for the dense parameters,
               gradient reduction and clipping across FSDP shards and expert slices
ep.py          expert parallelism: all-to-all dispatch / combine (autograd-aware), optional two-micro-batch overlap
train.py       DistTrainer: train/loop.py's step over many ranks; rank 0 logs and exports
checkpoint.py  distributed checkpoints (torch.distributed.checkpoint): save at one world size, resume at another;
               `to_hf` converts one to an HF checkpoint directory in one process
eplb.py        EPLB redundant-expert placement from per-expert loads (hierarchical / global)
redundant.py   inference with those replicas: logical -> physical experts, one process or EP
spawn.py       N local gloo ranks without torchrun (tests, CPU benchmarks)
"""
