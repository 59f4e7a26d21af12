"""OpenAI request bodies in, validated engine parameters out; OpenAI's error JSON for everything refused.

Parsing is by hand rather than through a schema library so that every refusal is OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, with the offending field named, instead of a framework's
own 422. Fields OpenAI defines but this server cannot honour (logprobs, penalties, tools, ...) are refused
when set to anything but their neutral value rather than silently ignored; unknown fields are ignored, as
clients send extras. Two extensions, as vLLM has them: `top_k` and `ignore_eos`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..infer.sample import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    context: int                  # prompt + completion tokens of one sequence (the engine's cache length)
    max_tokens: int               # cap on a request's max_tokens
    max_n: int = 8                # cap on n (choices per prompt)
    max_prompts: int = 32         # cap on the prompts of one /v1/completions request
    max_body_bytes: int = 1 << 20


@dataclass
class Parsed:
    prompts: list                 # completions: str or token ids each; chat: one list of messages
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    fill_context: bool            # max_tokens not given and no default: whatever the context leaves (chat)


_NEUTRAL = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
            "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
            "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "functions": (None, []),
            "tool_choice": (None, "none"), "function_call": (None, "none")}


def _field(body: dict, name: str, kinds, default, what: str):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise APIError(400, f"'{name}' must be {what}, got {v!r}", param=name)
    if not isinstance(v, kinds):
        raise APIError(400, f"'{name}' must be {what}, got {v!r}", param=name)
    return v


def _common(body: dict, limits: Limits, default_max_tokens: int | None, default_temperature: float = 1.0):
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    rf = body.get("response_format")
    if rf not in (None, {"type": "text"}):
        raise APIError(400, "'response_format' other than text is not supported", param="response_format")
    max_tokens = _field(body, "max_completion_tokens", int, None, "a positive integer")
    max_tokens = _field(body, "max_tokens", int, max_tokens, "a positive integer")
    given = max_tokens is not None
    if given and max_tokens < 1:
        raise APIError(400, f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    if given and max_tokens > limits.max_tokens:
        raise APIError(400, f"'max_tokens' must be at most {limits.max_tokens}, got {max_tokens}", param="max_tokens")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or any(not isinstance(s, str) or not s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 4 of them", param="stop")
    params = SamplingParams(
        max_tokens=max_tokens if given else default_max_tokens or limits.max_tokens,
        temperature=float(_field(body, "temperature", (int, float), default_temperature, "a number in [0, 2]")),
        top_p=float(_field(body, "top_p", (int, float), 1.0, "a number in (0, 1]")),
        top_k=_field(body, "top_k", int, 0, "a non-negative integer"),
        seed=_field(body, "seed", int, None, "an integer"),
        stop=stop,
        ignore_eos=_field(body, "ignore_eos", bool, False, "a boolean"))
    try:
        params.validate()
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split()[0]) from None
    n = _field(body, "n", int, 1, "a positive integer")
    if not 1 <= n <= limits.max_n:
        raise APIError(400, f"'n' must be in [1, {limits.max_n}], got {n}", param="n")
    stream = _field(body, "stream", bool, False, "a boolean")
    opts = _field(body, "stream_options", dict, {}, "an object")
    include_usage = bool(opts.get("include_usage", False))
    return params, n, stream, include_usage, not given and default_max_tokens is None


def parse_completion(body: dict, limits: Limits) -> Parsed:
    """/v1/completions: prompt is a string, a list of strings, a list of token ids or a list of such lists."""
    params, n, stream, include_usage, fill = _common(body, limits, default_max_tokens=16)
    p = body.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) or (isinstance(x, list) and x and all(
            isinstance(t, int) for t in x)) for x in p):
        prompts = p
    else:
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                            "token-id lists, and not empty", param="prompt")
    if len(prompts) > limits.max_prompts:
        raise APIError(400, f"at most {limits.max_prompts} prompts per request, got {len(prompts)}", param="prompt")
    return Parsed(prompts, params, n, stream, include_usage, fill)


def parse_chat(body: dict, limits: Limits) -> Parsed:
    """/v1/chat/completions: messages [{role, content}], content a string or a list of text parts."""
    params, n, stream, include_usage, fill = _common(body, limits, default_max_tokens=None)
    msgs = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}] must be an object with role system, user or assistant",
                           param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            if any(not isinstance(c, dict) or c.get("type") != "text" or not isinstance(c.get("text"), str)
                   for c in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return Parsed([out], params, n, stream, include_usage, fill)
