"""A served checkpoint: an HF deepseek_v3 directory (config.json + safetensors) and the tokenizer files
beside it, as `nanoseek train` exports and transformers' save_pretrained writes."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load(ckpt: str, tokenizer: str | None = None, device: str = "auto", dtype: str = "auto"):
    """-> (model in eval mode, tokenizer). dtype auto: bfloat16 on CUDA, float32 on CPU."""
    from ..data.tokenizer import Tokenizer
    from ..io import load_hf

    device = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    tok_dir = tokenizer or ckpt
    try:
        tok = Tokenizer.from_dir(tok_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"no tokenizer files in {tok_dir}; pass --tokenizer DIR") from None
    model = load_hf(ckpt, dtype=DTYPES[dtype], device=device)
    return model.eval(), tok
