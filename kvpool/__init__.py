"""blockserve's paged KV prefix cache: block keys, refcounts, tiers, eviction, budget.

Pure bookkeeping: no MLX, no asyncio. The KV payload of a block is opaque (anything
with ``nbytes``); the engine makes it and reads it back.
"""

from blockserve.kvpool.disk import Codec, DiskStats, DiskTier
from blockserve.kvpool.hashing import (
    BlockKey,
    Namespace,
    chain_keys,
    hittable_blocks,
    iter_chain_keys,
    token_bytes,
)
from blockserve.kvpool.pool import (
    TIER_CONVERSATION,
    TIER_GENERATED,
    TIER_SYSTEM,
    TIERS,
    Block,
    BlockPool,
    InsertResult,
    LowerTier,
    Payload,
    PoolStats,
    PrefixHit,
    Scope,
    ScopeFn,
)
from blockserve.kvpool.prefix import Chain, PrefixCache

__all__ = [
    "Chain",
    "Codec",
    "DiskStats",
    "DiskTier",
    "LowerTier",
    "PrefixCache",
    "Scope",
    "ScopeFn",
    "hittable_blocks",
    "TIER_CONVERSATION",
    "TIER_GENERATED",
    "TIER_SYSTEM",
    "TIERS",
    "Block",
    "BlockKey",
    "BlockPool",
    "InsertResult",
    "Namespace",
    "Payload",
    "PoolStats",
    "PrefixHit",
    "chain_keys",
    "iter_chain_keys",
    "token_bytes",
]
