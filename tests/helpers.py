"""Shared test helpers: random-but-nontrivial weights so that every parameter and buffer matters."""
import torch

from nanoseek.model import DeepSeekV3


@torch.no_grad()
def randomize(model, std: float = 0.02, seed: int = 0):
    """Random weights (not ones/zeros) for norms and the balance bias too, so a swapped or ignored tensor shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * 5 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def random_model(cfg, seed: int = 0) -> DeepSeekV3:
    torch.manual_seed(seed)
    return randomize(DeepSeekV3(cfg).eval(), seed=seed)


def packed_doc_ids(device=None) -> torch.Tensor:
    """(2, 300) document indices for the attention-mask tests: documents that span several 128-token blocks (so
    some blocks are skipped whole) and a padding tail of -1, as SFT packs it."""
    lengths = [[40, 170, 90], [128, 128, 30, 14]]
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n)) for n in lengths])
    doc_ids[1, -14:] = -1
    return doc_ids.to(device)
