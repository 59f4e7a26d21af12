"""Sample from a trained model: `nanoseek generate` and the demo's samples.

`ckpt` may be a training checkpoint, a run directory (its final/ export, else its latest checkpoint) or any HF
deepseek_v3 checkpoint directory, e.g. one written by transformers' save_pretrained.
"""
import os

from . import checkpoint


def sample(ckpt: str, prompts: list[str], tokenizer: str | None = None, device: str = "auto", **kw) -> list[str]:
    """Completions of `prompts`; kw: max_new_tokens, temperature (0 = greedy), top_k, top_p, seed."""
    from ..infer.generate import generate
    from ..infer.load import load

    if not os.path.exists(ckpt):
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    model, tok = load(checkpoint.model_dir(ckpt), tokenizer, device)
    return generate(model, tok, prompts, **kw)
