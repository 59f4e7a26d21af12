"""Fine-grained FP8 (E4M3) quantization, the DeepSeek-V3 recipe (§3.3.1), plain-PyTorch reference.

Weights: one scale per 128×128 block; activations: one per 1×128 tile along the GEMM's inner dim. Per tile, with
a = max(amax, 1e-12),
    scale_inv = a / 448,    q = E4M3_rne(clamp(x · (448 / a), ±448)),    x ≈ q · scale_inv
with 448 E4M3's largest normal; both quotients are IEEE fp32 divisions, one per tile. Multiplying by the
reciprocal scale, as DeepSeek's own kernels do, instead of dividing each element by scale_inv, changes q by at most
one E4M3 step where x · (448 / a) lands within an fp32 ulp of a rounding boundary, and makes the quantization
kernels 1.4-2.8× faster (an IEEE division per element costs more than the memory traffic; BENCHMARKS.md).
`scale_inv` is the dequantization multiplier (DeepSeek's checkpoint convention, `weight_scale_inv`, and what
`torch._scaled_mm` takes). Dims that are not multiples of the block get a partial
last tile: its amax is taken over the elements that exist (the same as zero padding, which never raises an amax).

This file defines the arithmetic; the Triton kernels (kernels/fp8_quant.py) must reproduce it bit for bit, and
the CPU emulation of FP8 training (fp8/emulate.py) is built from it.
"""
import torch

FP8_MAX = 448.0
BLOCK = 128
FP8 = torch.float8_e4m3fn


def _blocks_amax(w: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    rows, cols = w.shape
    R, C = -(-rows // block_rows), -(-cols // block_cols)
    padded = torch.zeros(R * block_rows, C * block_cols, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w.float().abs()
    return padded.view(R, block_rows, C, block_cols).amax(dim=(1, 3))


def _expand(scale: torch.Tensor, shape, block_rows: int, block_cols: int) -> torch.Tensor:
    return scale.repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)[: shape[0], : shape[1]]


def _quant(x: torch.Tensor, block_rows: int, block_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    amax = _blocks_amax(x, block_rows, block_cols).clamp(min=1e-12)
    # tensor operands on both sides: CUDA divides by a Python scalar as a multiply by its reciprocal (1 ulp off
    # IEEE division), CPU does not; the Triton kernels divide exactly (div_rn)
    fp8_max = torch.full_like(amax, FP8_MAX)
    scale_inv, scale = amax / fp8_max, fp8_max / amax
    q = (x.float() * _expand(scale, x.shape, block_rows, block_cols)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale_inv


def weight_quant(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (float8_e4m3fn (out, in), scale_inv fp32 (ceil(out/b), ceil(in/b)))."""
    return _quant(w, block, block)


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32, block: int = BLOCK):
    """Inverse of weight_quant: fp8 block × its scale_inv."""
    expected = (-(-q.shape[0] // block), -(-q.shape[1] // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
                         f"for a {tuple(q.shape)} weight with {block}x{block} blocks")
    return (q.float() * _expand(scale_inv.float(), q.shape, block, block)).to(dtype)


def act_quant(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (float8_e4m3fn (M, K), scale_inv fp32 (M, ceil(K/b))): one scale per 1×b tile along K."""
    return _quant(x, 1, block)


def act_dequant(q: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32, block: int = BLOCK):
    """Inverse of act_quant."""
    return (q.float() * _expand(scale_inv.float(), q.shape, 1, block)).to(dtype)


def act_quant_t(x: torch.Tensor, counts: list[int] | None = None, block: int = BLOCK):
    """The operand a Wgrad GEMM needs: x (M, K) with rows in groups of counts[g] (one group when None) ->
    per group, act_quant(x_gᵀ) = (float8 (K, m_g), scale_inv (K, ceil(m_g/b))).

    dW = dyᵀ x sums over tokens, so tokens are the inner dim here and each tile is 128 tokens × 1 feature.
    Tiles restart at every group's first row: an expert's Wgrad is its own GEMM over its own tokens, and no
    tile (so no scale) is shared between two experts.
    """
    return [act_quant(xg.t(), block) for xg in x.split(counts if counts is not None else [x.shape[0]])]
