"""The block pool: refcounted, deduplicated, byte-budgeted KV blocks keyed by prefix.

Threading: the pool is plain Python with no locks. One thread owns it, in blockserve
the scheduler's asyncio event loop. The engine thread only ever receives payloads that
are pinned, and hands new payloads back through the scheduler.

Eviction order (documented here because tests pin it down):
  1. Only *evictable* blocks go: refcount 0 and no cached children (a leaf). Evicting an
     inner block would orphan its children, which could then never be hit.
  2. Lowest tier first (0 generated tail, 1 conversation checkpoint, 2 system prompt).
  3. Within a tier, least recently used first. Lookups and inserts count as use.
A parent becomes evictable once its last child is gone, keeping its own tier and age.

Below the pool an optional ``LowerTier`` (the disk tier) is told of every evicted block
(write-behind) and of every block stored or raised to a checkpoint tier (write-through).
It must not block: the disk tier only queues the block for its writer thread.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from blockserve.kvpool.hashing import (
    BlockKey,
    Namespace,
    Tokens,
    hittable_blocks,
    iter_chain_keys,
    token_bytes,
)

TIER_GENERATED = 0
TIER_CONVERSATION = 1
TIER_SYSTEM = 2
TIERS = (TIER_GENERATED, TIER_CONVERSATION, TIER_SYSTEM)
MAX_COUNTED_NAMESPACES = 4096  # per-namespace lookup counters kept for scoped stats


class Payload(Protocol):
    """What the pool stores per block: opaque to it, apart from its size and, optionally,
    ``resumable`` (default True): whether a cached prefix may end on this block. Models
    with state layers (SSM, sliding window) can resume only where a block carries a
    snapshot of them; the engine says which of its payloads do."""

    @property
    def nbytes(self) -> int: ...


class LowerTier(Protocol):
    """A slower tier under the pool (the disk tier). Both calls must return at once."""

    def evicted(self, block: Block) -> None:
        """``block`` has left RAM; keep it if worth it (write-behind)."""

    def checkpointed(self, block: Block) -> None:
        """``block`` now has a checkpoint tier (>= 1); keep a copy now (write-through)."""


# Which namespaces an admin operation (a scoped flush or stats) covers; None: all.
ScopeFn = Callable[[Namespace], bool]


@dataclass(frozen=True)
class Scope:
    """A ``ScopeFn`` as data: one model, and/or the cache ``salt`` and the salts nested
    inside it (a request's own salt follows its tenant's after a NUL, as the server
    nests them). No fields: every namespace."""

    model: str | None = None
    salt: str | None = None

    def __call__(self, ns: Namespace) -> bool:
        if self.model is not None and ns.model != self.model:
            return False
        if self.salt is not None:
            own = ns.cache_salt
            return own is not None and (own == self.salt or own.startswith(self.salt + "\0"))
        return True


def _resumable(payload: Payload) -> bool:
    return bool(getattr(payload, "resumable", True))


@dataclass(eq=False, slots=True)
class Block:
    """One cached block of ``block_size`` tokens and the KV payload computed for them."""

    key: BlockKey
    parent: Block | None
    namespace: Namespace
    token_bytes: bytes
    payload: Any
    nbytes: int
    tier: int
    last_used: int
    resumable: bool = True  # a hit may end on this block (see ``Payload``)
    refcount: int = 0
    children: int = 0

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(np.frombuffer(self.token_bytes, dtype="<i4").tolist())

    @property
    def evictable(self) -> bool:
        return self.refcount == 0 and self.children == 0


@dataclass
class PrefixHit:
    """The longest cached chain for a prompt. If pinned, the caller must release it."""

    blocks: list[Block]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * self.block_size

    @property
    def payloads(self) -> list[Any]:
        return [b.payload for b in self.blocks]


@dataclass
class InsertResult:
    new_keys: list[BlockKey]
    deduplicated: int
    refused: int
    last: Block | None = None  # the chain's last block, stored or deduplicated


@dataclass
class PoolStats:
    """Counters (monotonic, across resets too) and gauges; ``BlockPool.stats()`` gives a
    snapshot. The pool keeps its counters in one of these and fills the gauges on demand."""

    block_size: int
    budget_bytes: int
    lookups: int = 0
    queried_tokens: int = 0
    hit_tokens: int = 0
    inserted_blocks: int = 0
    deduplicated_blocks: int = 0
    refused_blocks: int = 0
    collisions: int = 0
    evictions: dict[int, int] = field(default_factory=lambda: {t: 0 for t in TIERS})
    blocks_pinned: int = 0
    blocks_cached: int = 0
    bytes_pinned: int = 0
    bytes_cached: int = 0

    @property
    def blocks_stored(self) -> int:
        return self.blocks_pinned + self.blocks_cached

    @property
    def bytes_stored(self) -> int:
        return self.bytes_pinned + self.bytes_cached

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def _verifies(b: Block, parent: Block | None, ns: Namespace, chunk: bytes) -> bool:
    """A hash hit counts only if tokens, parent and namespace all agree."""
    return b.token_bytes == chunk and b.parent is parent and b.namespace == ns


class BlockPool:
    """Refcounted, deduplicated KV blocks under a byte budget (see the module doc)."""

    def __init__(self, block_size: int, budget_bytes: int, lower: LowerTier | None = None):
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.block_size = block_size
        self.budget_bytes = budget_bytes
        self._blocks: dict[BlockKey, Block] = {}
        # Lazy heap of (tier, last_used, seq, block); stale entries are skipped on pop.
        self._evict_heap: list[tuple[int, int, int, Block]] = []
        self._seq = 0
        self._clock = 0
        self._bytes = 0
        self._pinned_blocks = 0
        self._pinned_bytes = 0
        self._counters = PoolStats(block_size, budget_bytes)
        # Per-namespace query/hit counters, for scoped stats (a tenant sees its own).
        # Salts come from requests, so the table is bounded: least recently counted
        # namespaces leave first (their scoped counters restart from zero).
        self._ns_counters: OrderedDict[Namespace, list[int]] = OrderedDict()
        self.lower = lower

    # ---- queries -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._blocks

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def pinned_bytes(self) -> int:
        """Bytes of blocks in use by requests: no eviction can free them."""
        return self._pinned_bytes

    def blocks(self) -> list[Block]:
        return list(self._blocks.values())

    def cached_prefix_blocks(self, namespace: Namespace, tokens: Tokens,
                             keys: Sequence[BlockKey] | None = None,
                             max_blocks: int | None = None) -> int:
        """How many leading blocks are cached now (a hit may end earlier, on a
        resumable block), with no side effects."""
        return len(self._match(namespace, token_bytes(tokens), keys, max_blocks))

    def get(self, key: BlockKey) -> Block | None:
        """The stored block under ``key``, unverified (the caller checks its tokens)."""
        return self._blocks.get(key)

    def lookup(self, namespace: Namespace, tokens: Tokens, pin: bool = True,
               keys: Sequence[BlockKey] | None = None, max_blocks: int | None = None,
               record: bool = True) -> PrefixHit:
        """The longest verified chain of cached blocks, at most ``max_blocks`` long
        (default: ``hittable_blocks``), that ends on a resumable block.

        With ``pin`` every returned block gets refcount +1; ``release`` undoes it.
        ``keys``, the prompt's block keys computed once by the caller (as vLLM passes
        ``block_hashes``), spares hashing the prompt again. ``record`` counts the
        lookup in the stats (the prefix cache re-pins loaded blocks without it).
        """
        raw = token_bytes(tokens)
        blocks = self._match(namespace, raw, keys, max_blocks)
        while blocks and not blocks[-1].resumable:
            blocks.pop()
        if record:
            self._counters.lookups += 1
            self._counters.queried_tokens += len(raw) // 4
            self._counters.hit_tokens += len(blocks) * self.block_size
            ns = self._ns_counters.get(namespace)
            if ns is None:
                ns = self._ns_counters[namespace] = [0, 0, 0]
                if len(self._ns_counters) > MAX_COUNTED_NAMESPACES:
                    self._ns_counters.popitem(last=False)
            else:
                self._ns_counters.move_to_end(namespace)
            ns[0] += 1
            ns[1] += len(raw) // 4
            ns[2] += len(blocks) * self.block_size
        self._clock += 1
        for b in blocks:
            if pin:
                self._incref(b)
            b.last_used = self._clock
        if blocks and not pin:
            self._push_if_evictable(blocks[-1])  # only a chain's last block can be a leaf
        return PrefixHit(blocks, self.block_size)

    def _match(self, namespace: Namespace, raw: bytes,
               keys: Sequence[BlockKey] | None = None,
               max_blocks: int | None = None) -> list[Block]:
        step = 4 * self.block_size
        if max_blocks is None:
            max_blocks = hittable_blocks(len(raw) // 4, self.block_size)
        raw = raw[: max_blocks * step]
        chain: list[Block] = []
        parent: Block | None = None
        get = self._blocks.get
        for i, key in enumerate(self._keys(namespace, raw, keys)):
            b = get(key)
            if b is None:
                break
            if not _verifies(b, parent, namespace, raw[i * step : (i + 1) * step]):
                self._counters.collisions += 1
                break
            chain.append(b)
            parent = b
        return chain

    def _keys(self, namespace: Namespace, raw: bytes, known: Sequence[BlockKey] | None,
              start_block: int = 0, parent_key: BlockKey | None = None) -> Iterator[BlockKey]:
        """Keys of the full blocks of ``raw`` from ``start_block`` on: the caller's
        ``known`` keys where it has them, hashed from there on (lazily)."""
        n_blocks = len(raw) // (4 * self.block_size)
        known = known or ()
        i = start_block
        while i < min(len(known), n_blocks):
            yield known[i]
            parent_key = known[i]
            i += 1
        yield from iter_chain_keys(namespace, raw, self.block_size, start_block=i,
                                   parent_key=parent_key)

    # ---- pins ----------------------------------------------------------------

    def release(self, blocks: Sequence[Block]) -> None:
        for b in blocks:
            if b.refcount <= 0:
                raise ValueError("release of a block that is not pinned")
            b.refcount -= 1
            if b.refcount == 0:
                self._pinned_blocks -= 1
                self._pinned_bytes -= b.nbytes
                self._push_if_evictable(b)
        if self._bytes > self.budget_bytes:
            self._make_room(0)  # pins had held the pool over budget

    def _incref(self, b: Block) -> None:
        if b.refcount == 0:
            self._pinned_blocks += 1
            self._pinned_bytes += b.nbytes
        b.refcount += 1

    # ---- insert --------------------------------------------------------------

    def insert(
        self,
        namespace: Namespace,
        tokens: Tokens,
        payloads: Sequence[Payload] | Callable[[int], Payload | None],
        tier: int = TIER_GENERATED,
        pinned_prefix: Sequence[Block] = (),
        keys: Sequence[BlockKey] | None = None,
    ) -> InsertResult:
        """Store the full blocks of ``tokens`` not yet present; keep (dedup) the rest.

        ``payloads`` gives block i's payload, as a sequence or as a callable so that
        the caller builds payloads only for blocks that are really new; a payload of
        None (the caller no longer has that block) ends the insert there. Blocks that
        don't fit in the budget are refused (with the rest of the chain); this never
        raises and never evicts a pinned block. ``pinned_prefix``, the caller's pinned
        hit for these tokens, spares hashing and verifying that prefix again; ``keys``
        (the first block keys of ``tokens``, computed once by the caller) spare hashing
        those. A present block that is not resumable takes a resumable new payload, so
        later hits may end on it.
        """
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}")
        raw = token_bytes(tokens)
        step = 4 * self.block_size
        n_blocks = len(raw) // step
        if not callable(payloads):
            n_blocks = min(n_blocks, len(payloads))
            get_payload: Callable[[int], Payload | None] = payloads.__getitem__
        else:
            get_payload = payloads
        raw = raw[: n_blocks * step]
        result = InsertResult([], 0, 0)
        self._clock += 1
        parent: Block | None = None
        skip = min(len(pinned_prefix), n_blocks)
        raised: list[Block] = []  # blocks whose checkpoint tier is new: written through
        for b in pinned_prefix[:skip]:
            if b.refcount <= 0 or b.parent is not parent or b.namespace != namespace:
                raise ValueError("pinned_prefix is not a pinned chain of this namespace")
            if tier > b.tier:
                b.tier = tier
                raised.append(b)
            b.last_used = self._clock
            parent = b
        result.deduplicated = skip
        chain = self._keys(namespace, raw, keys, start_block=skip,
                           parent_key=None if parent is None else parent.key)
        for i, key in enumerate(chain, start=skip):
            chunk = raw[i * step : (i + 1) * step]
            b = self._blocks.get(key)
            if b is not None:
                if not _verifies(b, parent, namespace, chunk):
                    # A collision: the key is taken by other content. Keep the
                    # resident block and store nothing below this point.
                    self._counters.collisions += 1
                    result.refused += n_blocks - i
                    break
                if tier > b.tier:
                    b.tier = tier
                    raised.append(b)
                b.last_used = self._clock
                result.deduplicated += 1
                if not b.resumable:
                    payload = get_payload(i)
                    if payload is not None and _resumable(payload) \
                            and self.replace_payload(b, payload) and b.tier:
                        raised.append(b)
            else:
                payload = get_payload(i)
                b = None if payload is None else self._store(
                    key, parent, namespace, chunk, payload, tier)
                if b is None:
                    result.refused += n_blocks - i
                    break
                result.new_keys.append(key)
                if tier:
                    raised.append(b)
            parent = b
        if self.lower is not None:
            for b in raised:
                if b.tier:
                    self.lower.checkpointed(b)
        result.last = parent
        if parent is not None:
            self._push_if_evictable(parent)  # the chain's end is the only possible new leaf
        self._counters.inserted_blocks += len(result.new_keys)
        self._counters.deduplicated_blocks += result.deduplicated
        self._counters.refused_blocks += result.refused
        return result

    def replace_payload(self, b: Block, payload: Payload) -> bool:
        """Swap a stored block's payload for an equivalent one (e.g. one that also
        carries a state snapshot). False if it is gone or the budget can't take it."""
        if self._blocks.get(b.key) is not b:
            return False
        size = int(payload.nbytes)
        delta = size - b.nbytes
        if delta > 0 and not self._make_room_sparing(b, delta):
            return False
        b.payload, b.nbytes, b.resumable = payload, size, _resumable(payload)
        self._bytes += delta
        if b.refcount:
            self._pinned_bytes += delta
        return True

    def _store(
        self,
        key: BlockKey,
        parent: Block | None,
        namespace: Namespace,
        chunk: bytes,
        payload: Payload,
        tier: int,
    ) -> Block | None:
        size = int(payload.nbytes)
        # The parent is a leaf until this child lands: spare it while making room.
        if not self._make_room_sparing(parent, size):
            return None
        b = Block(key, parent, namespace, chunk, payload, size, tier, self._clock,
                  _resumable(payload))
        self._blocks[key] = b
        self._bytes += size
        if parent is not None:
            parent.children += 1
        return b

    # ---- budget and eviction -------------------------------------------------

    def set_budget(self, budget_bytes: int) -> None:
        """Change the byte budget, evicting down to it as far as pins allow."""
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._make_room(0)

    def _make_room_sparing(self, keep: Block | None, size: int) -> bool:
        """``_make_room``, with ``keep`` pinned meanwhile so it can't be the victim."""
        if self._bytes + size <= self.budget_bytes:
            return True
        if keep is not None:
            self._incref(keep)
        try:
            return self._make_room(size)
        finally:
            if keep is not None:
                self.release([keep])

    def _make_room(self, size: int) -> bool:
        while self._bytes + size > self.budget_bytes:
            victim = self._pop_evictable()
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, b: Block) -> None:
        del self._blocks[b.key]
        self._bytes -= b.nbytes
        self._counters.evictions[b.tier] += 1
        if self.lower is not None:
            self.lower.evicted(b)  # before the parent link is cut: it names the parent
        parent = b.parent
        b.parent = None  # drop the reference chain so payloads can be freed
        if parent is not None:
            parent.children -= 1
            self._push_if_evictable(parent)

    def _push_if_evictable(self, b: Block) -> None:
        if not b.evictable:
            return
        self._seq += 1
        heapq.heappush(self._evict_heap, (b.tier, b.last_used, self._seq, b))
        if len(self._evict_heap) > 2 * len(self._blocks) + 64:
            self._rebuild_heap()

    def _pop_evictable(self) -> Block | None:
        while self._evict_heap:
            tier, last_used, _, b = heapq.heappop(self._evict_heap)
            current = (
                self._blocks.get(b.key) is b
                and b.evictable
                and b.tier == tier
                and b.last_used == last_used
            )
            if current:
                return b
        return None

    def _rebuild_heap(self) -> None:
        self._evict_heap = []
        for b in self._blocks.values():
            if b.evictable:
                self._seq += 1
                self._evict_heap.append((b.tier, b.last_used, self._seq, b))
        heapq.heapify(self._evict_heap)

    def reset(self, scope: ScopeFn | None = None) -> bool:
        """Drop every block, or those whose namespace is in ``scope`` (one tenant's), like
        vLLM's ``reset_prefix_cache``. Refused (False) if any of them is pinned, so a
        flush is never half-done. A chain never crosses namespaces, so a scoped flush
        takes whole chains and leaves no orphan."""
        if scope is None:
            if self._pinned_blocks:
                return False
            self._blocks.clear()
            self._evict_heap.clear()
            self._bytes = 0  # counters stay: they are monotonic, as Prometheus expects
            return True
        doomed = [b for b in self._blocks.values() if scope(b.namespace)]
        if any(b.refcount for b in doomed):
            return False
        for b in doomed:
            del self._blocks[b.key]
            self._bytes -= b.nbytes
            b.parent = None
        self._rebuild_heap()
        return True

    def usage(self, scope: ScopeFn) -> tuple[int, int]:
        """(blocks, bytes) cached for the namespaces in ``scope``: one tenant's share."""
        blocks = [b for b in self._blocks.values() if scope(b.namespace)]
        return len(blocks), sum(b.nbytes for b in blocks)

    # ---- statistics ----------------------------------------------------------

    def stats(self, scope: ScopeFn | None = None) -> PoolStats:
        """Counters since start, and the gauges as of now. With a ``scope``, only its
        namespaces: lookups and hits, blocks and bytes (the other counters stay
        pool-wide, as does the budget that all namespaces share)."""
        if scope is None:
            return replace(
                self._counters,
                budget_bytes=self.budget_bytes,
                evictions=dict(self._counters.evictions),
                blocks_pinned=self._pinned_blocks,
                blocks_cached=len(self._blocks) - self._pinned_blocks,
                bytes_pinned=self._pinned_bytes,
                bytes_cached=self._bytes - self._pinned_bytes,
            )
        s = replace(self._counters, budget_bytes=self.budget_bytes,
                    evictions=dict(self._counters.evictions), lookups=0, queried_tokens=0,
                    hit_tokens=0)
        for ns, (lookups, queried, hits) in self._ns_counters.items():
            if scope(ns):
                s.lookups += lookups
                s.queried_tokens += queried
                s.hit_tokens += hits
        for b in self._blocks.values():
            if scope(b.namespace):
                if b.refcount:
                    s.blocks_pinned += 1
                    s.bytes_pinned += b.nbytes
                else:
                    s.blocks_cached += 1
                    s.bytes_cached += b.nbytes
        return s
