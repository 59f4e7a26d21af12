"""Grouped GEMM: rows of x grouped by expert, each group times its own weight.

`grouped_mm(x, w, counts)`: x (M, K) with counts[e] consecutive rows for group e; w (E, N, K) (nn.Linear layout)
-> (M, N) with out[rows of e] = x[rows of e] @ w[e].T.

`torch._grouped_mm` runs it as one kernel where it can: bf16 on sm90+ GPUs, and fp32 on CPU in the torch builds
that have a CPU kernel (2.13 does; probed at import), outside torch.compile. Elsewhere (float64, older GPUs or builds)
one matmul per group.
"""
import torch


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One matmul per group: simple, any device and dtype (reads counts on the host)."""
    parts = [xs @ w[e].t() for e, xs in enumerate(x.split(counts.tolist()))]
    return torch.cat(parts) if parts else x.new_empty(0, w.shape[1])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose gradient is made contiguous: torch._grouped_mm's backward rejects an expanded gradient
    (stride 0), as `y.sum().backward()` gives."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    # offsets = cumulative row ends (int32); no host sync, so it compiles and graph-captures
    offs = counts.cumsum(0).to(torch.int32)
    return _ContiguousGrad.apply(torch._grouped_mm(x, w.transpose(-2, -1), offs=offs))


def _probe_cpu_kernel() -> bool:
    try:
        torch._grouped_mm(torch.ones(2, 4), torch.ones(1, 4, 4), offs=torch.tensor([2], dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


# probed at import, not lazily: a first probe inside a model's forward ran under whatever dispatch mode was active,
# and selective recomputation (train/recompute.py) then recorded the probe's output as the layer's first grouped
# GEMM and handed it back in backward's recomputation, where no probe ran (a shape error, CPU only)
_CPU_KERNEL = _probe_cpu_kernel()


def _one_kernel(x: torch.Tensor, w: torch.Tensor) -> bool:
    if x.dtype != w.dtype or not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    # torch.compile's shape rules for it take bf16 only, so compiled CPU code keeps the per-group loop
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()
            and _CPU_KERNEL)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):  # autocast does not know grouped GEMMs: cast as it would for mm
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    if _one_kernel(x, w):
        return _grouped_mm_torch(x, w, counts)
    return grouped_mm_reference(x, w, counts)
