"""`nanoseek chat`: an interactive terminal chat, the reply streamed as it is generated.

The engine runs in-process on its background thread with one slot; the conversation is re-templated every
turn (the tokenizer's chat template) and, when it outgrows the context, its oldest turns are dropped.
Ctrl-C during a reply stops that reply; Ctrl-C or Ctrl-D at the prompt quits.
"""
from __future__ import annotations

import sys

from ..infer.engine import Engine
from ..infer.load import load
from ..infer.sample import SamplingParams

HELP = "/reset starts over, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


def chat(ckpt: str, tokenizer: str | None = None, device: str = "auto", dtype: str = "auto",
         system: str | None = None, max_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.95,
         top_k: int = 0, seed: int | None = None, max_len: int | None = None, speculative: bool = False,
         out=sys.stdout):
    model, tok = load(ckpt, tokenizer, device, dtype)
    max_len = max_len or min(model.cfg.max_position_embeddings, 4096)
    max_tokens = min(max_tokens, max_len - 1)
    engine = Engine(model, tok, max_batch=1, max_len=max_len, speculative=speculative).start()
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    print(f"nanoseek chat: {ckpt} ({HELP})", file=out, flush=True)
    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                messages = list(start)
                continue
            if not line:
                continue
            messages.append({"role": "user", "content": line})
            ids = _fit(tok, messages, len(start), max_len - max_tokens)
            if ids is None:
                print("(message too long for the context)", file=out, flush=True)
                messages.pop()
                continue
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    seed=seed)
            messages.append({"role": "assistant", "content": _reply(engine.submit(ids, params), out)})
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop(drain=False)
        print(file=out, flush=True)


def _fit(tok, messages: list[dict], keep: int, budget: int) -> list[int] | None:
    """Token ids of the templated conversation, dropping the oldest turns after the first `keep` messages
    (the system prompt) until it fits `budget`; None if even the last message alone does not."""
    while True:
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        ids = list(prompt) if isinstance(prompt, list) else tok.encode(prompt)
        if len(ids) <= budget:
            return ids
        if len(messages) - keep <= 1:
            return None
        del messages[keep: keep + 2 if len(messages) - keep > 2 else keep + 1]


def _reply(req, out) -> str:
    print("bot> ", end="", file=out, flush=True)
    text = ""
    try:
        for ev in req:
            print(ev.text, end="", file=out, flush=True)
            text += ev.text
    except KeyboardInterrupt:
        req.cancel()
        for ev in req:  # the engine confirms with a final event; the slot is free after it
            text += ev.text
        print(" [stopped]", end="", file=out)
    print(file=out, flush=True)
    return text
