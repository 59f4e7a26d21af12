"""Cross-entropy through the output head in row chunks, so the full (tokens × vocab) fp32 logits never exist:
each chunk's logits are recomputed in backward (one extra head GEMM) instead of being stored. At V3's 129K
vocabulary and 16K tokens a step, the stored fp32 logits alone would be 8.5 GB."""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = F.linear(h, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits -> fp32 softmax
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


# on CUDA the upcast, log-softmax and gather fuse into one kernel around the head GEMM (compiled on first use)
_chunk_loss_cuda = torch.compile(_chunk_loss, dynamic=False)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                          chunk_rows: int = 4096) -> torch.Tensor:
    """mean CE of softmax(h Wᵀ) against labels over the rows whose label is not ignore_index.
    h (..., H), weight (V, H), labels (...)."""
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    total = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    fn = _chunk_loss_cuda if h.is_cuda else _chunk_loss
    for start in range(0, h.shape[0], chunk_rows):
        sl = slice(start, start + chunk_rows)
        if torch.is_grad_enabled():
            total = total + checkpoint(fn, h[sl], weight, labels[sl], ignore_index, use_reentrant=False)
        else:
            total = total + fn(h[sl], weight, labels[sl], ignore_index)
    return total / (labels != ignore_index).sum().clamp(min=1)
