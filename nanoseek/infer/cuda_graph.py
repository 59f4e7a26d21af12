"""CUDA graphs for the decode-side forwards: one graph per static shape, captured on first use.

A decode step at small batch is a few hundred tiny kernels; launching them one by one from Python costs more
than running them. A graph records the launches once and replays them with one call. Replay needs every
shape fixed, so the engine rounds the batch up to a bucket of slots and attends over a bucket of cache
positions (LatentCache.static_len), and each (kind, batch bucket, length bucket) key gets its own graph, all
drawing from one memory pool (they never run concurrently).

Inputs are copied into the graph's own static tensors before each replay, and the outputs are the graph's
static tensors: read them before the next replay of the same graph.
"""
from __future__ import annotations

import warnings

import torch


class CUDAGraphs:
    def __init__(self, enabled: bool, warmup: int = 2):
        self.enabled = enabled and torch.cuda.is_available()
        self.warmup = warmup
        self.graphs: dict[tuple, tuple[list[torch.Tensor], object, torch.cuda.CUDAGraph]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None

    def __call__(self, key: tuple, fn, inputs: list[torch.Tensor], state: list[torch.Tensor]):
        """fn(*inputs) through the graph for `key`. `state`: tensors fn mutates in place (the cache lengths);
        they are restored after the warm-up runs so that capturing has no effect of its own."""
        if not self.enabled:
            return fn(*inputs)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(fn, inputs, state)
            except RuntimeError as e:  # an op that syncs with the host or is not capturable: stay eager
                warnings.warn(f"CUDA graph capture failed, decoding eagerly from now on: {e}")
                self.enabled = False
                self.graphs.clear()
                return fn(*inputs)
        static_in, out, graph = self.graphs[key]
        for s, x in zip(static_in, inputs):
            s.copy_(x)
        graph.replay()
        return out

    def _capture(self, fn, inputs, state):
        static_in = [x.clone() for x in inputs]
        saved = [s.clone() for s in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (allocator, lazy inits) outside the capture
            for _ in range(self.warmup):
                fn(*static_in)
        torch.cuda.current_stream().wait_stream(stream)
        for s, v in zip(state, saved):
            s.copy_(v)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn(*static_in)
        return static_in, out, graph
