"""Data: byte-level BPE tokenizer (HF files), the embedded default corpus, `prepare` (text -> token shards) and
the deterministic packed-sequence loader."""
from .corpus import default_corpus, default_prompts
from .loader import TokenLoader
from .prepare import prepare
from .tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

__all__ = ["default_corpus", "default_prompts", "TokenLoader", "prepare", "SPECIAL_TOKENS",
           "Tokenizer", "train_tokenizer"]
