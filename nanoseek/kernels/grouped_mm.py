"""Grouped GEMM: rows of x grouped by expert, each group times its own weight.

`grouped_mm(x, w, counts)`: x (M, K) with counts[e] consecutive rows for group e; w (E, N, K) (nn.Linear layout)
-> (M, N) with out[rows of e] = x[rows of e] @ w[e].T.
"""
import torch


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One matmul per group: simple, any device and dtype."""
    parts = [xs @ w[e].t() for e, xs in enumerate(x.split(counts.tolist()))]
    return torch.cat(parts) if parts else x.new_empty(0, w.shape[1])


def _grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    # torch._grouped_mm: bf16 on sm90+, offsets = cumulative row ends (int32)
    offs = counts.cumsum(0).to(torch.int32)
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):  # autocast does not know grouped GEMMs: cast as it would for mm
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    if (x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device)[0] >= 9):
        return _grouped_mm_torch(x, w, counts)
    return grouped_mm_reference(x, w, counts)
