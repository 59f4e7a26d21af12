"""Cross-entropy through the output head in row chunks, with the gradients computed in the forward pass, so
neither the full (tokens × vocab) fp32 logits nor a recomputation of the head GEMM is ever needed.

For a chunk of rows h (n, H) with logits z = h Wᵀ and p = softmax(z), the summed loss is Σ_rows lse(z) − z_y
and its gradient is G = p − onehot(y) (zero on ignored rows), so
    ∂L/∂h = G W,    ∂L/∂W = Gᵀ h.
Forward computes both per chunk and keeps only them (n·H + V·H values); backward scales them by the incoming
gradient. That is three head GEMMs per chunk, against four when the logits are recomputed in backward, and
at V3's 129K vocabulary and 16K tokens a step it avoids the 8.5 GB of fp32 logits.

A chunk's logits take at most CHUNK_BYTES in the compute dtype (on CUDA, G is written over them): in bf16 at V3's
vocabulary 4,152 rows, at `small`'s 32K a whole 16K-token step in one chunk, where 4,096-row chunks spent an extra
fp32 read and write of ∂L/∂W per chunk and four launches of the loss kernel with their tails (0.6 ms of an H200
step, BENCHMARKS.md).
"""
import torch

from ..kernels.cross_entropy import loss_and_grad

CHUNK_BYTES = 2**30


def _add_product(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """acc + a @ b in `dtype` (fp32 or wider), acc None for the first chunk. On CUDA the product is written in fp32
    by cuBLAS and the sum happens in its epilogue (addmm with an fp32 out_dtype), so the product is never written
    in bf16, cast and added in passes of their own (at 32K vocabulary those passes were 0.9 ms of an H200 step,
    bench/profile_train.py)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and dtype == torch.float32:
        if acc is None:
            return torch.mm(a, b, out_dtype=dtype)
        return torch.addmm(acc, a, b, out_dtype=dtype, out=acc)
    product = (a @ b).to(dtype)
    return product if acc is None else acc.add_(product)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index, chunk_rows, grad_enabled):
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        hc, w = h.to(dtype), weight.to(dtype)
        chunk_rows = chunk_rows or max(CHUNK_BYTES // (w.shape[0] * w.element_size()), 1)
        # needs_input_grad ignores no_grad mode: grad_enabled (the caller's mode) spares evaluation the gradients
        want_h, want_w = (ctx.needs_input_grad[0], ctx.needs_input_grad[1]) if grad_enabled else (False, False)
        total = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=h.device)
        grad_h = torch.empty_like(hc) if want_h else None
        grad_w = None
        for start in range(0, hc.shape[0], chunk_rows):
            sl = slice(start, start + chunk_rows)
            loss, g = loss_and_grad(hc[sl] @ w.t(), labels[sl], ignore_index, want_h or want_w, inplace=True)
            total += loss
            if want_h:
                grad_h[sl] = g @ w
            if want_w:
                grad_w = _add_product(grad_w, g.t(), hc[sl], total.dtype)
        if want_w and grad_w is None:   # no rows
            grad_w = torch.zeros_like(w, dtype=total.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else (grad_h * grad_out).to(ctx.dtypes[0])
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.dtypes[1])
        return gh, gw, None, None, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                          chunk_rows: int | None = None) -> torch.Tensor:
    """mean CE of softmax(h Wᵀ) against labels over the rows whose label is not ignore_index.
    h (..., H), weight (V, H), labels (...); chunk_rows None: as many as CHUNK_BYTES of logits allow."""
    labels = labels.reshape(-1)
    total = _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels, ignore_index, chunk_rows,
                                      torch.is_grad_enabled())
    return total / (labels != ignore_index).sum().clamp(min=1)
