"""The inference engine: continuous batching over slots of one preallocated LatentCache.

Each running request owns a slot (a row of the cache). Every step
  1. drops cancelled requests, freeing their slots;
  2. admits waiting requests into free slots: their prompts are prefilled together in one forward on a
     scratch cache, whose latents are then copied into the slots, and each samples its first token;
  3. advances every running request by one decode forward over slots [0, n) (plain: one token per request;
     speculative: the MTP draft is verified, 1 or 2 tokens per request).
Requests therefore join and leave between steps, and a finished request's slot is reused by the next one.
Free slots below n ride along with no effect: their cache rows do not advance. Slots are handed out lowest
first so that n stays small; on CUDA n is rounded up to a bucket so that decode replays a captured graph.

Output goes to each request as Events (text delta, token ids, finish reason) through its `emit` callback,
called on the engine's thread; by default a queue the request can be iterated over. `start()` runs steps on a
background thread; `step()` can also be driven by hand (tests, the simple generate path).
"""
from __future__ import annotations

import collections
import itertools
import queue
import threading
import traceback
from dataclasses import dataclass, field

import torch

from .cache import LatentCache
from .cuda_graph import CUDAGraphs
from .generate import prefill
from .sample import Sampler, SamplingParams, uniforms
from .speculative import mtp_draft, verify
from .text import TextStream


class QueueFull(RuntimeError):
    """Too many requests waiting; the server answers 503."""


@dataclass
class Event:
    text: str                                   # text that became final this step (may be empty)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None            # None while running; "stop" | "length" | "cancelled" | "error"
    error: str | None = None


class Request:
    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, emit=None):
        self.id = next(Request._ids)
        self.prompt = list(prompt)
        self.params = params
        self.tokens: list[int] = []              # generated, without EOS
        self.completion_tokens = 0               # tokens sampled, EOS included (OpenAI usage)
        # with Engine(logprobs=True): the model's log-probability (temperature 1) of each sampled token, EOS
        # included; plain decoding only. RL compares them with the trainer's: a gap means off-policy rollouts
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.cancelled = False
        self._queue: queue.Queue | None = None if emit is not None else queue.Queue()
        self.emit = emit if emit is not None else self._queue.put
        # engine-side state
        self.slot: int | None = None
        self.stream: TextStream | None = None
        self.generator: torch.Generator | None = None
        self.next_token: int | None = None       # sampled, not yet fed to the model
        self.draft: int | None = None            # MTP draft of the token after next_token

    def __iter__(self):
        """Events until the finishing one (only for requests made without an emit callback)."""
        while True:
            event = self._queue.get()
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self):
        """Thread-safe: the engine drops the request at its next step and emits a 'cancelled' event."""
        self.cancelled = True


def _buckets(n: int) -> list[int]:
    return sorted({min(2 ** i, n) for i in range(n.bit_length() + 1)})


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 16, max_len: int = 2048, max_waiting: int = 256,
                 prefill_tokens: int = 8192, speculative: bool = False, cuda_graphs: bool = True,
                 compile: bool = False, autocast: torch.dtype | None = None, logprobs: bool = False):
        """autocast: run the forwards under CUDA autocast to this dtype (a training policy's fp32 master weights
        decoded in bf16, as the trainer computes them). The weight casts are part of every step, not cached,
        so captured graphs read the weights as they are after each optimizer step.
        logprobs: record each sampled token's log-probability in Request.logprobs (a softmax over the vocabulary
        and a host transfer per step, so off unless asked for)."""
        if speculative and not len(model.mtp):
            raise ValueError("speculative decoding needs an MTP module (num_nextn_predict_layers >= 1)")
        self.model, self.tokenizer = model.eval(), tokenizer
        p = next(model.parameters())
        self.device = p.device
        self.autocast = autocast if self.device.type == "cuda" else None
        self.dtype = self.autocast or p.dtype
        self.max_batch, self.max_len, self.max_waiting = max_batch, max_len, max_waiting
        self.prefill_tokens = prefill_tokens
        self.speculative = speculative
        self.logprobs = logprobs
        self.cache = LatentCache(model.cfg, max_batch, max_len, dtype=self.dtype, device=self.device)
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.graphs = CUDAGraphs(cuda_graphs and self.device.type == "cuda")
        # decode is hundreds of tiny kernels per layer; compiling fuses the elementwise ones (graphs then
        # remove the launch cost of what is left). Shapes vary per bucket, hence dynamic.
        self.forward = torch.compile(model, dynamic=True) if compile else model
        self.mtp_draft = torch.compile(mtp_draft, dynamic=True) if compile else mtp_draft
        self.batch_buckets = _buckets(max_batch)
        # attended positions per graph: coarse (few graphs) but within 256 of the need (few wasted reads)
        self.len_buckets = sorted({min(b, max_len) for b in [64, 128, *range(256, max_len + 256, 256)]})
        # all keys up front: /health reads them from another thread, which is safe while none is added
        self.stats = collections.Counter(dict.fromkeys(
            ["steps", "tokens", "drafted", "accepted", "stop", "length", "cancelled", "error"], 0))
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- requests ---------------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, emit=None) -> Request:
        """Queue a request; raises ValueError (bad parameters, too long) or QueueFull."""
        params.validate()
        if not prompt:
            raise ValueError("empty prompt: at least one token is needed")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context length {self.max_len}")
        req = Request(prompt, params, emit)
        with self._cv:
            if self._stopping:
                raise QueueFull("the engine is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(req)
            self._cv.notify()
        return req

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.running > 0

    # ---- the loop ---------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None):
        """Stop taking requests; with drain, finish the running and waiting ones first, else cancel them."""
        with self._cv:
            self._stopping = True
            if not drain:
                for r in [*self.waiting, *self.slots]:
                    if r is not None:
                        r.cancel()
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self):
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self.busy or self._stopping)
                if self._stopping and not self.busy:
                    return
            try:
                self.step()
            except Exception as e:  # fail what is running, keep serving the rest
                traceback.print_exc()
                for r in [r for r in self.slots if r is not None]:
                    self._finish(r, "error", error=f"{type(e).__name__}: {e}")

    def run_until_done(self, max_steps: int = 1_000_000):
        """Drive the engine on the calling thread until nothing is waiting or running."""
        for _ in range(max_steps):
            if not self.busy:
                return
            self.step()
        raise RuntimeError(f"engine still busy after {max_steps} steps")

    @torch.no_grad()
    def step(self):
        if self.autocast is None:
            return self._step()
        with torch.autocast("cuda", dtype=self.autocast, cache_enabled=False):
            return self._step()

    def _step(self):
        for r in [r for r in self.slots if r is not None and r.cancelled]:
            self._finish(r, "cancelled")
        self._admit()
        running = [r for r in self.slots if r is not None]
        if running:
            (self._speculative_step if self.speculative else self._decode_step)(running)
        self.stats["steps"] += 1

    # ---- admission: batched prefill -----------------------------------------------------------------------------
    def _admit(self):
        free = [i for i, r in enumerate(self.slots) if r is None]
        batch: list[Request] = []
        with self._cv:
            budget = self.prefill_tokens
            while self.waiting and len(batch) < len(free):
                r = self.waiting[0]
                if batch and len(r.prompt) > budget:
                    break
                self.waiting.popleft()
                if r.cancelled:
                    r.finish_reason = "cancelled"
                    self.stats["cancelled"] += 1
                    r.emit(Event("", finish_reason="cancelled"))
                    continue
                batch.append(r)
                budget -= len(r.prompt)
        if not batch:
            return
        for r, slot in zip(batch, free):
            r.slot, self.slots[slot] = slot, r
            r.stream = TextStream(self.tokenizer, r.params.stop)
            r.generator = r.params.generator()
        lens = [len(r.prompt) for r in batch]
        scratch = LatentCache(self.model.cfg, len(batch), max(lens), dtype=self.dtype, device=self.device,
                              n_layers=self.cache.c_kv.shape[0])
        logits, out = prefill(self.model, scratch, [r.prompt for r in batch])
        first, first_logprobs = self._sample(Sampler([r.params for r in batch], self.device), logits,
                                             [r.generator for r in batch])
        if self.speculative:
            # MTP pairs (h_i, t_{i+1}) for every prompt position, the last one pairing with the sampled token
            nxt = torch.zeros(len(batch), max(lens), dtype=torch.long)
            for i, (r, t) in enumerate(zip(batch, first)):
                nxt[i, : lens[i]] = torch.tensor(r.prompt[1:] + [t])
            drafts = mtp_draft(self.model, scratch, out.hidden, nxt.to(self.device),
                               torch.tensor(lens, device=self.device)).tolist()
        slots = torch.tensor([r.slot for r in batch], device=self.device)
        for i, r in enumerate(batch):
            self.cache.c_kv[:, r.slot, : lens[i]] = scratch.c_kv[:, i, : lens[i]]
            self.cache.k_rope[:, r.slot, : lens[i]] = scratch.k_rope[:, i, : lens[i]]
        self.cache.lengths[slots] = torch.tensor(lens, device=self.device)
        for i, (r, t) in enumerate(zip(batch, first)):
            if self.speculative:
                r.draft = drafts[i]
            self._on_token(r, t, first_logprobs[i])

    # ---- decode ----------------------------------------------------------------------------------------------
    def _batch(self, running: list[Request], T: int):
        """Slots [0, n) for this step: n, the (n, T) input ids, the (n,) mask of running rows, a Sampler."""
        top = max(r.slot for r in running) + 1
        n = next(b for b in self.batch_buckets if b >= top) if self.graphs.enabled else top
        ids = torch.zeros(n, T, dtype=torch.long)
        active = torch.zeros(n, dtype=torch.long)
        params = [SamplingParams()] * n
        gens: list[torch.Generator | None] = [None] * n
        for r in running:
            ids[r.slot, 0] = r.next_token
            if T > 1:
                ids[r.slot, 1] = r.draft
            active[r.slot] = 1
            params[r.slot], gens[r.slot] = r.params, r.generator
        # cached: prompt + tokens - 1 (next_token is not fed yet); this step writes T more positions
        need = max(len(r.prompt) + len(r.tokens) for r in running) - 1 + T
        return n, need, ids.to(self.device), active.to(self.device), Sampler(params, self.device), gens

    def _run(self, kind: str, n: int, need: int, fn, inputs: list[torch.Tensor]):
        """fn(cache over slots [0, n), *inputs); through a CUDA graph per (kind, n, length bucket) on CUDA."""
        view = self.cache.narrow(n)
        if self.graphs.enabled:
            view.static_len = next(b for b in self.len_buckets if b >= need)
        return self.graphs((kind, n, view.static_len), lambda *x: fn(view, *x), inputs, [self.cache.lengths])

    def _decode_step(self, running: list[Request]):
        n, need, ids, active, sampler, gens = self._batch(running, 1)

        def decode(cache, ids, active):
            return self.forward(ids, cache=cache, seq_lens=active).logits[:, -1]

        logits = self._run("decode", n, need, decode, [ids, active])
        tokens, logprobs = self._sample(sampler, logits, gens)
        for r in running:
            self._on_token(r, tokens[r.slot], logprobs[r.slot])

    def _sample(self, sampler: Sampler, logits: torch.Tensor, gens) -> tuple[list[int], list[float | None]]:
        """Tokens drawn from logits (B, V), and their log-probabilities when this engine records them."""
        tokens = sampler.sample(logits, uniforms(gens))
        if not self.logprobs:
            return tokens.tolist(), [None] * len(tokens)
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
        return tokens.tolist(), logprobs.tolist()

    def _speculative_step(self, running: list[Request]):
        n, need, ids, active, sampler, gens = self._batch(running, 2)

        def forward(cache, ids, active):
            out = self.forward(ids, cache=cache, seq_lens=2 * active)
            return out.logits, out.hidden

        logits, hidden = self._run("verify", n, need, forward, [ids, active])
        u_accept, u_draw = uniforms(gens), uniforms(gens)
        accepted, first, second = verify(sampler, logits, ids[:, 1], u_accept, u_draw)
        self.cache.lengths[:n] -= active * ~accepted          # roll rejected drafts out of the cache
        accepted, first, second = accepted.tolist(), first.tolist(), second.tolist()
        counts = torch.zeros(n, dtype=torch.long)
        for r in running:
            s = r.slot
            self.stats["drafted"] += 1
            self.stats["accepted"] += accepted[s]
            for t in [first[s], second[s]] if accepted[s] else [first[s]]:
                if not self._on_token(r, t):
                    break
            else:  # still running: its new tokens' (hidden, next token) pairs go to the MTP cache
                counts[s] = 1 + accepted[s]
        if not counts.any():
            return
        pairs = torch.tensor([[f, s] for f, s in zip(first, second)], device=self.device)
        drafts = self._run("mtp", n, need, lambda cache, h, t, c: self.mtp_draft(self.model, cache, h, t, c),
                           [hidden, pairs, counts.to(self.device)]).tolist()
        for r in running:
            if r.slot is not None:
                r.draft = drafts[r.slot]

    # ---- per-token bookkeeping ---------------------------------------------------------------------------------
    def _on_token(self, r: Request, token: int, logprob: float | None = None) -> bool:
        """Record a sampled token; returns whether the request goes on."""
        if logprob is not None:
            r.logprobs.append(logprob)
        r.completion_tokens += 1
        self.stats["tokens"] += 1
        if token == self.tokenizer.eos_id and not r.params.ignore_eos:
            self._finish(r, "stop", [token])
            return False
        r.tokens.append(token)
        text = r.stream.push(token)
        if r.stream.stopped:
            self._finish(r, "stop", [token], text)
        elif len(r.tokens) >= r.params.max_tokens:
            self._finish(r, "length", [token], text)
        else:
            r.next_token = token
            r.emit(Event(text, [token]))
            return True
        return False

    def _finish(self, r: Request, reason: str, token_ids: list[int] = (), text: str = "",
                error: str | None = None):
        if r.stream is not None:
            text += r.stream.flush()
        r.finish_reason = reason
        self.stats[reason] += 1
        self.slots[r.slot] = None
        self.cache.lengths[r.slot] = 0
        r.slot = None
        r.emit(Event(text, list(token_ids), reason, error))
