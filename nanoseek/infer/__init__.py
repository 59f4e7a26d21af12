"""Inference: the latent cache, sampling, batched `generate`, the continuous-batching engine, MTP speculation."""
from .cache import LatentCache
from .engine import Engine, Event, QueueFull, Request
from .generate import generate, generate_ids
from .sample import SamplingParams

__all__ = ["LatentCache", "Engine", "Event", "QueueFull", "Request", "generate", "generate_ids", "SamplingParams"]
