"""`nanoseek serve`: load a checkpoint, start the engine, serve the API with uvicorn until Ctrl-C.

On Ctrl-C uvicorn stops accepting connections and waits (up to drain_timeout) for the open ones to finish;
only then does the lifespan stop the engine, so streams in flight complete.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from ..infer.engine import Engine
from ..infer.load import load
from .app import create_app
from .schemas import Limits


def serve(ckpt: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          tokenizer: str | None = None, device: str = "auto", dtype: str = "auto", max_batch: int = 16,
          max_len: int | None = None, max_waiting: int = 256, max_tokens: int | None = None, max_n: int = 8,
          max_body_bytes: int = 1 << 20, speculative: bool = False, cuda_graphs: bool = True, compile: bool = False,
          model_name: str | None = None, drain_timeout: float = 60.0, log_level: str = "info"):
    import uvicorn

    model, tok = load(ckpt, tokenizer, device, dtype)
    max_len = max_len or min(model.cfg.max_position_embeddings, 4096)
    engine = Engine(model, tok, max_batch=max_batch, max_len=max_len, max_waiting=max_waiting,
                    speculative=speculative, cuda_graphs=cuda_graphs, compile=compile)
    limits = Limits(context=max_len, max_tokens=min(max_tokens or max_len, max_len - 1), max_n=max_n,
                    max_body_bytes=max_body_bytes)
    name = model_name or os.path.basename(os.path.normpath(ckpt))
    log = logging.getLogger("uvicorn.error")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        log.info(f"nanoseek: serving {name!r} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
                 f"{engine.device}, {engine.dtype}) with {max_batch} slots of {max_len} tokens"
                 f"{', MTP speculative decoding' if speculative else ''}")
        yield
        await asyncio.to_thread(engine.stop, drain=True)
        if engine.stats["drafted"]:
            log.info(f"nanoseek: MTP acceptance {engine.stats['accepted'] / engine.stats['drafted']:.1%}")

    app = create_app(engine, tok, name, limits, api_key=api_key, lifespan=lifespan)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                  timeout_graceful_shutdown=drain_timeout)).run()
