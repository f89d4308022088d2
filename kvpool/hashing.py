"""Block keys: pure functions from (namespace, tokens) to chained xxh3-128 keys.

Kept apart from the pool's state (as in vLLM's ``kv_cache_utils``), so keys can be
computed anywhere, e.g. by the scheduler before it touches the pool.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import xxhash

BlockKey = bytes


def digest(data: bytes) -> BlockKey:
    """The one hash function of the pool. Tests monkeypatch it to force collisions."""
    return xxhash.xxh3_128_digest(data)


@dataclass(frozen=True)
class Namespace:
    """Who may share blocks: one model identity, and an optional tenant salt.

    Two namespaces that differ in any field never share a block, even if their keys
    collide, because the pool compares the namespace of every chain's first block.
    """

    model: str
    cache_salt: str | None = None

    def root_key(self) -> BlockKey:
        salt = "" if self.cache_salt is None else self.cache_salt
        # Lengths make the encoding unambiguous ("ab"+"c" differs from "a"+"bc").
        blob = f"blockserve-root\0{len(self.model)}:{self.model}\0{len(salt)}:{salt}\0"
        blob += "salted" if self.cache_salt is not None else "unsalted"
        return digest(blob.encode())


Tokens = Sequence[int] | np.ndarray | bytes


def hittable_blocks(n_tokens: int, block_size: int) -> int:
    """How many leading blocks of an ``n_tokens`` prompt a cache hit may cover: at least
    one prompt token is always computed (it yields the first logits), so a fully cached
    prompt still recomputes its last token. The one place this rule is written."""
    return max(n_tokens - 1, 0) // block_size


def token_bytes(tokens: Tokens) -> bytes:
    """Tokens as little-endian int32, the form that is hashed and stored per block.

    Bytes pass through unchanged, so a caller can convert a long prompt once and hand
    the result to several pool calls.
    """
    if isinstance(tokens, bytes):
        return tokens
    if isinstance(tokens, list):
        return struct.pack(f"<{len(tokens)}i", *tokens)  # faster than numpy for lists
    return np.asarray(tokens, dtype="<i4").tobytes()


def iter_chain_keys(
    namespace: Namespace,
    tokens: Tokens,
    block_size: int,
    extra: bytes = b"",
    start_block: int = 0,
    parent_key: BlockKey | None = None,
) -> Iterator[BlockKey]:
    """Keys of the full blocks of ``tokens``: key_i = H(key_{i-1} || tokens_i || extra).

    Lazy, so a lookup that misses early hashes no further. ``tokens`` may already be
    in ``token_bytes`` form. The partial tail block is never keyed. To resume a chain
    whose first ``start_block`` keys are known, pass the last of them as ``parent_key``.
    """
    raw = token_bytes(tokens)
    step = 4 * block_size
    parent = namespace.root_key() if parent_key is None else parent_key
    for start in range(start_block * step, len(raw) - step + 1, step):
        parent = digest(parent + raw[start : start + step] + extra)
        yield parent


def chain_keys(
    namespace: Namespace,
    tokens: Tokens,
    block_size: int,
    extra: bytes = b"",
) -> list[BlockKey]:
    """All full-block keys of ``tokens`` at once (see ``iter_chain_keys``)."""
    return list(iter_chain_keys(namespace, tokens, block_size, extra))
