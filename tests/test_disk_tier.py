"""The disk tier (``kvpool.DiskTier``) under the prefix cache, with fake payloads: files,
verification, damage, budget, tenants, crash safety, and restarts through the scheduler
(the fake generator checks every cached payload against the prompt)."""

import asyncio
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from blockserve.kvpool import (
    TIER_GENERATED,
    TIER_SYSTEM,
    BlockPool,
    DiskTier,
    Namespace,
    PrefixCache,
    Scope,
)
from blockserve.kvpool.disk import _HEADER, VERSION
from blockserve.scheduler import Request, SamplingParams, Scheduler, SchedulerConfig
from tests.engine_harness import until
from tests.fakes import FakeCodec, FakeGenerator, FakePayload, next_token

BS = 4
NS = Namespace("fake-model")


def disk(path, budget=1 << 30, **kw):
    return DiskTier(str(path), FakeCodec(), BS, budget, **kw)


def payloads(tokens):
    return [FakePayload(tuple(tokens[i * BS : (i + 1) * BS])) for i in range(len(tokens) // BS)]


def fill(cache, ns, prompt, tier=TIER_GENERATED):
    """Publish all full blocks of ``prompt`` as one request would."""
    c = cache.prompt(ns, prompt + [0])
    cache.acquire(c)
    cache.publish(c, prompt, 0, payloads(prompt), tier)
    cache.release(c)


async def load(cache, ns, prompt):
    """A request's view after a miss in RAM: wait for its disk load, then acquire."""
    ready = asyncio.Event()
    loop = asyncio.get_running_loop()
    cache.start(loop.call_soon_threadsafe, ready.set)
    c = cache.prompt(ns, prompt)
    while cache.cached(c) is None:
        await asyncio.wait_for(ready.wait(), 10)
        ready.clear()
    cache.acquire(c)
    return c


def files(path):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                  if f.endswith(".kv"))


async def test_evicted_blocks_come_back_from_disk(tmp_path):
    d = disk(tmp_path)
    cache = PrefixCache(BlockPool(BS, 64 * 4), d)  # RAM for 4 blocks
    a, b = list(range(1, 17)), list(range(101, 117))
    fill(cache, NS, a)
    fill(cache, NS, b)  # evicts a's blocks (write-behind)
    d.flush()
    assert d.stats().files >= 4
    c = await load(cache, NS, a + [5])
    assert c.hit_tokens == 16
    assert [p.tokens for p in c.hit.payloads] == [tuple(a[i:i + 4]) for i in range(0, 16, 4)]
    s = d.stats()
    assert s.hit_tokens == 16 and s.bytes_read > 0 and s.loads == 1
    cache.release(c)
    cache.close(spill=False)


async def test_checkpoints_are_written_through_and_survive_a_restart(tmp_path):
    cache = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path))
    prompt = list(range(1, 13))
    fill(cache, NS, prompt, TIER_SYSTEM)  # a checkpoint: written at once
    cache.disk.flush()
    assert len(files(tmp_path)) == 3 and len(cache.pool) == 3
    cache.close(spill=False)
    cache2 = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path))  # a restart: RAM is empty
    assert cache2.disk.stats().files == 3
    c = await load(cache2, NS, prompt + [1])
    assert c.hit_tokens == 12
    assert {b.tier for b in c.hit.blocks} == {TIER_SYSTEM}  # it keeps its tier
    cache2.release(c)
    cache2.close(spill=False)


async def test_close_spills_ram_and_partial_hits_stop_at_the_divergence(tmp_path):
    cache = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path))
    prompt = list(range(1, 21))
    fill(cache, NS, prompt)  # tier 0: only in RAM until close
    cache.disk.flush()
    assert files(tmp_path) == []
    cache.close(spill=True)
    assert len(files(tmp_path)) == 5
    cache2 = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path))
    c = await load(cache2, NS, prompt[:10] + [0] * 10)  # diverges inside block 2
    assert c.hit_tokens == 8
    assert cache2.disk.stats().miss_tokens == 8  # blocks 2, 3 of 4 hittable: in neither tier
    cache2.release(c)
    cache2.close(spill=False)


def _corrupt(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped":
        data[_HEADER.size + 5] ^= 0x40  # inside the tokens
    elif how == "payload":
        data[-20] ^= 0x01  # inside the payload, before the checksum
    elif how == "version":
        data[8:10] = (VERSION + 1).to_bytes(2, "little")
    elif how == "empty":
        data = b""
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped", "payload", "version", "empty"])
async def test_a_damaged_file_is_a_miss_and_is_deleted(tmp_path, how):
    cache = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path))
    prompt = list(range(1, 13))
    fill(cache, NS, prompt, TIER_SYSTEM)
    cache.close(spill=False)
    # The chain's second block (names sort by key, so find it by the tokens it carries).
    second = next(f for f in files(tmp_path) if open(f, "rb").read()[
        _HEADER.size : _HEADER.size + 16] == struct.pack("<4i", 5, 6, 7, 8))
    _corrupt(second, how)
    cache2 = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path))
    c = await load(cache2, NS, prompt + [1])
    assert c.hit_tokens == 4  # block 0 only: the damaged block and all after it miss
    assert not os.path.exists(second)
    assert cache2.disk.stats().damaged_files == 1
    cache2.release(c)
    cache2.close(spill=False)


async def test_a_file_of_another_model_under_this_key_is_refused(tmp_path):
    other = Namespace("another-model")
    cache = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path))
    prompt = list(range(1, 9))
    fill(cache, other, prompt, TIER_SYSTEM)
    cache.close(spill=False)
    # Move the other model's first block where this model's first block would be.
    mine = cache.prompt(NS, prompt + [0]).keys[0]
    theirs = cache.prompt(other, prompt + [0]).keys[0]
    src = next(f for f in files(tmp_path) if os.path.basename(f).startswith(theirs.hex()))
    folder = os.path.join(str(tmp_path), NS.root_key().hex())
    os.makedirs(folder)
    dst = os.path.join(folder, os.path.basename(src).replace(theirs.hex(), mine.hex()))
    os.rename(src, dst)
    cache2 = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path))
    c = await load(cache2, NS, prompt + [0])
    assert c.hit_tokens == 0 and not os.path.exists(dst)
    assert cache2.disk.stats().damaged_files == 1
    cache2.release(c)
    cache2.close(spill=False)


async def test_tenants_never_share_disk_blocks(tmp_path):
    t1, t2 = Namespace("fake-model", "tenant:a"), Namespace("fake-model", "tenant:b")
    cache = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path))
    prompt = list(range(1, 13))
    fill(cache, t1, prompt, TIER_SYSTEM)
    cache.close(spill=False)
    assert {os.path.basename(os.path.dirname(f)) for f in files(tmp_path)} == \
        {t1.root_key().hex()}
    cache2 = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path))
    c = await load(cache2, t2, prompt + [1])
    assert c.hit_tokens == 0 and cache2.disk.stats().hit_tokens == 0
    cache2.release(c)
    c = await load(cache2, t1, prompt + [1])
    assert c.hit_tokens == 12
    cache2.release(c)
    cache2.close(spill=False)


def test_the_byte_budget_holds_under_a_stream_of_distinct_prompts(tmp_path):
    d = disk(tmp_path, budget=40 * 200)  # ~40 files of ~200 bytes
    cache = PrefixCache(BlockPool(BS, 64 * 4), d)
    for i in range(60):
        fill(cache, NS, [i * 100 + j for j in range(12)])
        d.flush()
        assert d.stats().bytes_used <= d.budget_bytes
    on_disk = sum(os.path.getsize(f) for f in files(tmp_path))
    assert on_disk == d.stats().bytes_used <= d.budget_bytes
    assert d.stats().evicted_files > 0 and d.stats().files > 10
    cache.close(spill=False)


def test_disk_eviction_takes_low_tiers_first(tmp_path):
    d = disk(tmp_path, budget=10 * 200)
    cache = PrefixCache(BlockPool(BS, 1 << 20), d)
    system = list(range(1, 9))
    fill(cache, NS, system, TIER_SYSTEM)  # written through, the oldest files
    for i in range(30):
        c = cache.prompt(NS, [i, i, i, i, 9, 9, 9, 9, 1])
        cache.acquire(c)
        cache.pool.set_budget(0)  # force each new block out to disk
        cache.publish(c, [i, i, i, i, 9, 9, 9, 9], 0, payloads([i] * 4 + [9] * 4),
                      TIER_GENERATED)
        cache.release(c)
        cache.pool.set_budget(1 << 20)
        d.flush()
    keys = cache.prompt(NS, system + [0]).keys
    assert all(k in d for k in keys)  # the old system blocks outlived 60 newer tier-0 ones
    cache.close(spill=False)


class GatedCodec(FakeCodec):
    """A codec whose encodes (or decodes) wait for ``release``: the disk tier's writes
    (or loads) stay queued behind the first, held one as long as a test needs, and
    ``entered`` says the first has begun. A gate never released lets go after a minute
    and says so (``timed_out``), so a test that waited on it fails instead of hanging."""

    def __init__(self, encode: bool = True, decode: bool = False):
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.timed_out = False
        self.threads: set[int] = set()  # who encoded or decoded
        self._encode, self._decode = encode, decode

    def _gate(self) -> None:
        self.threads.add(threading.get_ident())
        self.entered.set()
        if not self.release.wait(60):
            self.timed_out = True

    def encode(self, p):
        if self._encode:
            self._gate()
        return super().encode(p)

    def decode(self, data):
        if self._decode:
            self._gate()
        return super().decode(data)


def test_a_full_write_queue_drops_writes_and_never_stalls(tmp_path):
    codec = GatedCodec()
    d = DiskTier(str(tmp_path), codec, BS, 1 << 30, max_queue_blocks=2)
    cache = PrefixCache(BlockPool(BS, 1 << 20), d)
    fill(cache, NS, list(range(1, 41)), TIER_SYSTEM)  # 10 checkpoint blocks at once
    # It returned with the codec held: the pool's thread did not wait for it.
    assert codec.entered.wait(60) and not codec.timed_out
    assert threading.get_ident() not in codec.threads
    assert d.stats().dropped_writes >= 7
    codec.release.set()
    cache.close(spill=False)


async def test_a_scoped_reset_flushes_that_tenant_on_disk_only(tmp_path):
    t1, t2 = Namespace("fake-model", "tenant:a"), Namespace("fake-model", "tenant:b")
    cache = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path))
    fill(cache, t1, list(range(1, 9)), TIER_SYSTEM)
    fill(cache, t2, list(range(1, 9)), TIER_SYSTEM)
    cache.disk.flush()
    assert cache.disk.stats(Scope(salt="tenant:b")).files == 2
    assert cache.reset(Scope(salt="tenant:b"))
    cache.disk.flush()
    assert cache.disk.stats(Scope(salt="tenant:b")).files == 0
    assert cache.disk.stats(Scope(salt="tenant:a")).files == 2
    assert {os.path.basename(os.path.dirname(f)) for f in files(tmp_path)} == \
        {t1.root_key().hex()}
    cache.close(spill=False)
    cache2 = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path))  # also after a restart
    c = await load(cache2, t2, list(range(1, 9)) + [0])
    assert c.hit_tokens == 0
    cache2.release(c)
    cache2.close(spill=False)


def test_start_up_removes_litter_and_rebuilds_the_index_quickly(tmp_path):
    d = disk(tmp_path)
    cache = PrefixCache(BlockPool(BS, 1 << 20), d)
    fill(cache, NS, list(range(1, 13)), TIER_SYSTEM)
    cache.close(spill=False)
    folder = os.path.dirname(files(tmp_path)[0])
    litter = os.path.join(folder, "0" * 32 + ".0n.kv.123.tmp")
    open(litter, "wb").write(b"half a block")
    # 20K more files (empty: the index reads names and sizes, never contents).
    for i in range(20000):
        open(os.path.join(folder, f"{i:032x}.0n.kv"), "wb").close()
    # Quickly: it reads names and sizes, never a block file's contents (checked by
    # refusing every open of one while the index is built; ~0.3 s here).
    import builtins

    real_open, real_os_open = builtins.open, os.open

    def no_kv(path):
        assert not str(path).endswith(".kv"), f"start-up read a block file: {path}"

    def guarded_open(path, *a, **kw):
        no_kv(path)
        return real_open(path, *a, **kw)

    def guarded_os_open(path, *a, **kw):
        no_kv(path)
        return real_os_open(path, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", guarded_open)
        mp.setattr(os, "open", guarded_os_open)
        d2 = disk(tmp_path)
    assert not os.path.exists(litter)
    assert d2.stats().files == 20003
    d2.close()


_WRITER = textwrap.dedent("""
    import sys
    from blockserve.kvpool import BlockPool, DiskTier, Namespace, PrefixCache, TIER_SYSTEM
    from tests.fakes import FakeCodec, FakePayload
    d = DiskTier(sys.argv[1], FakeCodec(), 4, 1 << 30, max_queue_blocks=100000,
                 max_queue_bytes=1 << 40)
    cache = PrefixCache(BlockPool(4, 1 << 40), d)
    ns = Namespace("fake-model")
    print("ready", flush=True)
    i = 0
    while True:
        toks = [i * 1000 + j for j in range(64)]
        c = cache.prompt(ns, toks + [0])
        cache.acquire(c)
        cache.publish(c, toks, 0, [FakePayload(tuple(toks[k:k + 4]), 4096)
                                   for k in range(0, 64, 4)], TIER_SYSTEM)
        cache.release(c)
        i += 1
""")


async def test_kill_9_during_writes_leaves_whole_files_or_litter(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(
                                os.path.abspath(__file__))))
    assert proc.stdout.readline().strip() == b"ready"
    deadline = time.time() + 20
    while len(files(tmp_path)) < 200 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = files(tmp_path)
    assert len(written) >= 200
    d = disk(tmp_path)
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")]
    # Every indexed file verifies: load each chain head-first and count no damage.
    cache = PrefixCache(BlockPool(BS, 1 << 40), d)
    loop = asyncio.get_running_loop()
    cache.start(loop.call_soon_threadsafe, lambda: None)
    loaded = 0
    for i in range(len(written) // 16 + 2):
        toks = [i * 1000 + j for j in range(64)]
        c = cache.prompt(NS, toks + [0])
        found = await loop.run_in_executor(None, d.load, NS, NS.root_key(), c.keys,
                                           [c.raw[k * 16:(k + 1) * 16] for k in range(16)])
        loaded += len(found)
    assert d.stats().damaged_files == 0
    assert loaded >= len(written) - 16  # at most the chain being written can be cut short
    cache.close(spill=False)


# ---- through the scheduler: a restart with the fake generator ------------------------


def expected(prompt, n):
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(next_token(ctx))
    return ctx[len(prompt):]


async def _serve(path, prompts, budget=1 << 20, concurrent=False):
    gen = FakeGenerator(block_size=BS)
    cache = PrefixCache(BlockPool(BS, budget), disk(path))
    sched = Scheduler(gen, cache, SchedulerConfig())
    sched.start()

    async def one(p):
        outs = [o async for o in sched.submit(Request(p, SamplingParams(max_tokens=5)))]
        assert outs[-1].finish_reason == "length", outs[-1]
        return [t for o in outs for t in o.token_ids], outs[-1].usage

    if concurrent:
        results = await asyncio.gather(*(one(p) for p in prompts))
    else:
        results = [await one(p) for p in prompts]
    assert cache.stats().blocks_pinned == 0 and gen.active == 0
    cache.close(spill=True)
    return results, gen, cache


async def test_a_restart_serves_cold_full_partial_and_concurrent_hits_exactly(tmp_path):
    p1 = list(range(1, 42))
    p2 = list(range(500, 530))
    (cold, _), = (await _serve(tmp_path, [p1]))[0][:1]
    assert cold == expected(p1, 5)
    turn2 = p1 + expected(p1, 5) + [7, 8, 9, 10, 11]
    results, gen, cache = await _serve(
        tmp_path, [p1, p1[:20] + [3] * 10, turn2, p2], concurrent=True)
    (full, u_full), (part, u_part), (multi, u_multi), (new, u_new) = results
    assert full == expected(p1, 5) and u_full.cached_tokens == 40
    assert part == expected(p1[:20] + [3] * 10, 5) and u_part.cached_tokens == 20
    assert multi == expected(turn2, 5) and u_multi.cached_tokens == 44
    assert new == expected(p2, 5) and u_new.cached_tokens == 0
    assert cache.disk.stats().hit_tokens >= 44


async def test_small_ram_and_a_disk_tier_keep_the_working_set(tmp_path):
    prompts = [list(range(i * 100, i * 100 + 33)) for i in range(6)]  # 8 blocks each
    budget = 64 * 10  # RAM for 10 blocks: less than two prompts
    results, _, _ = await _serve(tmp_path, prompts * 2, budget=budget)
    second = [u.cached_tokens for _, u in results[6:]]
    assert second == [32] * 6  # every second pass hits in full, from disk


def test_the_servers_tenant_scope_flushes_that_tenant_on_disk(tmp_path):
    """``server.admin.tenant_scope`` (what /v1/cache/reset passes for a tenant key)
    reaches the disk tier: the tenant's files go, including its nested request salts."""
    from blockserve.server.admin import tenant_scope
    from blockserve.server.runtime import cache_salt

    mine = [Namespace("fake-model", cache_salt("t" * 32, s)) for s in (None, "x")]
    other = Namespace("fake-model", cache_salt("u" * 32, None))
    cache = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path))
    for ns in mine + [other]:
        fill(cache, ns, list(range(1, 9)), TIER_SYSTEM)
    cache.disk.flush()
    assert cache.disk.stats(tenant_scope("t" * 32)).files == 4
    assert cache.reset(tenant_scope("t" * 32))
    cache.disk.flush()
    assert cache.disk.stats().files == 2 == cache.disk.stats(tenant_scope("u" * 32)).files
    assert len(files(tmp_path)) == 2
    cache.close(spill=False)


async def test_disk_loads_for_a_long_queue_are_bounded(tmp_path):
    """Only ``max_holding`` chains load or hold disk blocks at once; the others wait
    (None) and load as the first are admitted."""
    cache = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path), max_holding=2)
    prompts = [[i * 100 + j for j in range(8)] for i in range(5)]
    for p in prompts:
        fill(cache, NS, p, TIER_SYSTEM)
    cache.close(spill=False)
    cache = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path), max_holding=2)
    ready = asyncio.Event()
    loop = asyncio.get_running_loop()
    cache.start(loop.call_soon_threadsafe, ready.set)
    chains = [cache.prompt(NS, p + [0]) for p in prompts]
    assert [cache.cached(c) for c in chains] == [None] * 5
    assert sum(c.loading for c in chains) == 2
    while any(c.loading for c in chains):
        await asyncio.wait_for(ready.wait(), 10)
        ready.clear()
    assert cache.stats().blocks_pinned == 4  # two chains of two blocks, held for them
    assert [cache.cached(c) for c in chains[:2]] == [2, 2]
    assert cache.cached(chains[2]) is None  # still at the cap
    for c in chains[:2]:
        cache.acquire(c)
        cache.release(c)
    for c in chains[2:]:
        while cache.cached(c) is None:
            await asyncio.wait_for(ready.wait(), 10)
            ready.clear()
        cache.acquire(c)
        assert c.hit_tokens == 8
        cache.release(c)
    assert cache.stats().blocks_pinned == 0
    cache.close(spill=False)


def test_a_flush_drops_writes_still_queued_for_its_scope(tmp_path):
    t1, t2 = Namespace("fake-model", "tenant:a"), Namespace("fake-model", "tenant:b")
    codec = GatedCodec()
    d = DiskTier(str(tmp_path), codec, BS, 1 << 30)
    cache = PrefixCache(BlockPool(BS, 1 << 20), d)
    fill(cache, t1, list(range(1, 9)), TIER_SYSTEM)  # queued behind a held codec
    fill(cache, t2, list(range(1, 9)), TIER_SYSTEM)
    assert codec.entered.wait(60)
    assert files(tmp_path) == []  # nothing written yet: all four still queued or held
    assert cache.reset(Scope(salt="tenant:a"))
    codec.release.set()
    d.flush()
    assert not codec.timed_out
    assert d.stats().files == 2 == d.stats(Scope(salt="tenant:b")).files
    assert {os.path.basename(os.path.dirname(f)) for f in files(tmp_path)} == \
        {t2.root_key().hex()}
    assert d._resets == []  # nothing left queued: the flush record is gone too
    cache.close(spill=False)


async def test_a_request_aborted_while_its_blocks_load_leaks_no_pin(tmp_path):
    prompt = list(range(1, 30))
    cache = PrefixCache(BlockPool(BS, 1 << 20), disk(tmp_path))
    fill(cache, NS, prompt[:28], TIER_SYSTEM)
    cache.close(spill=False)
    gen = FakeGenerator(block_size=BS)
    codec = GatedCodec(encode=False, decode=True)
    cache = PrefixCache(BlockPool(BS, 1 << 20), DiskTier(str(tmp_path), codec, BS, 1 << 30))
    sched = Scheduler(gen, cache, SchedulerConfig())
    sched.start()
    stream = sched.submit(Request(prompt, SamplingParams(max_tokens=3)))
    assert await asyncio.to_thread(codec.entered.wait, 60)  # its load has begun, held
    assert sched.num_waiting == 1 and gen.inserted == []  # waiting for its disk blocks
    stream.cancel()
    codec.release.set()  # the load finishes after the abort
    await until(lambda: len(cache.pool) == 7, "the loaded blocks reach RAM")
    assert not codec.timed_out
    assert cache.stats().blocks_pinned == 0 and gen.inserted == []
    outs = [o async for o in sched.submit(Request(prompt, SamplingParams(max_tokens=3)))]
    assert outs[-1].finish_reason == "length" and outs[-1].usage.cached_tokens == 28
    assert [t for o in outs for t in o.token_ids] == expected(prompt, 3)
    assert cache.stats().blocks_pinned == 0
    cache.close(spill=False)
