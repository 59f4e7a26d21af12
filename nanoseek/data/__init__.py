from .corpus import default_corpus, default_prompts
from .loader import TokenLoader
from .prepare import prepare
from .tokenizer import Tokenizer, train_tokenizer

__all__ = ["default_corpus", "default_prompts", "TokenLoader", "prepare", "Tokenizer", "train_tokenizer"]
