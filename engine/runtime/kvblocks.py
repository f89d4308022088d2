"""Pool blocks <-> per-request mlx-lm caches.

Attention layers (``KVCache``) are rebuilt from per-token K/V: a block holds one array
``[2, kv_layers, kv_heads, block_size, head_dim]`` with its own buffer, so a block never
keeps a request's whole KV buffer alive and the pool's byte accounting is honest.

State layers (``ArraysCache`` for SSM / linear attention, ``RotatingKVCache`` for
sliding windows) can't be rebuilt from per-token K/V. At a block-aligned checkpoint the
block also carries a snapshot of those layers' caches taken at its end; a hit on such a
model must end on a block with a snapshot.

For the disk tier, ``KVBlockCodec`` turns a block into bytes (on the tier's writer
thread: it only reads evaluated arrays' buffers) and back (on a loader thread: into
numpy arrays, ``Stored``). A loaded block becomes MLX arrays on the engine thread, the
first time ``cache_from_blocks`` uses it, so no MLX work happens on other threads.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import mlx.core as mx
import numpy as np
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


@dataclass(eq=False)
class Stored:
    """An array read from disk, as numpy, until the engine thread makes it MLX. MLX
    dtypes numpy lacks (bfloat16) travel as same-width unsigned integers."""

    data: np.ndarray
    dtype: str  # the MLX dtype's name, e.g. "float16", "bfloat16"

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def to_mx(self) -> mx.array:
        a = mx.array(self.data)
        want = getattr(mx, "bool_" if self.dtype == "bool" else self.dtype)
        return a if a.dtype == want else a.view(want)


def _materialize(x: Any) -> Any:
    """``x`` with every ``Stored`` made an MLX array (engine thread only)."""
    if isinstance(x, Stored):
        return x.to_mx()
    if isinstance(x, (list, tuple)):
        return type(x)(_materialize(v) for v in x)
    return x


def _arrays(x: Any) -> list[mx.array]:
    if isinstance(x, (mx.array, Stored)):
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

    def materialize(self) -> None:
        """Turn arrays loaded from disk into MLX arrays, in place (engine thread)."""
        if isinstance(self.kv, Stored):
            self.kv = self.kv.to_mx()
        if self.snapshot is not None and any(
                isinstance(a, Stored) for a in _arrays([s for _, s in self.snapshot])):
            self.snapshot = [(cls, _materialize(st)) for cls, st in self.snapshot]


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
    for blk in blocks:
        blk.materialize()  # blocks loaded from disk arrive as numpy
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


# ---- the disk tier's codec ------------------------------------------------------------

_STATE_CLASSES = {cls.__name__: cls for cls in STATE_CACHES}
_CODEC_VERSION = 1


class KVBlockCodec:
    """``KVBlock`` <-> bytes for ``kvpool.DiskTier``: a JSON header (shapes, dtypes, the
    state layers' structure) and the arrays' raw bytes. ``decode`` refuses (ValueError)
    bytes that do not fit this model: another layer count, head shape or block size."""

    def __init__(self, layout: CacheLayout, block_size: int):
        self.layout = layout
        self.block_size = block_size

    def encode(self, blk: KVBlock) -> bytes:
        """Writer thread: reads the buffers of evaluated arrays, runs no MLX op."""
        bufs: list[bytes] = []

        def tree(x: Any) -> Any:
            if isinstance(x, (mx.array, Stored)):
                if isinstance(x, Stored):
                    raw, dtype, shape = x.data.tobytes(), x.dtype, list(x.data.shape)
                else:
                    m = memoryview(x)
                    if not m.c_contiguous:
                        raise ValueError("a block's array is not contiguous")
                    raw, dtype, shape = m.tobytes(), str(x.dtype).split(".")[-1], list(x.shape)
                bufs.append(raw)
                return {"a": len(bufs) - 1, "dtype": dtype, "shape": shape}
            if isinstance(x, (list, tuple)):
                return {"list" if isinstance(x, list) else "tuple": [tree(v) for v in x]}
            if x is None or isinstance(x, (int, float, bool)):
                return x
            raise ValueError(f"cannot store a {type(x).__name__} in a block")

        head = {
            "v": _CODEC_VERSION,
            "layers": [len(self.layout.kv_layers), len(self.layout.state_layers)],
            "block_size": self.block_size,
            "kv": None if blk.kv is None else tree(blk.kv),
            "needs_snapshot": blk.needs_snapshot,
            "snapshot": None if blk.snapshot is None else
            [[cls.__name__, tree(st)] for cls, st in blk.snapshot],
            "sizes": [],
        }
        head["sizes"] = [len(b) for b in bufs]
        meta = json.dumps(head, separators=(",", ":")).encode()
        return b"".join([struct.pack("<I", len(meta)), meta, *bufs])

    def decode(self, data: bytes | memoryview) -> KVBlock:
        """Loader thread: numpy only, arrays are views of ``data`` (no copy). Raises
        ValueError on anything foreign."""
        try:
            (n,) = struct.unpack_from("<I", data)
            head = json.loads(bytes(data[4 : 4 + n]))
            if head["v"] != _CODEC_VERSION:
                raise ValueError(f"codec version {head['v']}")
            if head["layers"] != [len(self.layout.kv_layers), len(self.layout.state_layers)] \
                    or head["block_size"] != self.block_size:
                raise ValueError("a block of another model")
            offsets, pos = [], 4 + n
            for size in head["sizes"]:
                offsets.append((pos, pos + size))
                pos += size
            if pos != len(data):
                raise ValueError("payload size mismatch")

            def untree(x: Any) -> Any:
                if isinstance(x, dict):
                    if "a" in x:
                        a, b = offsets[x["a"]]
                        dt = np.dtype(_NP_DTYPES[x["dtype"]])
                        arr = np.frombuffer(data, dt, (b - a) // dt.itemsize, a)
                        return Stored(arr.reshape(x["shape"]), x["dtype"])
                    if "list" in x:
                        return [untree(v) for v in x["list"]]
                    return tuple(untree(v) for v in x["tuple"])
                return x

            kv = None if head["kv"] is None else untree(head["kv"])
            if kv is not None:
                shape = kv.data.shape
                if len(shape) != 5 or shape[0] != 2 or shape[1] != len(self.layout.kv_layers) \
                        or shape[3] != self.block_size:
                    raise ValueError(f"K/V of shape {shape} do not fit the model")
            snap = None
            if head["snapshot"] is not None:
                if len(head["snapshot"]) != len(self.layout.state_layers):
                    raise ValueError("a snapshot of another model")
                snap = [(_STATE_CLASSES[name], untree(st)) for name, st in head["snapshot"]]
            return KVBlock(kv, snap, bool(head["needs_snapshot"]))
        except (KeyError, TypeError, IndexError, AttributeError, struct.error,
                json.JSONDecodeError) as e:
            raise ValueError(f"not a block of this model: {e!r}") from e


# numpy has no bfloat16: its bytes travel as uint16 (Stored.to_mx views them back).
_NP_DTYPES = {"bool": "bool", "uint8": "uint8", "uint16": "uint16", "uint32": "uint32",
              "uint64": "uint64", "int8": "int8", "int16": "int16", "int32": "int32",
              "int64": "int64", "float16": "float16", "float32": "float32",
              "float64": "float64", "bfloat16": "uint16"}
