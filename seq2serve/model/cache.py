"""Keys and values kept across decode steps.

| tensor                                  | shape          | lifetime                  |
|-----------------------------------------|----------------|---------------------------|
| ``KVCache.layers[i].key`` / ``.value``  | (B, H, P, D)   | grows by T every decode   |
| cross-attention ``KV`` (from cross_kv)  | (B, H, S, D)   | computed once per request |

The decoder's self-attention appends each step's new keys/values (``update``), so a step
costs one token's projections instead of recomputing the whole prefix. Cross-attention
keys/values depend only on the encoder output, so the model computes them once and passes
them in; they never live in this cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from seq2serve.config import ModelConfig


@dataclass
class KV:
    key: Tensor  # (B, H, length, D)
    value: Tensor  # (B, H, length, D)


@dataclass
class KVCache:
    layers: list[KV]

    @classmethod
    def empty(
        cls,
        cfg: ModelConfig,
        batch_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        shape = (batch_size, cfg.n_heads, 0, cfg.head_dim)
        return cls(
            [
                KV(
                    torch.zeros(shape, device=device, dtype=dtype),
                    torch.zeros(shape, device=device, dtype=dtype),
                )
                for _ in range(cfg.n_decoder_layers)
            ]
        )

    @property
    def length(self) -> int:
        """P: the number of cached positions (the same for every row; padding fills holes)."""
        return self.layers[0].key.shape[2]

    def update(self, layer: int, new: KV) -> KV:
        """Append T new positions to ``layer`` and return its whole K/V, (B, H, P + T, D)."""
        past = self.layers[layer]
        merged = KV(
            torch.cat([past.key, new.key], dim=2), torch.cat([past.value, new.value], dim=2)
        )
        self.layers[layer] = merged
        return merged

    def select(self, rows: Tensor) -> KVCache:
        """Keep/reorder batch rows (beam search reorders; finished sequences leave)."""
        return KVCache([KV(kv.key[rows], kv.value[rows]) for kv in self.layers])
