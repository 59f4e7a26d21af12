"""The simple batched API: prompts in, completions out, one static batch over one LatentCache.

Prompts of different lengths are right-padded and prefilled in one forward; `seq_lens` advances each row's
cache by its own length, so the padding is never attended to (later tokens overwrite it). Then one token per
row per step until every row has finished. The engine (engine.py) does the same with requests joining and
leaving between steps; this file is the reference it is tested against.
"""
from __future__ import annotations

import torch

from .cache import LatentCache
from .sample import Sampler, SamplingParams, uniforms
from .text import TextStream


@torch.no_grad()
def prefill(model, cache: LatentCache, prompts: list[list[int]]):
    """Append right-padded prompts after each row's cached prefix; returns the logits (B, V) at each prompt's
    last position and the forward's Output (hidden states of every position, for MTP drafting)."""
    device = cache.lengths.device
    lens = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, device=device)
    out = model(ids, cache=cache, seq_lens=lens, logits=False)
    # the head only where a token is sampled: (B, T, V) logits of a long prompt would dwarf the rest
    last = out.hidden[torch.arange(len(prompts), device=device), lens - 1]
    return model.lm_head(last), out


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], params: list[SamplingParams], eos_id: int | None = None,
                 on_token=None) -> list[list[int]]:
    """Token-level generation. on_token(row, token) -> bool may end a row early (e.g. a stop string)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: at least one token is needed")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B = len(prompts)
    cache = LatentCache(model.cfg, B, max(len(p) + q.max_tokens for p, q in zip(prompts, params)),
                        dtype=dtype, device=device)
    sampler = Sampler(params, device)
    gens = [q.generator() for q in params]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    logits, _ = prefill(model, cache, prompts)
    while True:
        tokens = sampler.sample(logits, uniforms(gens)).tolist()
        for b, t in enumerate(tokens):
            if done[b]:
                continue
            if t == eos_id and not params[b].ignore_eos:
                done[b] = True
                continue
            out[b].append(t)
            stop = on_token is not None and on_token(b, t)
            done[b] = stop or len(out[b]) >= params[b].max_tokens
        if all(done):
            return out
        # finished rows still ride along (their cache does not advance), so the batch shape stays fixed
        active = torch.tensor([not d for d in done], device=device)
        x = torch.tensor(tokens, device=device)[:, None]
        logits = model(x, cache=cache, seq_lens=active.long()).logits[:, -1]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: list[str] | None = None) -> list[str]:
    """Completions (without the prompts) of a batch of prompts; greedy when temperature == 0. Prompt i draws
    from a generator seeded with seed + i. Ends at EOS, a stop string (not included) or max_new_tokens."""
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed + i, stop=list(stop or [])) for i in range(len(prompts))]
    for p in params:
        p.validate()
    streams = [TextStream(tokenizer, stop) for _ in prompts]

    def on_token(row, token):
        streams[row].push(token)
        return streams[row].stopped

    generate_ids(model, [tokenizer.encode(p) for p in prompts], params, tokenizer.eos_id, on_token)
    for s in streams:
        s.flush()
    return [s.text for s in streams]
