"""The latent KV cache of absorbed MLA: per layer and token only c_kv (kv_lora_rank) and k_rope
(qk_rope_head_dim) are kept: 576 values at V3's shapes against 128·(192+128) = 40,960 for per-head K/V.

Rows of a batch advance independently (continuous batching): `lengths[b]` tokens of row b are cached, new
tokens of a forward go to positions lengths[b] … lengths[b]+T-1 and each query sees keys at positions ≤ its own.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig


class LatentCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu",
                 n_layers: int | None = None):
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers if n_layers is None else n_layers
        self.max_len = max_len
        self.c_kv = torch.zeros(n_layers, batch_size, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(n_layers, batch_size, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._rows = torch.arange(batch_size, device=device)[:, None]
        self._pos = self._used = None
        # attend over exactly this many positions instead of up to the longest row: static shapes and no
        # host sync in begin(), as CUDA-graph capture needs; the caller then keeps rows within it
        self.static_len: int | None = None

    def narrow(self, n: int) -> "LatentCache":
        """A cache over rows 0..n-1 sharing this one's storage and lengths (a decode step over the occupied
        slots only)."""
        view = object.__new__(LatentCache)
        view.max_len, view.static_len = self.max_len, None
        view.c_kv, view.k_rope, view.lengths = self.c_kv[:, :n], self.k_rope[:, :n], self.lengths[:n]
        view._rows, view._pos, view._used = self._rows[:n], None, None
        return view

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
        """Per token over all main layers."""
        return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes

    def begin(self, T: int):
        """Positions (B, T) of the incoming tokens and the (B, T, S) mask of keys each may attend to."""
        self._pos = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)
        self._used = self.static_len or int(self._pos.max()) + 1
        if self._used > self.max_len:
            raise ValueError(f"sequence length {self._used} exceeds the cache's max_len {self.max_len}")
        keys = torch.arange(self._used, device=self.lengths.device)
        return self._pos, keys[None, None, :] <= self._pos[..., None]

    def update(self, layer: int, c_kv: torch.Tensor, k_rope: torch.Tensor):
        """Store this forward's latents for `layer` and return the layer's cache up to the last used position."""
        self.c_kv[layer][self._rows, self._pos] = c_kv.to(self.c_kv.dtype)
        self.k_rope[layer][self._rows, self._pos] = k_rope.to(self.k_rope.dtype)
        return self.c_kv[layer, :, : self._used], self.k_rope[layer, :, : self._used]

    def advance(self, n):
        """Mark n new tokens (int, or a (B,) tensor for rows with fewer valid tokens) as cached."""
        self.lengths += n

    def reset(self, rows=None):
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0
