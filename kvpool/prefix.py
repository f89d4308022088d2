"""The prefix cache, seen from the scheduler: request-level verbs over the block pool
(and the disk tier below it), as vLLM's ``KVCacheManager`` and SGLang's ``RadixCache``.

    chain = cache.prompt(namespace, tokens)   # keys hashed once
    cache.cached(chain)                       # leading blocks in RAM, or None: wait
    cache.acquire(chain, marks)               # pin the hit; promise the checkpoints
    cache.publish(chain, tokens, first, payloads, tier)   # computed blocks
    cache.release(chain)                      # unpin, drop promises

In-flight sharing lives here: a chain that ``acquire`` promises to compute registers
its keys, and another chain whose next block is promised waits (``cached`` -> None)
instead of computing it again. With a disk tier, ``cached`` also starts loading a
chain's next blocks from disk on a loader thread when RAM misses them; the chain waits
until they are in RAM, pinned for it, and its hit counts them as cached tokens.

Threading: every verb runs on the pool's thread (the scheduler's event loop). Disk
loads run on ``loader`` threads and hand their result back through ``post`` (the
loop's ``call_soon_threadsafe``), so neither the loop nor the engine thread blocks.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from blockserve.kvpool.disk import DiskStats, DiskTier
from blockserve.kvpool.hashing import BlockKey, Namespace, Tokens, chain_keys, hittable_blocks, \
    token_bytes
from blockserve.kvpool.pool import Block, BlockPool, PoolStats, PrefixHit, ScopeFn

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Chain:
    """One request's prompt as the cache sees it, and what the request holds."""

    namespace: Namespace
    raw: bytes  # the prompt as token_bytes, converted once
    n_tokens: int
    keys: list[BlockKey]  # keys of the prompt's hittable blocks, hashed once
    hit: PrefixHit | None = None  # pinned by ``acquire`` until ``release``
    held: list[Block] = field(default_factory=list)  # loaded from disk, pinned till acquire
    promised: list[BlockKey] = field(default_factory=list)  # in-flight keys it will publish
    loading: bool = False
    disk_from: int = -1  # the RAM hit length a disk load last started from
    waited: bool = False  # it waited for another request's in-flight blocks
    released: bool = False

    @property
    def hit_tokens(self) -> int:
        return 0 if self.hit is None else self.hit.num_tokens

    @property
    def shared(self) -> bool:
        """It waited for another request's blocks and then hit (an in-flight share)."""
        return self.waited and bool(self.hit and self.hit.blocks)


class PrefixCache:
    """Request-level verbs over a ``BlockPool`` and an optional ``DiskTier``."""

    def __init__(self, pool: BlockPool, disk: DiskTier | None = None,
                 share_inflight: bool = True, load_threads: int = 2, max_holding: int = 4):
        if disk is not None and disk.block_size != pool.block_size:
            raise ValueError("the pool and the disk tier must use one block size")
        self.pool = pool
        self.disk = disk
        if disk is not None:
            pool.lower = disk
        self.block_size = pool.block_size
        self.share_inflight = share_inflight
        self._inflight: dict[BlockKey, Chain] = {}  # key -> the chain that will publish it
        self._loader = (ThreadPoolExecutor(load_threads, thread_name_prefix="blockserve-disk-load")
                        if disk is not None else None)
        self._post: Callable[[Callable[[], None]], None] | None = None
        self._on_ready: Callable[[], None] = lambda: None
        self._epoch = 0  # a flush discards loads that started before it
        # Chains loading from disk or holding loaded blocks until admitted. Bounded: the
        # queue may be long, and pins taken for requests far back in it would crowd the
        # running requests' blocks out of the RAM budget.
        self._holding: set[Chain] = set()
        self.max_holding = max_holding

    def start(self, post: Callable[[Callable[[], None]], None],
              on_ready: Callable[[], None]) -> None:
        """``post(fn)`` runs ``fn`` on the pool's thread (from any thread);
        ``on_ready()`` is called there when a disk load has brought blocks in."""
        self._post, self._on_ready = post, on_ready

    # ---- the verbs ---------------------------------------------------------------

    def prompt(self, namespace: Namespace, tokens: Tokens) -> Chain:
        """A request's chain: its hittable blocks' keys, hashed once."""
        raw = token_bytes(tokens)
        n = len(raw) // 4
        usable = hittable_blocks(n, self.block_size)
        keys = chain_keys(namespace, raw[: usable * 4 * self.block_size], self.block_size)
        return Chain(namespace, raw, n, keys)

    def cached(self, chain: Chain) -> int | None:
        """Leading blocks of ``chain`` in RAM now (unverified, for ordering), or None
        while it should wait: its next blocks are loading from disk, or another request
        is computing them (in-flight sharing)."""
        if chain.loading:
            return None
        n = 0
        for key in chain.keys:
            if key not in self.pool:
                break
            n += 1
        if n == len(chain.keys):
            return n
        if (self.disk is not None and self._post is not None and n != chain.disk_from
                and chain.keys[n] in self.disk):
            if len(self._holding) >= self.max_holding:
                return None  # its blocks are on disk: wait for a loader, cheaper than prefill
            self._load(chain, n)  # once per RAM hit length: a refused insert can't loop
            return None
        owner = self._inflight.get(chain.keys[n])
        if self.share_inflight and owner is not None and owner is not chain:
            chain.waited = True
            return None
        return n

    def acquire(self, chain: Chain, marks: Sequence[tuple[int, int]] = ()
                ) -> list[tuple[int, int]]:
        """Pin the longest verified hit for ``chain`` and return the checkpoints to
        publish: ``marks`` ((token offset, tier), unaligned) aligned down to blocks,
        strictly inside (hit, prompt end), sorted, one tier each (the highest). The
        blocks up to the last checkpoint are promised to requests that follow."""
        hit = self.pool.lookup(chain.namespace, chain.raw, pin=True, keys=chain.keys,
                               max_blocks=len(chain.keys))
        chain.hit = hit
        self._drop_held(chain)  # the hit holds its own pins now
        self._holding.discard(chain)
        if self.disk is not None:
            self.disk.count_miss(chain.namespace,
                                 (len(chain.keys) - len(hit.blocks)) * self.block_size)
        bs = self.block_size
        tiers: dict[int, int] = {}
        for offset, tier in marks:
            aligned = offset // bs * bs
            if hit.num_tokens < aligned < chain.n_tokens:
                tiers[aligned] = max(tier, tiers.get(aligned, tier))
        checkpoints = sorted(tiers.items())
        if checkpoints:
            for key in chain.keys[len(hit.blocks) : checkpoints[-1][0] // bs]:
                if key not in self._inflight:
                    self._inflight[key] = chain
                    chain.promised.append(key)
        return checkpoints

    def publish(self, chain: Chain, tokens: Sequence[int], first_block: int,
                payloads: Sequence[Any], tier: int) -> bool:
        """Store blocks ``first_block..`` of ``tokens`` computed for ``chain``
        (``payloads[i]`` is block ``first_block + i``). True if this published blocks
        that other chains were waiting for (so the caller should schedule again)."""
        self.pool.insert(
            chain.namespace, tokens,
            lambda i: payloads[i - first_block] if i >= first_block else None,
            tier, pinned_prefix=chain.hit.blocks if chain.hit else (), keys=chain.keys,
        )
        published = set(chain.keys[: len(tokens) // self.block_size])
        if not any(k in published for k in chain.promised):
            return False
        self._drop_promises(chain, published)
        return True

    def release(self, chain: Chain) -> None:
        """Unpin all ``chain`` holds and drop its promises (idempotent)."""
        chain.released = True
        if chain.hit is not None:
            self.pool.release(chain.hit.blocks)
            chain.hit = None
        self._drop_held(chain)
        self._holding.discard(chain)
        self._drop_promises(chain)

    # ---- admin -------------------------------------------------------------------

    def reset(self, scope: ScopeFn | None = None) -> bool:
        """Flush ``scope`` (everything by default; e.g. ``Scope(salt=...)`` or
        ``server.admin.tenant_scope``) from RAM and disk. Refused (False)
        while any of its RAM blocks is pinned."""
        if not self.pool.reset(scope):
            return False
        self._epoch += 1
        if self.disk is not None:
            self.disk.reset(scope)
        return True

    def stats(self, scope: ScopeFn | None = None) -> PoolStats:
        """The pool's stats for ``scope`` (all namespaces by default)."""
        return self.pool.stats(scope)

    def usage(self, scope: ScopeFn) -> tuple[int, int]:
        """(blocks, bytes) in RAM for ``scope``: one tenant's share."""
        return self.pool.usage(scope)

    def disk_stats(self, scope: ScopeFn | None = None) -> DiskStats | None:
        """The disk tier's stats for ``scope``, or None without a disk tier."""
        return None if self.disk is None else self.disk.stats(scope)

    def close(self, spill: bool = True) -> None:
        """Stop loading; with ``spill``, write the RAM blocks not yet on disk (a
        graceful shutdown keeps the whole cache), then stop the writer."""
        if self._loader is not None:
            self._loader.shutdown(wait=True, cancel_futures=True)
        if self.disk is not None:
            if spill:
                # Leaves first, as eviction would: parents end up the more recent.
                blocks = sorted(self.pool.blocks(), key=lambda b: (b.tier, -_depth(b)))
                self.disk.spill(blocks)
            self.disk.close()

    # ---- disk loads ------------------------------------------------------------------

    def _load(self, chain: Chain, n_ram: int) -> None:
        """Load ``chain``'s blocks from ``n_ram`` on from disk, off this thread."""
        chain.loading = True
        chain.disk_from = n_ram
        self._holding.add(chain)
        step = 4 * self.block_size
        keys = chain.keys[n_ram:]
        chunks = [chain.raw[i * step : (i + 1) * step] for i in range(n_ram, len(chain.keys))]
        parent = chain.keys[n_ram - 1] if n_ram else chain.namespace.root_key()
        epoch = self._epoch
        disk, post = self.disk, self._post

        def job() -> None:
            try:
                found = disk.load(chain.namespace, parent, keys, chunks)
            except Exception:  # never leave the chain waiting forever
                log.exception("disk tier: a load failed")
                found = []
            post(lambda: self._loaded(chain, n_ram, found, epoch))

        try:
            self._loader.submit(job)
        except RuntimeError:  # shut down
            chain.loading = False
            self._holding.discard(chain)

    def _loaded(self, chain: Chain, n_ram: int, found: list[tuple[Any, int]],
                epoch: int) -> None:
        """Back on the pool's thread: put the loaded blocks under the chain's RAM
        prefix and pin the chain for its request until ``acquire``."""
        chain.loading = False
        if found and epoch == self._epoch:
            bs, end = self.block_size, n_ram
            # One insert per run of equal tiers, so each block keeps its disk tier.
            while end < n_ram + len(found):
                tier = found[end - n_ram][1]
                stop = end
                while stop < n_ram + len(found) and found[stop - n_ram][1] == tier:
                    stop += 1
                res = self.pool.insert(
                    chain.namespace, chain.raw[: stop * bs * 4],
                    lambda i: found[i - n_ram][0] if i >= n_ram else None,
                    tier, keys=chain.keys)
                if res.refused:
                    break  # the RAM prefix is gone, or the budget is full of pins
                end = stop
            if not chain.released:
                self._drop_held(chain)
                chain.held = self.pool.lookup(chain.namespace, chain.raw, pin=True,
                                              keys=chain.keys, max_blocks=len(chain.keys),
                                              record=False).blocks
        if not chain.held:
            self._holding.discard(chain)
        self._on_ready()

    def _drop_held(self, chain: Chain) -> None:
        if chain.held:
            self.pool.release(chain.held)
            chain.held = []

    def _drop_promises(self, chain: Chain, keys: set[BlockKey] | None = None) -> None:
        keep = []
        for k in chain.promised:
            if keys is None or k in keys:
                if self._inflight.get(k) is chain:
                    del self._inflight[k]
            else:
                keep.append(k)
        chain.promised = keep


def _depth(b: Block) -> int:
    d = 0
    while b.parent is not None:
        b, d = b.parent, d + 1
    return d
