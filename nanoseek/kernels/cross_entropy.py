"""Cross-entropy and its gradient G = softmax − onehot on a chunk of logits (model/loss.py's chunked head): the
Triton kernel on CUDA (kernels/cross_entropy_triton.py), the PyTorch reference below elsewhere."""
from __future__ import annotations

import torch

from . import have_triton


def loss_and_grad_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, want_grad: bool):
    """-> (Σ_rows CE in fp32 or wider, G = (softmax − onehot) on valid rows in the logits' dtype, or None)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != ignore_index
    safe = labels.masked_fill(~valid, 0)
    lse = z.logsumexp(dim=-1)
    loss = ((lse - z.gather(1, safe[:, None]).squeeze(1)) * valid).sum()
    if not want_grad:
        return loss, None
    # in place on one fresh tensor: a chunk's temporaries stay at one (n, V) copy besides the logits
    g = (z - lse[:, None]).exp_()
    g[torch.arange(g.shape[0], device=g.device), safe] -= 1
    return loss, g.masked_fill_(~valid[:, None], 0).to(logits.dtype)


# on CUDA without Triton, inductor fuses the upcast, log-sum-exp, loss and G
_reference_compiled = torch.compile(loss_and_grad_reference, dynamic=False)


def loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, want_grad: bool,
                  inplace: bool = False):
    """inplace: the logits are a temporary that G may be written over (the Triton kernel does: half the memory)."""
    if not logits.is_cuda:
        return loss_and_grad_reference(logits, labels, ignore_index, want_grad)
    if have_triton() and logits.dtype in (torch.bfloat16, torch.float16, torch.float32):
        from . import cross_entropy_triton
        # .contiguous() is the caller's temporary or a fresh copy: G may go over either
        return cross_entropy_triton.loss_and_grad(logits.contiguous(), labels.contiguous(), ignore_index, want_grad,
                                                  inplace=inplace)
    return _reference_compiled(logits, labels, ignore_index, want_grad)
