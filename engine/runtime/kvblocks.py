"""Pool blocks <-> per-request mlx-lm caches.

Attention layers (``KVCache``) are rebuilt from per-token K/V: a block holds one array
``[2, kv_layers, kv_heads, block_size, head_dim]`` with its own buffer, so a block never
keeps a request's whole KV buffer alive and the pool's byte accounting is honest.

State layers (``ArraysCache`` for SSM / linear attention, ``RotatingKVCache`` for
sliding windows) can't be rebuilt from per-token K/V. At a block-aligned checkpoint the
block also carries a snapshot of those layers' caches taken at its end; a hit on such a
model must end on a block with a snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

STATE_CACHES = (ArraysCache, RotatingKVCache)


@dataclass(frozen=True)
class CacheLayout:
    """Which layers are per-token K/V and which are state, from a fresh cache list."""

    kv_layers: tuple[int, ...]
    state_layers: tuple[int, ...]

    @classmethod
    def of(cls, caches: Sequence[Any]) -> CacheLayout:
        kv, state, other = [], [], []
        for i, c in enumerate(caches):
            if type(c) is KVCache:
                kv.append(i)
            elif type(c) in STATE_CACHES:
                state.append(i)
            else:
                other.append(type(c).__name__)
        if other:
            raise TypeError(f"unsupported cache types {sorted(set(other))}")
        return cls(tuple(kv), tuple(state))

    @property
    def needs_snapshots(self) -> bool:
        return bool(self.state_layers)


def _own(x: Any) -> Any:
    """A copy of a cache state with arrays in buffers of their own."""
    if isinstance(x, mx.array):
        return mx.contiguous(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_own(v) for v in x)
    return x


def _arrays(x: Any) -> list[mx.array]:
    if isinstance(x, mx.array):
        return [x]
    if isinstance(x, (list, tuple)):
        return [a for v in x for a in _arrays(v)]
    return []


@dataclass(eq=False)
class KVBlock:
    """One block's payload for the pool: K/V of its tokens, and at a checkpoint of a
    model with state layers, their snapshot."""

    kv: mx.array | None  # None for a model with no attention layers
    snapshot: list[tuple[type, Any]] | None = None  # (cache class, state) per state layer
    needs_snapshot: bool = False  # the model has state layers
    nbytes: int = field(init=False)

    def __post_init__(self):
        arrays = ([self.kv] if self.kv is not None else []) + _arrays(
            [s for _, s in self.snapshot or []])
        self.nbytes = sum(a.nbytes for a in arrays)

    @property
    def has_snapshot(self) -> bool:
        return self.snapshot is not None

    @property
    def resumable(self) -> bool:
        """Whether a cached prefix may end here (the pool reads this)."""
        return self.has_snapshot or not self.needs_snapshot


def blocks_from_cache(
    cache: Sequence[Any], first_block: int, end_block: int, block_size: int,
    layout: CacheLayout, snapshot: bool = False,
) -> list[KVBlock]:
    """Copy blocks ``[first_block, end_block)`` out of a single-sequence cache; with
    ``snapshot`` (the cache holds exactly ``end_block`` blocks of tokens) the last block
    also carries the state layers' snapshot."""
    if end_block <= first_block:
        return []
    a, b = first_block * block_size, end_block * block_size
    kv_caches = [cache[i] for i in layout.kv_layers]
    for c in kv_caches:
        if c.offset < b:
            raise ValueError(f"cache holds {c.offset} tokens, blocks need {b}")
    span = None
    if kv_caches:
        # [2, L, H, n*bs, D]: only the new range is gathered, then cut into owned copies.
        span = mx.stack([
            mx.stack([c.keys[0, :, a:b, :] for c in kv_caches]),
            mx.stack([c.values[0, :, a:b, :] for c in kv_caches]),
        ])
    blocks = [
        # A slice along the token axis of [2, ...] is never row-contiguous, so
        # ``contiguous`` always copies it into a buffer of its own.
        KVBlock(None if span is None else
                mx.contiguous(span[:, :, :, i * block_size : (i + 1) * block_size, :]),
                needs_snapshot=layout.needs_snapshots)
        for i in range(end_block - first_block)
    ]
    if snapshot and layout.state_layers:
        last = blocks[-1]
        last.snapshot = [(type(cache[i]), _own(cache[i].state)) for i in layout.state_layers]
        last.__post_init__()  # count the snapshot's bytes
    mx.eval([a for blk in blocks for a in _arrays([blk.kv, [s for _, s in blk.snapshot or []]])])
    return blocks


def cache_from_blocks(blocks: Sequence[KVBlock], fresh: list[Any],
                      layout: CacheLayout) -> list[Any]:
    """Fill ``fresh`` (the model's empty caches) with the concatenation of ``blocks``."""
    if not blocks:
        return fresh
    n_tokens = 0
    if layout.kv_layers:
        kv = mx.concatenate([blk.kv for blk in blocks], axis=3)
        if kv.shape[1] != len(layout.kv_layers):
            raise ValueError(f"blocks have {kv.shape[1]} K/V layers, the model "
                             f"{len(layout.kv_layers)}")
        n_tokens = kv.shape[3]
        for j, layer in enumerate(layout.kv_layers):
            fresh[layer].state = (kv[0, j][None], kv[1, j][None], n_tokens)
    if layout.state_layers:
        snap = blocks[-1].snapshot
        if snap is None:
            raise ValueError("a prefix for a model with state layers must end on a "
                             "block with a snapshot")
        for layer, (cls, state) in zip(layout.state_layers, snap):
            # New containers, same (read-only) arrays: BatchGenerator's merge copies them.
            fresh[layer] = cls.from_state(
                tuple(list(v) if isinstance(v, list) else v for v in state))
    return fresh
