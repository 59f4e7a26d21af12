"""Sampling many completions at once through the inference engine (infer/engine.py): continuous batching over
the latent cache, CUDA graphs on GPU. GRPO's rollouts, distillation's teacher samples and generation-based
evaluation all come through here.

All requests are queued up front and the engine is driven on this thread until none is left, so slots freed
by short completions are refilled at once by waiting prompts. Each request draws from its own seeded generator:
a completion depends on its seed alone, never on which other requests shared its batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..infer.engine import Engine
from ..infer.sample import SamplingParams


@dataclass
class Completion:
    ids: list[int]          # sampled tokens, ending with eos when the model stopped by itself
    text: str               # decoded, special tokens (think tags) kept, eos not included
    finished: bool          # False: cut at max_tokens
    logprobs: list[float] = field(default_factory=list)   # the engine's log-probability (T = 1) of each of ids


@dataclass
class Timing:
    seconds: float = 0.0
    tokens: int = 0         # tokens sampled (eos included)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def make_engine(model, tokenizer, max_batch: int, max_len: int) -> Engine:
    """An engine for bulk sampling: every request may wait (no queue limit), and sampled tokens' log-probabilities
    are recorded (GRPO checks its rollouts against them). A policy in fp32 (trained with fp32 master weights)
    samples under bf16 autocast on CUDA, as its training forward runs: same numbers, and its MoE takes the bf16
    grouped GEMM, which CUDA graphs can capture (the fp32 fallback syncs on counts)."""
    fp32 = next(model.parameters()).dtype == torch.float32
    return Engine(model, tokenizer, max_batch=max_batch, max_len=max_len, max_waiting=1 << 30,
                  autocast=torch.bfloat16 if fp32 else None, logprobs=True)


def prompt_ids(tokenizer, messages: list[dict] | str) -> list[int]:
    """A chat prompt (messages, rendered with the generation prompt) or a raw text prompt, as token ids."""
    if isinstance(messages, str):
        return tokenizer.encode(messages)
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


@torch.no_grad()
def sample(engine: Engine, prompts: list[list[int]], n: int = 1, max_tokens: int = 64, temperature: float = 1.0,
           top_p: float = 1.0, seed: int = 0, timing: Timing | None = None) -> list[list[Completion]]:
    """n completions of each prompt (greedy when temperature is 0: then n copies of one are pointless, use 1).
    Request j of prompt i is seeded with seed + i·n + j."""
    too_long = [len(p) for p in prompts if len(p) + max_tokens > engine.max_len]
    if too_long:
        raise ValueError(f"a prompt of {max(too_long)} tokens + max_tokens {max_tokens} exceeds the engine's "
                         f"context {engine.max_len}")
    t0 = time.perf_counter()
    requests = [[engine.submit(p, SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                                 seed=seed + i * n + j), emit=_drop)
                 for j in range(n)] for i, p in enumerate(prompts)]
    engine.run_until_done()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    eos = engine.tokenizer.eos_id
    out = [[Completion(r.tokens + [eos] * (r.finish_reason == "stop"), engine.tokenizer.decode(r.tokens),
                       r.finish_reason == "stop", r.logprobs) for r in group] for group in requests]
    if timing is not None:
        timing.seconds += time.perf_counter() - t0
        timing.tokens += sum(r.completion_tokens for group in requests for r in group)
    return out


def _drop(event) -> None:
    """Requests here are read when finished; their streamed events are not needed."""
