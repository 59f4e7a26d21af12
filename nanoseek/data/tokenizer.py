"""Byte-level BPE tokenizer (HF `tokenizers`), kept as HF `tokenizer.json` + `tokenizer_config.json`, so
transformers' AutoTokenizer reads the same files and encodes identically; chat templates render as in transformers.

Special tokens take ids 0..7 in SPECIAL_TOKENS order. `<|end_of_text|>` is eos: it ends every document and every
assistant turn. Encoding never adds special tokens by itself (add_bos asks for bos).
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>", "<think>", "</think>"]
# optional system message, then user / assistant turns; assistant content (with any <think>…</think>) is verbatim
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end_of_text|>"
    "{% else %}{{ raise_exception('unknown role ' ~ m['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MODEL_MAX_LENGTH = 1_000_000    # the tokenizer itself sets no limit; the model's context does


def _token_name(value) -> str | None:
    """tokenizer_config writes a special token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _write_atomic(path: str, text: str) -> None:
    # a crash mid-write leaves path.tmp, never a truncated file under the real name
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class Tokenizer:
    def __init__(self, tok: HFTokenizer, bos: str | None = BOS, eos: str | None = EOS, pad: str | None = PAD,
                 chat_template: str | None = CHAT_TEMPLATE, model_max_length: int = MODEL_MAX_LENGTH,
                 directory: str | None = None):
        self.tok = tok
        self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.directory = directory

    # ---- files ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        """Reads path/tokenizer.json, and tokenizer_config.json / chat_template.jinja when present (as
        transformers writes them). Without a config, bos/eos/pad are the known names where the vocab has them."""
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
            try:
                with open(tc, encoding="utf-8") as f:
                    conf = json.load(f)
                if not isinstance(conf, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                raise ValueError(f"{tc}: unreadable ({e})") from None

        def name(key, known):
            if key in conf:
                return _token_name(conf[key])
            return known if tok.token_to_id(known) is not None else None

        template = conf.get("chat_template")
        if isinstance(template, list):   # older transformers: [{"name": ..., "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):   # where newer transformers save it; it wins over the config
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        if template is None and all(tok.token_to_id(t) is not None for t in SPECIAL_TOKENS):
            template = CHAT_TEMPLATE
        return cls(tok, name("bos_token", BOS), name("eos_token", EOS), name("pad_token", PAD), template,
                   conf.get("model_max_length", MODEL_MAX_LENGTH), directory=path)

    def save(self, directory: str) -> None:
        """tokenizer.json + tokenizer_config.json, readable by `transformers.AutoTokenizer.from_pretrained`."""
        os.makedirs(directory, exist_ok=True)
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                "eos_token": self.eos_token, "pad_token": self.pad_token, "chat_template": self.chat_template,
                "model_max_length": self.model_max_length, "clean_up_tokenization_spaces": False}
        _write_atomic(os.path.join(directory, "tokenizer.json"), self.tok.to_str(pretty=True))
        _write_atomic(os.path.join(directory, "tokenizer_config.json"), json.dumps(conf, indent=2) + "\n")
        self.directory = directory

    def files(self) -> list[str]:
        """Paths of the files this tokenizer was read from or saved to (to copy next to a checkpoint)."""
        if self.directory is None:
            return []
        names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
        return [p for p in (os.path.join(self.directory, n) for n in names) if os.path.isfile(p)]

    # ---- ids ----------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return self._bos(add_bos) + ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        """Like encode on each text, run in parallel by the Rust library."""
        return [self._bos(add_bos) + e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def _bos(self, add_bos: bool) -> list[int]:
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no bos token")
        return [self.bos_id] if add_bos else []

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    # ---- chat ---------------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as one string to encode. Rendered like transformers does (sandboxed Jinja with
        trim_blocks / lstrip_blocks, the special token names as variables), so any HF template gives HF's text."""
        if self.chat_template is None:
            raise ValueError(f"this tokenizer has no chat_template ({self.directory or 'not saved'})")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] needs 'role' and 'content'")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """The template compiled as transformers compiles it (same environment options and helpers)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    # Jinja's own tojson escapes HTML; templates written for transformers expect plain JSON
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template does not parse: {e}") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: all 256 bytes are in the base alphabet, so any text round-trips exactly. The vocab can
    come out smaller than vocab_size when the texts have fewer distinct merges to offer."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)
