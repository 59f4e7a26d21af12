"""Byte-level BPE tokenizer (HF `tokenizers`), saved as HF `tokenizer.json` + `tokenizer_config.json` so
transformers' AutoTokenizer reads the same files, with the special tokens and chat template the project uses."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end_of_text|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class Tokenizer:
    def __init__(self, tok: HFTokenizer, bos: str | None = BOS, eos: str | None = EOS, pad: str | None = PAD,
                 chat_template: str | None = CHAT_TEMPLATE, directory: str | None = None):
        self.tok = tok
        self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
        self.chat_template = chat_template
        self.directory = directory

    # ---- files ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        try:
            tok = HFTokenizer.from_file(tj)
        except Exception as e:
            raise ValueError(f"{tj}: unreadable tokenizer ({e})") from None
        conf = {}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(tc):
            with open(tc) as f:
                conf = json.load(f)

        def name(key, fallback):
            v = conf.get(key, fallback if tok.token_to_id(fallback) is not None else None)
            return v.get("content") if isinstance(v, dict) else v

        return cls(tok, name("bos_token", BOS), name("eos_token", EOS), name("pad_token", PAD),
                   conf.get("chat_template", CHAT_TEMPLATE), directory=path)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.tok.save(os.path.join(directory, "tokenizer.json"))
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                "eos_token": self.eos_token, "pad_token": self.pad_token, "chat_template": self.chat_template,
                "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(conf, f, indent=2)
        self.directory = directory

    def files(self) -> list[str]:
        """Paths of the files this tokenizer was read from (to copy next to a checkpoint)."""
        if self.directory is None:
            return []
        return [p for p in (os.path.join(self.directory, n) for n in ("tokenizer.json", "tokenizer_config.json"))
                if os.path.isfile(p)]

    # ---- ids ----------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def bos_id(self):
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self):
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self):
        return self.token_to_id(self.pad_token)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2

        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] needs 'role' and 'content'")
        env = jinja2.Environment(undefined=jinja2.StrictUndefined)
        return env.from_string(self.chat_template).render(messages=messages,
                                                          add_generation_prompt=add_generation_prompt)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text round-trips exactly."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)
