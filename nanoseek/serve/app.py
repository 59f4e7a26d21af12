"""The OpenAI-compatible HTTP API over the engine, as a Starlette ASGI app.

    GET  /health                 liveness, running and waiting requests, engine counters
    GET  /v1/models              the one served model
    POST /v1/completions         prompt(s) -> text, n choices each; `stream` sends server-sent events
    POST /v1/chat/completions    messages -> the tokenizer's chat template -> assistant message

Each choice is one engine request. The engine runs on its own thread and hands events to the event loop
through an asyncio queue per HTTP request; when the client goes away (a cancelled stream, or a disconnect seen
while waiting) the request's engine requests are cancelled and their slots freed at the next step.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..infer.engine import Engine, QueueFull
from .schemas import APIError, Limits, Parsed, parse_chat, parse_completion


def create_app(engine: Engine, tokenizer, model_name: str, limits: Limits, api_key: str | None = None,
               lifespan=None) -> Starlette:
    created = int(time.time())

    def authorize(request: Request):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")

    async def read_json(request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            raise APIError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise APIError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None

    async def health(request: Request):
        return JSONResponse({"status": "ok", "running": engine.running, "waiting": len(engine.waiting),
                             **engine.stats})

    async def models(request: Request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek",
             "max_model_len": limits.context}]})

    vocab = engine.model.cfg.vocab_size

    def encode(prompt, chat: bool) -> list[int]:
        if chat:
            return tokenizer.encode(tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
        if isinstance(prompt, str):
            return tokenizer.encode(prompt)
        if not all(0 <= t < vocab for t in prompt):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        return prompt

    async def generate(request: Request, chat: bool):
        authorize(request)
        body = await read_json(request)
        parsed: Parsed = (parse_chat if chat else parse_completion)(body, limits)
        if body.get("model") not in (None, model_name):
            raise APIError(404, f"model {body['model']!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        jobs = []  # (choice index, prompt ids, params)
        prompt_tokens = 0
        for i, prompt in enumerate(parsed.prompts):
            ids = encode(prompt, chat)
            params = parsed.params
            if parsed.fill_context:
                params = replace(params, max_tokens=max(1, min(limits.max_tokens, limits.context - len(ids))))
            if len(ids) + params.max_tokens > limits.context:
                raise APIError(400, f"this model's context is {limits.context} tokens; the prompt has {len(ids)} "
                                    f"and max_tokens is {params.max_tokens}", param="messages" if chat else "prompt",
                               code="context_length_exceeded")
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            prompt_tokens += len(ids)
            for j in range(parsed.n):  # choices differ by seed; a given seed stays reproducible
                seed = None if params.seed is None else params.seed + j
                jobs.append((i * parsed.n + j, ids, replace(params, seed=seed)))

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        reqs = []
        try:
            for idx, ids, params in jobs:
                reqs.append(engine.submit(ids, params, emit=lambda ev, idx=idx: loop.call_soon_threadsafe(
                    events.put_nowait, (idx, ev))))
        except QueueFull as e:
            for r in reqs:
                r.cancel()
            raise APIError(503, f"the server is busy ({e}); retry later", type="server_error",
                           code="overloaded") from None
        except ValueError as e:
            for r in reqs:
                r.cancel()
            raise APIError(400, str(e)) from None

        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created":
                int(time.time()), "model": model_name}

        def usage():
            done = sum(r.completion_tokens for r in reqs)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

        if parsed.stream:
            return StreamingResponse(stream(head, chat, reqs, events, parsed.include_usage, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, reasons = [""] * len(reqs), [None] * len(reqs)
        try:
            pending = len(reqs)
            while pending:
                try:
                    idx, ev = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)   # nobody reads it; the finally frees the slots
                    continue
                if ev.error is not None:
                    raise APIError(500, f"generation failed: {ev.error}", type="server_error")
                texts[idx] += ev.text
                if ev.finish_reason is not None:
                    reasons[idx] = ev.finish_reason
                    pending -= 1
        finally:
            for r in reqs:
                if r.finish_reason is None:
                    r.cancel()
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, reasons))]
        obj = "chat.completion" if chat else "text_completion"
        return JSONResponse({**head, "object": obj, "choices": choices, "usage": usage()})

    async def stream(head, chat, reqs, events, include_usage, usage):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(idx, text, finish):
            if chat:
                choice = {"index": idx, "delta": {"content": text} if text else {}, "logprobs": None,
                          "finish_reason": finish}
            else:
                choice = {"index": idx, "text": text, "logprobs": None, "finish_reason": finish}
            return sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})

        try:
            if chat:
                for i in range(len(reqs)):
                    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
            pending = len(reqs)
            while pending:
                idx, ev = await events.get()
                if ev.error is not None:
                    yield sse(APIError(500, f"generation failed: {ev.error}", type="server_error").body())
                    return
                if ev.text or ev.finish_reason is not None:
                    yield chunk(idx, ev.text, ev.finish_reason)
                pending -= ev.finish_reason is not None
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects and Starlette cancels this generator
            for r in reqs:
                if r.finish_reason is None:
                    r.cancel()

    async def completions(request: Request):
        return await generate(request, chat=False)

    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    async def http_error(request: Request, e: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, str(e.detail), code=kind).body(), status_code=e.status_code)

    async def server_error(request: Request, e: Exception):
        return JSONResponse(APIError(500, f"{type(e).__name__}: {e}", type="server_error").body(), status_code=500)

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})
