"""Fine-grained FP8 (E4M3) quantization, the DeepSeek-V3 recipe (§3.3.1), plain-PyTorch reference.

Weights: one scale per 128×128 block; activations: one per 1×128 tile along the inner dim. scale = amax / 448
(E4M3's largest normal), stored as `scale_inv` so that dequantized = fp8 · scale_inv (DeepSeek's checkpoint
convention, `weight_scale_inv`). Dims that are not multiples of the block are padded for the amax only.
"""
import torch

FP8_MAX = 448.0
BLOCK = 128


def _blocks_amax(w: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = w.shape
    R, C = -(-rows // block), -(-cols // block)
    padded = torch.zeros(R * block, C * block, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w.float().abs()
    return padded.view(R, block, C, block).amax(dim=(1, 3))


def _expand(scale: torch.Tensor, shape, block: int) -> torch.Tensor:
    return scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[: shape[0], : shape[1]]


def weight_quant(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (float8_e4m3fn (out, in), scale_inv fp32 (ceil(out/b), ceil(in/b)))."""
    scale_inv = _blocks_amax(w, block).clamp(min=1e-12) / FP8_MAX
    q = (w.float() / _expand(scale_inv, w.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale_inv


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32, block: int = BLOCK):
    """Inverse of weight_quant: fp8 block × its scale_inv."""
    expected = (-(-q.shape[0] // block), -(-q.shape[1] // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
                         f"for a {tuple(q.shape)} weight with {block}x{block} blocks")
    return (q.float() * _expand(scale_inv.float(), q.shape, block)).to(dtype)
