"""Pool blocks <-> per-request mlx-lm KV caches.

A block's payload is one array ``[2, layers, kv_heads, block_size, head_dim]`` (K and V
of every attention layer) with its own buffer: a block never keeps a request's whole
KV buffer alive, so the pool's byte accounting is honest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache


@dataclass(eq=False)
class KVBlock:
    kv: mx.array

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


def blocks_from_cache(
    cache: Sequence[KVCache], first_block: int, end_block: int, block_size: int
) -> list[KVBlock]:
    """Copy blocks ``[first_block, end_block)`` out of a single-sequence cache."""
    if end_block <= first_block:
        return []
    a, b = first_block * block_size, end_block * block_size
    for c in cache:
        if c.offset < b:
            raise ValueError(f"cache holds {c.offset} tokens, blocks need {b}")
    # [2, L, H, n*bs, D]: only the new range is gathered, then cut into owned copies.
    span = mx.stack([
        mx.stack([c.keys[0, :, a:b, :] for c in cache]),
        mx.stack([c.values[0, :, a:b, :] for c in cache]),
    ])
    blocks = [
        # A slice along the token axis of [2, ...] is never row-contiguous, so
        # ``contiguous`` always copies it into a buffer of its own.
        KVBlock(mx.contiguous(span[:, :, :, i * block_size : (i + 1) * block_size, :]))
        for i in range(end_block - first_block)
    ]
    mx.eval([blk.kv for blk in blocks])
    return blocks


def cache_from_blocks(blocks: Sequence[Any], num_layers: int) -> list[KVCache]:
    """A fresh per-layer ``KVCache`` list holding the concatenation of ``blocks``."""
    caches = [KVCache() for _ in range(num_layers)]
    if not blocks:
        return caches
    kv = mx.concatenate([blk.kv for blk in blocks], axis=3)
    if kv.shape[1] != num_layers:
        raise ValueError(f"blocks have {kv.shape[1]} layers, the model {num_layers}")
    n_tokens = kv.shape[3]
    for layer, c in enumerate(caches):
        c.state = (kv[0, layer][None], kv[1, layer][None], n_tokens)
    return caches
