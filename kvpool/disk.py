"""The disk tier under the block pool: content-addressed block files, written behind on
eviction and through at checkpoints, read back when a lookup misses in RAM.

Layout: ``DIR/<namespace root key>/<chain key>.<tier><r|n>.kv`` (``r``: the payload is
resumable), plus ``DIR/<root>/namespace.json`` naming the model and salt (for scoped
flushes). A file is one header, the block's tokens, the payload the engine's codec
made, and an xxh3-128 checksum of all of it:

    magic(8) version(u16) tier(u8) flags(u8) n_tokens(u32) root(16) parent(16) key(16)
    payload_len(u64) | tokens (n_tokens x int32 LE) | payload | checksum(16)

A hit checks the size, magic, version, checksum, root, parent, key and tokens, and that
``key == H(parent || tokens)``: the file is exactly the block the chain asks for, so
another model or tenant (whose keys derive from another root) can never read it. Any
failure is a miss, and the file is deleted.

Threads: ``evicted``/``checkpointed`` (the pool's thread) only queue the block; one
writer thread encodes and writes it (temporary file, then rename: ``kill -9`` leaves
whole files or ``*.tmp`` litter, which start-up removes). If the queue is over its
bounds the write is dropped and counted, never waited for. ``load`` runs on a loader
thread (the prefix cache's), never on the event loop or the engine thread. One lock
guards the index.

Eviction order on disk (within ``budget_bytes``): lowest tier first, then least
recently used. Loads touch a chain from its leaf to its root, and RAM evicts (so
spills) leaves before their parents, so a chain's leaves go before its root.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import xxhash

from blockserve.kvpool.hashing import BlockKey, Namespace, digest
from blockserve.kvpool.pool import MAX_COUNTED_NAMESPACES, TIERS, Block, ScopeFn

log = logging.getLogger(__name__)

MAGIC = b"BSKVBLK\0"
VERSION = 1
_HEADER = struct.Struct("<8sHBBI16s16s16sQ")
_CHECKSUM = 16
_NAME = re.compile(r"^([0-9a-f]{32})\.([0-9])([rn])\.kv$")
_ROOT = re.compile(r"^[0-9a-f]{32}$")
_FLAG_RESUMABLE = 1


class Codec(Protocol):
    """Payload <-> bytes, given by the engine (the pool knows no payload types)."""

    def encode(self, payload: Any) -> bytes:
        """The payload's bytes (called on the writer thread)."""

    def decode(self, data: memoryview) -> Any:
        """A payload from ``encode``'s bytes (a view into the file's buffer, which the
        payload may keep); raises ``ValueError`` on foreign data."""


def default_budget(path: str) -> int:
    """The smaller of 10% of the free space at ``path`` and 32 GiB."""
    os.makedirs(path, exist_ok=True)
    return min(shutil.disk_usage(path).free // 10, 32 << 30)


@dataclass
class DiskStats:
    """Counters since start and gauges as of now, as ``BlockPool.stats`` gives them."""

    budget_bytes: int
    hit_tokens: int = 0  # prompt tokens loaded from disk into RAM
    miss_tokens: int = 0  # hittable prompt tokens found neither in RAM nor on disk
    bytes_read: int = 0
    bytes_written: int = 0
    load_seconds: float = 0.0
    loads: int = 0
    written_files: int = 0
    dropped_writes: int = 0  # the writer was behind: a block was not written
    damaged_files: int = 0  # failed verification: deleted, counted as a miss
    evicted_files: int = 0
    files: int = 0
    bytes_used: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / total if total else 0.0


@dataclass(eq=False, slots=True)
class _Entry:
    key: BlockKey
    root: BlockKey
    tier: int
    resumable: bool
    size: int

    def name(self) -> str:
        return f"{self.key.hex()}.{self.tier}{'r' if self.resumable else 'n'}.kv"


@dataclass
class _Write:
    key: BlockKey
    parent: BlockKey
    namespace: Namespace
    token_bytes: bytes
    payload: Any
    tier: int
    resumable: bool
    nbytes: int
    epoch: int


class DiskTier:
    """Block files under ``path`` within ``budget_bytes`` (see the module doc)."""

    def __init__(self, path: str, codec: Codec, block_size: int,
                 budget_bytes: int | None = None, max_queue_blocks: int = 1024,
                 max_queue_bytes: int = 256 << 20):
        self.path = os.path.abspath(path)
        os.makedirs(self.path, exist_ok=True)
        self.codec = codec
        self.block_size = block_size
        self.budget_bytes = default_budget(self.path) if budget_bytes is None else budget_bytes
        self.max_queue_blocks = max_queue_blocks
        self.max_queue_bytes = max_queue_bytes
        self._lock = threading.Lock()
        self._index: dict[BlockKey, _Entry] = {}
        self._lru: dict[int, OrderedDict[BlockKey, _Entry]] = {t: OrderedDict() for t in TIERS}
        self._roots: dict[BlockKey, Namespace | None] = {}  # None: namespace.json lost
        self._bytes = 0
        self._stats = DiskStats(self.budget_bytes)
        # root -> [hit, miss] tokens, bounded as the pool's per-namespace counters are
        self._ns_counts: OrderedDict[BlockKey, list[int]] = OrderedDict()
        self._epoch = 0
        self._resets: list[tuple[int, ScopeFn | None]] = []
        self._queue: queue.Queue = queue.Queue()  # bounded by the counters below
        self._queued_blocks = 0
        self._queued_bytes = 0
        # Queued writes by key: a block evicted a moment ago is still served from here.
        self._pending: dict[BlockKey, _Write] = {}
        t0 = time.perf_counter()
        self._scan()
        self.scan_seconds = time.perf_counter() - t0
        self._writer = threading.Thread(target=self._write_loop, name="blockserve-disk-writer",
                                        daemon=True)
        self._writer.start()

    # ---- start-up ------------------------------------------------------------

    def _scan(self) -> None:
        """Rebuild the index from the directory: names and sizes only (no file is
        opened), oldest first by mtime; temporary-file litter is removed."""
        found: list[tuple[float, _Entry]] = []
        for d in os.scandir(self.path):
            if not (d.is_dir(follow_symlinks=False) and _ROOT.match(d.name)):
                continue
            root = bytes.fromhex(d.name)
            self._roots[root] = _read_namespace(d.path)
            for f in os.scandir(d.path):
                if f.name.endswith(".tmp"):
                    _unlink(f.path)  # a write that a crash interrupted
                    continue
                m = _NAME.match(f.name)
                if m is None or int(m.group(2)) not in TIERS:
                    continue
                st = f.stat(follow_symlinks=False)
                found.append((st.st_mtime, _Entry(bytes.fromhex(m.group(1)), root,
                                                  int(m.group(2)), m.group(3) == "r",
                                                  st.st_size)))
        found.sort(key=lambda e: e[0])
        for _, e in found:
            old = self._index.get(e.key)
            if old is not None:  # two copies (a crash between write and unlink): keep one
                self._drop_entry(old)
                _unlink(self._file(old))
            self._add_entry(e)
        self._evict_to_budget()

    # ---- the pool's LowerTier (pool thread): queue only ------------------------

    def evicted(self, block: Block) -> None:
        """Write-behind: keep a block that leaves RAM."""
        self._enqueue(block)

    def checkpointed(self, block: Block) -> None:
        """Write-through: keep a checkpoint block now."""
        self._enqueue(block)

    def _enqueue(self, b: Block) -> None:
        with self._lock:
            e = self._index.get(b.key)
            if e is not None and (e.resumable or not b.resumable):
                return  # already on disk (as good a copy)
            if b.key in self._pending:
                return
            if (self._queued_blocks >= self.max_queue_blocks
                    or self._queued_bytes + b.nbytes > self.max_queue_bytes):
                self._stats.dropped_writes += 1  # never stall the pool's thread
                return
            self._queued_blocks += 1
            self._queued_bytes += b.nbytes
            parent = b.namespace.root_key() if b.parent is None else b.parent.key
            w = _Write(b.key, parent, b.namespace, b.token_bytes, b.payload, b.tier,
                       b.resumable, b.nbytes, self._epoch)
            self._pending[b.key] = w
        self._queue.put(w)

    # ---- the writer thread -----------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if callable(item):  # a control job (a flush's deletions, a barrier)
                    item()
                    continue
                try:
                    self._write(item)
                except Exception:  # a full disk, an encoding error: lose the block only
                    log.exception("disk tier: writing a block failed")
                finally:
                    with self._lock:
                        self._queued_blocks -= 1
                        self._queued_bytes -= item.nbytes
                        if self._pending.get(item.key) is item:
                            del self._pending[item.key]
                        if not self._queued_blocks:
                            self._resets.clear()  # no write left that predates them
            finally:
                self._queue.task_done()

    def _write(self, w: _Write) -> None:
        with self._lock:
            if self._flushed_since(w.epoch, w.namespace):
                return
            old = self._index.get(w.key)
            if old is not None and (old.resumable or not w.resumable):
                return
        payload = self.codec.encode(w.payload)
        root = w.namespace.root_key()
        header = _HEADER.pack(MAGIC, VERSION, w.tier, _FLAG_RESUMABLE if w.resumable else 0,
                              len(w.token_bytes) // 4, root, w.parent, w.key, len(payload))
        h = xxhash.xxh3_128()
        for part in (header, w.token_bytes, payload):
            h.update(part)
        entry = _Entry(w.key, root, w.tier, w.resumable,
                       len(header) + len(w.token_bytes) + len(payload) + _CHECKSUM)
        folder = os.path.join(self.path, root.hex())
        if self._roots.get(root) is None:
            os.makedirs(folder, exist_ok=True)
            _write_namespace(folder, w.namespace)
            with self._lock:
                self._roots[root] = w.namespace
        final = os.path.join(folder, entry.name())
        tmp = f"{final}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join((header, w.token_bytes, payload, h.digest())))
        with self._lock:
            if self._flushed_since(w.epoch, w.namespace):
                _unlink(tmp)
                return
            os.replace(tmp, final)  # atomic: a reader sees no file or the whole file
            old = self._index.get(w.key)
            if old is not None:  # a resumable copy replaces a plain one
                self._drop_entry(old)
                if old.name() != entry.name():
                    _unlink(self._file(old))
            self._add_entry(entry)
            self._stats.written_files += 1
            self._stats.bytes_written += entry.size
            self._evict_to_budget()

    def _flushed_since(self, epoch: int, ns: Namespace) -> bool:
        return any(e > epoch and (scope is None or scope(ns)) for e, scope in self._resets)

    # ---- reads (a loader thread) ------------------------------------------------

    def __contains__(self, key: BlockKey) -> bool:
        # dict reads: atomic under the GIL
        return key in self._index or key in self._pending

    def load(self, namespace: Namespace, parent: BlockKey, keys: Sequence[BlockKey],
             chunks: Sequence[bytes]) -> list[tuple[Any, int]]:
        """(payload, tier) of the leading ``keys`` found on disk and verified, in chain
        order, stopping at the first miss; ``parent`` is the key before ``keys[0]``
        and ``chunks[i]`` the tokens of ``keys[i]``. Blocking: run it off the loop."""
        t0 = time.perf_counter()
        root = namespace.root_key()
        out: list[tuple[Any, int]] = []
        read = 0
        self._prefetch(keys)
        for key, chunk in zip(keys, chunks):
            with self._lock:
                e = self._index.get(key)
                w = self._pending.get(key)
            if w is not None and (e is None or w.resumable and not e.resumable):
                # Not written yet: the queued block itself, checked as a file would be.
                if (w.namespace.root_key(), w.parent, w.token_bytes) != (root, parent, chunk):
                    break
                out.append((w.payload, w.tier))
                parent = key
                continue
            if e is None or e.root != root:
                break
            path = self._file(e)
            try:
                with open(path, "rb") as f:
                    data = f.read()  # one sequential read per block file
                payload = self._verify(data, e, root, parent, key, chunk)
            except FileNotFoundError:  # evicted or flushed meanwhile: a plain miss
                break
            except (OSError, ValueError, struct.error) as err:
                self._damaged(e, path, err)
                break
            read += len(data)
            out.append((payload, e.tier))
            parent = key
        with self._lock:
            for key in reversed(keys[: len(out)]):  # leaf first: the root ends up newest
                e = self._index.get(key)
                if e is not None:
                    self._lru[e.tier].move_to_end(key)
            self._stats.bytes_read += read
            self._stats.load_seconds += time.perf_counter() - t0
            self._stats.loads += 1
            self._stats.hit_tokens += len(out) * self.block_size
            self._ns_count(root)[0] += len(out) * self.block_size
        now = time.time()
        for key in keys[: len(out)]:
            e = self._index.get(key)
            if e is not None:
                try:
                    os.utime(self._file(e), (now, now))  # keeps the LRU order over restarts
                except OSError:
                    pass
        return out

    def _prefetch(self, keys: Sequence[BlockKey]) -> None:
        """Ask the kernel to read the chain's files now (``POSIX_FADV_WILLNEED``), all at
        once: the reads queue in parallel while the first files are verified, instead of
        one file's read at a time."""
        if not hasattr(os, "posix_fadvise"):
            return
        for key in keys:
            e = self._index.get(key)
            if e is None:
                break
            try:
                fd = os.open(self._file(e), os.O_RDONLY)
            except OSError:
                break
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def _verify(self, data: bytes, e: _Entry, root: BlockKey, parent: BlockKey,
                key: BlockKey, chunk: bytes) -> Any:
        # Slices of a memoryview copy nothing: the payload is most of the file, and the
        # checksum and the codec read it where it lies (the load runs at disk speed).
        view = memoryview(data)
        if len(data) < _HEADER.size + _CHECKSUM:
            raise ValueError("truncated")
        magic, version, tier, flags, n, f_root, f_parent, f_key, plen = \
            _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError("not a block file")
        if version != VERSION:
            raise ValueError(f"format version {version}, expected {VERSION}")
        if len(data) != _HEADER.size + 4 * n + plen + _CHECKSUM:
            raise ValueError("truncated or padded")
        if xxhash.xxh3_128_digest(view[:-_CHECKSUM]) != data[-_CHECKSUM:]:
            raise ValueError("checksum mismatch")
        toks = data[_HEADER.size : _HEADER.size + 4 * n]
        if (f_root, f_parent, f_key) != (root, parent, key) or toks != chunk:
            raise ValueError("another block's file")
        if digest(parent + toks) != key:
            raise ValueError("key does not hash from parent and tokens")
        payload = self.codec.decode(view[_HEADER.size + 4 * n : -_CHECKSUM])
        if bool(getattr(payload, "resumable", True)) != bool(flags & _FLAG_RESUMABLE):
            raise ValueError("payload disagrees with its header")
        return payload

    def _damaged(self, e: _Entry, path: str, err: BaseException) -> None:
        log.warning("disk tier: %s is damaged (%s): deleted, a miss", path, err)
        with self._lock:
            if self._index.get(e.key) is e:
                self._drop_entry(e)
            self._stats.damaged_files += 1
        _unlink(path)

    def count_miss(self, namespace: Namespace, tokens: int) -> None:
        """Hittable tokens that neither RAM nor disk had (for the hit rate)."""
        with self._lock:
            self._stats.miss_tokens += tokens
            self._ns_count(namespace.root_key())[1] += tokens

    def _ns_count(self, root: BlockKey) -> list[int]:
        c = self._ns_counts.get(root)
        if c is None:
            c = self._ns_counts[root] = [0, 0]
            if len(self._ns_counts) > MAX_COUNTED_NAMESPACES:
                self._ns_counts.popitem(last=False)
        else:
            self._ns_counts.move_to_end(root)
        return c

    # ---- flush, stats, close ---------------------------------------------------

    def reset(self, scope: ScopeFn | None = None) -> None:
        """Forget the files of ``scope`` now (later lookups miss) and delete them on the
        writer thread; queued writes for it are dropped."""
        with self._lock:
            self._epoch += 1
            if self._queued_blocks:  # only queued writes are checked against flushes
                self._resets.append((self._epoch, scope))
            doomed = [e for e in self._index.values() if self._covers(scope, e.root)]
            for e in doomed:
                self._drop_entry(e)
            for key, w in list(self._pending.items()):
                if scope is None or scope(w.namespace):
                    del self._pending[key]  # the writer skips it (flushed since)
        paths = [self._file(e) for e in doomed]

        def delete() -> None:
            for p in paths:
                _unlink(p)

        self._queue.put(delete)

    def _covers(self, scope: ScopeFn | None, root: BlockKey) -> bool:
        if scope is None:
            return True
        ns = self._roots.get(root)  # None if its namespace.json was lost: only "all" covers it
        return ns is not None and scope(ns)

    def stats(self, scope: ScopeFn | None = None) -> DiskStats:
        """Counters and gauges; with a ``scope``, hits, misses, files and bytes are its
        own (the rest stays tier-wide)."""
        with self._lock:
            s = DiskStats(**{k: getattr(self._stats, k) for k in DiskStats.__dataclass_fields__})
            s.budget_bytes = self.budget_bytes
            if scope is None:
                s.files, s.bytes_used = len(self._index), self._bytes
                return s
            s.hit_tokens = s.miss_tokens = s.files = s.bytes_used = 0
            for root, (hit, miss) in self._ns_counts.items():
                if self._covers(scope, root):
                    s.hit_tokens += hit
                    s.miss_tokens += miss
            for e in self._index.values():
                if self._covers(scope, e.root):
                    s.files += 1
                    s.bytes_used += e.size
            return s

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued write is on disk (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(done.set)
        done.wait(timeout)

    def spill(self, blocks: Sequence[Block]) -> int:
        """Queue ``blocks`` for writing, waiting for room (shutdown only: the pool's
        RAM is about to be lost). Returns how many were queued."""
        n = 0
        for b in blocks:
            while True:
                with self._lock:
                    room = (self._queued_blocks < self.max_queue_blocks and
                            self._queued_bytes + b.nbytes <= self.max_queue_bytes)
                if room or not self._writer.is_alive():
                    break
                time.sleep(0.005)
            before = self._stats.dropped_writes
            self._enqueue(b)
            n += self._stats.dropped_writes == before
        return n

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()

    # ---- the index (callers hold the lock) --------------------------------------

    def _file(self, e: _Entry) -> str:
        return os.path.join(self.path, e.root.hex(), e.name())

    def _add_entry(self, e: _Entry) -> None:
        self._index[e.key] = e
        self._lru[e.tier][e.key] = e
        self._bytes += e.size

    def _drop_entry(self, e: _Entry) -> None:
        del self._index[e.key]
        del self._lru[e.tier][e.key]
        self._bytes -= e.size

    def _evict_to_budget(self) -> None:
        for tier in TIERS:  # lowest tier first, least recently used first
            lru = self._lru[tier]
            while self._bytes > self.budget_bytes and lru:
                _, e = next(iter(lru.items()))
                self._drop_entry(e)
                _unlink(self._file(e))
                self._stats.evicted_files += 1


def _read_namespace(folder: str) -> Namespace | None:
    try:
        with open(os.path.join(folder, "namespace.json")) as f:
            d = json.load(f)
        ns = Namespace(d["model"], d.get("cache_salt"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # A namespace file that does not hash to its folder's name is not trusted.
    return ns if ns.root_key().hex() == os.path.basename(folder) else None


def _write_namespace(folder: str, ns: Namespace) -> None:
    final = os.path.join(folder, "namespace.json")
    tmp = f"{final}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"model": ns.model, "cache_salt": ns.cache_salt}, f)
    os.replace(tmp, final)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
