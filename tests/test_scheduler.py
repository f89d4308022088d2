"""Scheduler tests with the fake generator: no MLX, scripted tokens and timing."""

import asyncio

import pytest

from blockserve.kvpool import TIER_CONVERSATION, TIER_SYSTEM, BlockPool
from blockserve.scheduler import (
    PromptTooLongError,
    QueueFullError,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    SchedulerError,
)
from tests.fakes import FakeGenerator, next_token

BS = 4


def make(config=None, **fake_kw):
    gen = FakeGenerator(block_size=BS, **fake_kw)
    pool = BlockPool(BS, budget_bytes=1 << 20)
    sched = Scheduler(gen, pool, config or SchedulerConfig())
    sched.start()
    return sched, gen, pool


def expected_tokens(prompt, n):
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(next_token(ctx))
    return ctx[len(prompt):]


async def collect(stream):
    outs = [o async for o in stream]
    tokens = [t for o in outs for t in o.token_ids]
    return tokens, outs[-1]


def assert_idle(sched, gen, pool):
    s = pool.stats()
    assert s.blocks_pinned == 0 and s.blocks_pinned + s.blocks_cached == len(pool)
    assert gen.active == 0
    assert sched.num_running == 0 and sched.num_waiting == 0


async def test_usage_counts_and_a_full_hit():
    sched, gen, pool = make()
    prompt = list(range(1, 19))  # 18 tokens: 4 full blocks are hittable
    tokens, last = await collect(sched.submit(Request(prompt, SamplingParams(max_tokens=5))))
    assert tokens == expected_tokens(prompt, 5)
    assert last.finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.cached_tokens,
            last.usage.completion_tokens) == (18, 0, 5)
    tokens2, last2 = await collect(sched.submit(Request(prompt, SamplingParams(max_tokens=5))))
    assert tokens2 == tokens
    assert last2.usage.cached_tokens == 16  # (18 - 1) // 4 * 4: one token is recomputed
    assert gen.inserted[-1].cached_tokens == 16
    assert sched.stats.prefill_tokens == 18 + 2
    assert_idle(sched, gen, pool)


async def test_stop_token_and_next_turn_hits_generated_blocks():
    sched, gen, pool = make()
    prompt = [5] * 10
    reply = expected_tokens(prompt, 8)
    tokens, last = await collect(sched.submit(Request(prompt, SamplingParams(max_tokens=8))))
    # The next turn includes the reply: the blocks of prompt + reply (minus the last,
    # never-fed token) were published at finish.
    turn2 = prompt + reply + [7, 7, 7]
    _, last2 = await collect(sched.submit(Request(turn2, SamplingParams(max_tokens=2))))
    assert last2.usage.cached_tokens == (len(prompt) + len(reply) - 1) // BS * BS
    stop_at = reply[3]
    _, last3 = await collect(sched.submit(
        Request(prompt, SamplingParams(max_tokens=8, stop_token_ids=(stop_at,)))))
    assert last3.finish_reason == "stop" and last3.usage.completion_tokens == 4
    assert_idle(sched, gen, pool)


@pytest.mark.parametrize("order", ["finish", "prefix"])
async def test_admission_order_between_a_long_hit_and_a_short_prompt(order):
    """"finish" takes the least prefill left after the hit; "prefix" the longest hit."""
    sched, gen, pool = make(SchedulerConfig(max_running=1, order=order), token_delay=0.001)
    hot = list(range(100, 132))
    await collect(sched.submit(Request(hot + [1], SamplingParams(max_tokens=1))))
    blocker = sched.submit(Request([9] * 8, SamplingParams(max_tokens=5)))
    long = sched.submit(Request(hot + [2] * 160, SamplingParams(max_tokens=1)))  # 160 left
    short = sched.submit(Request([3] * 6, SamplingParams(max_tokens=1)))  # 6 left
    few = sched.submit(Request([4] * 6, SamplingParams(max_tokens=2)))  # 6 left, 2 tokens
    more = sched.submit(Request([5] * 6, SamplingParams(max_tokens=9)))  # 6 left, 9 tokens
    await asyncio.gather(*(collect(s) for s in (blocker, long, short, few, more)))
    order_seen = [s.seq_id for s in gen.inserted[2:]]
    if order == "finish":
        expected = [short, few, more, long]
    else:
        expected = [long, short, few, more]  # then arrival order among the misses
    assert order_seen == [s.request_id for s in expected]
    assert_idle(sched, gen, pool)


async def test_admission_prefers_the_longest_cached_prefix():
    sched, gen, pool = make(SchedulerConfig(max_running=1), token_delay=0.001)
    long_prefix = list(range(100, 132))
    await collect(sched.submit(Request(long_prefix + [1], SamplingParams(max_tokens=1))))
    blocker = sched.submit(Request([9] * 8, SamplingParams(max_tokens=5)))
    miss = sched.submit(Request([50] * 20, SamplingParams(max_tokens=1)))
    short = sched.submit(Request(long_prefix[:8] + [3] * 12, SamplingParams(max_tokens=1)))
    long = sched.submit(Request(long_prefix + [2] * 4, SamplingParams(max_tokens=1)))
    await asyncio.gather(*(collect(s) for s in (blocker, miss, short, long)))
    order = [s.seq_id for s in gen.inserted[1:]]
    assert order == [blocker.request_id, long.request_id, short.request_id, miss.request_id]
    assert_idle(sched, gen, pool)


async def test_aging_bounds_how_often_a_request_is_overtaken():
    limit = 3
    sched, gen, pool = make(SchedulerConfig(max_running=1, aging_limit=limit),
                            token_delay=0.001)
    hot = list(range(200, 240))
    await collect(sched.submit(Request(hot + [0], SamplingParams(max_tokens=1))))
    blocker = sched.submit(Request([1] * 8, SamplingParams(max_tokens=3)))
    victim = sched.submit(Request([2] * 8, SamplingParams(max_tokens=1)))  # never hits
    streams = [blocker, victim]
    # Keep a steady supply of requests that hit the hot prefix, as a busy server would.
    for i in range(12):
        streams.append(sched.submit(Request(hot + [i + 10], SamplingParams(max_tokens=1))))
    await asyncio.gather(*(collect(s) for s in streams))
    order = [s.seq_id for s in gen.inserted[1:]]
    overtakes = order.index(victim.request_id) - 1  # admitted after the blocker
    assert overtakes == limit
    # Without aging the victim would have gone last.
    assert order.index(victim.request_id) < len(order) - 1
    assert_idle(sched, gen, pool)


async def test_queue_overflow_and_size_limits_raise_typed_errors():
    sched, gen, pool = make(SchedulerConfig(max_running=1, max_queue=2),
                            token_delay=0.01, max_context=512)
    streams = [sched.submit(Request([i] * 5, SamplingParams(max_tokens=2))) for i in range(3)]
    with pytest.raises(QueueFullError, match="queue is full"):
        sched.submit(Request([7] * 5))
    with pytest.raises(PromptTooLongError, match="512"):
        sched.submit(Request([1] * 512))
    with pytest.raises(SchedulerError, match="empty"):
        sched.submit(Request([]))
    await asyncio.gather(*(collect(s) for s in streams))
    # The scheduler keeps serving after each error.
    tokens, last = await collect(sched.submit(Request([3] * 6, SamplingParams(max_tokens=2))))
    assert len(tokens) == 2 and last.finish_reason == "length"
    assert_idle(sched, gen, pool)


async def test_max_tokens_is_clamped_to_the_context():
    sched, gen, pool = make(max_context=20)
    _, last = await collect(sched.submit(Request([1] * 15, SamplingParams(max_tokens=100))))
    assert last.usage.completion_tokens == 5


@pytest.mark.parametrize("stage", ["waiting", "prefilling", "decoding"])
async def test_abort_in_every_stage_frees_everything(stage):
    sched, gen, pool = make(SchedulerConfig(max_running=1),
                            prefill_delay=0.002, token_delay=0.01)
    shared = list(range(40))
    await collect(sched.submit(Request(shared + [1], SamplingParams(max_tokens=1))))
    blocks_before = len(pool)
    blocker = sched.submit(Request([3] * 6, SamplingParams(max_tokens=3)))
    victim = sched.submit(Request(shared + [2] * 30, SamplingParams(max_tokens=50),
                                  checkpoints=[(40, TIER_SYSTEM)]))
    held = gen.hold_prefill(victim.request_id) if stage == "prefilling" else None
    if stage == "waiting":
        assert sched.num_waiting == 1
        assert sched.abort(victim.request_id)
    else:
        await collect(blocker)
        assert victim.request_id in {s.seq_id for s in gen.inserted}
        assert pool.stats().blocks_pinned == 10  # its shared prefix hit is pinned
        if stage == "prefilling":
            await asyncio.wait_for(held.wait(), 60)
        else:
            first = await victim.__anext__()
            assert first.token_ids
        assert gen.stage[victim.request_id] == stage  # aborted in the stage it names
        assert sched.abort(victim.request_id)
        assert victim.request_id in gen.aborted
    outs = [o async for o in victim]
    assert outs[-1].finish_reason == "abort"
    await asyncio.sleep(0.05)  # any late events must be dropped
    if stage == "waiting":
        await collect(blocker)
    # Nothing of the aborted request was published: only the first request's blocks
    # and the blocker's remain.
    victim_blocks = {b.tokens for b in pool.blocks()} & {tuple([2] * 4)}
    assert not victim_blocks
    assert len(pool) <= blocks_before + 2
    assert not sched.abort(victim.request_id)  # already gone
    assert_idle(sched, gen, pool)


async def test_inflight_sharing_prefills_a_shared_system_prompt_once():
    sched, gen, pool = make(SchedulerConfig(max_running=8), prefill_delay=0.0002,
                            token_delay=0.001)
    system = [(i * 7) % 900 + 1 for i in range(1024)]
    users = [[1000 + u] * 20 for u in range(8)]
    streams = [
        sched.submit(Request(system + u, SamplingParams(max_tokens=4),
                             checkpoints=[(len(system), TIER_SYSTEM),
                                          (len(system) + 20, TIER_CONVERSATION)]))
        for u in users
    ]
    results = await asyncio.gather(*(collect(s) for s in streams))
    for u, (tokens, last) in zip(users, results):
        assert tokens == expected_tokens(system + u, 4)
    cached = [r[1].usage.cached_tokens for r in results]
    assert sorted(cached)[0] == 0 and all(c >= 1024 for c in sorted(cached)[1:])
    # The system prompt was computed once, not 8 times.
    assert gen.prefilled_tokens == 1024 + 8 * 20
    assert sched.stats.inflight_shares == 7
    assert_idle(sched, gen, pool)


async def test_without_inflight_sharing_the_burst_prefills_eight_times():
    sched, gen, pool = make(SchedulerConfig(max_running=8, share_inflight=False),
                            prefill_delay=0.0002)
    system = list(range(1, 1025))
    streams = [sched.submit(Request(system + [2000 + u] * 20, SamplingParams(max_tokens=2),
                                    checkpoints=[(1024, TIER_SYSTEM)])) for u in range(8)]
    await asyncio.gather(*(collect(s) for s in streams))
    assert gen.prefilled_tokens == 8 * (1024 + 20)


async def test_a_broken_cached_prefix_is_detected_by_the_fake():
    """The fake's payload check can fail: corrupt a cached block and see the error."""
    sched, gen, pool = make()
    prompt = list(range(1, 19))
    await collect(sched.submit(Request(prompt, SamplingParams(max_tokens=1))))
    pool.blocks()[0].payload.tokens = (0, 0, 0, 0)
    _, last = await collect(sched.submit(Request(prompt, SamplingParams(max_tokens=1))))
    assert last.finish_reason == "error" and "do not match" in last.error
    assert_idle(sched, gen, pool)


async def test_cache_salt_isolates_tenants():
    sched, gen, pool = make()
    prompt = list(range(1, 19))
    await collect(sched.submit(Request(prompt, SamplingParams(max_tokens=1), cache_salt="a")))
    _, other = await collect(sched.submit(
        Request(prompt, SamplingParams(max_tokens=1), cache_salt="b")))
    _, same = await collect(sched.submit(
        Request(prompt, SamplingParams(max_tokens=1), cache_salt="a")))
    assert other.usage.cached_tokens == 0 and same.usage.cached_tokens == 16


async def test_reset_cache_is_refused_while_requests_hold_blocks():
    sched, gen, pool = make(token_delay=0.01)
    prompt = list(range(1, 19))
    await collect(sched.submit(Request(prompt, SamplingParams(max_tokens=1))))
    s = sched.submit(Request(prompt, SamplingParams(max_tokens=3)))
    assert sched.num_running == 1 and pool.stats().blocks_pinned > 0  # its hit, pinned
    assert sched.reset_cache() is False
    await collect(s)
    assert sched.reset_cache() is True and len(pool) == 0


async def test_shutdown_aborts_everything_and_refuses_new_work():
    sched, gen, pool = make(token_delay=0.01)
    s = sched.submit(Request([1] * 8, SamplingParams(max_tokens=100)))
    assert (await s.__anext__()).token_ids  # it is generating, 99 tokens to go
    assert sched.num_running == 1
    sched.shutdown()
    _, last = await collect(s)
    assert last.finish_reason == "abort" and gen.aborted == [s.request_id]
    with pytest.raises(Exception, match="shutting down"):
        sched.submit(Request([1] * 8))
    assert_idle(sched, gen, pool)


async def test_models_with_state_layers_resume_only_from_snapshots():
    """For SSM / sliding-window models a hit must end on a block with a snapshot; the
    scheduler adds a checkpoint at the prompt's last full block so repeats can hit."""
    sched, gen, pool = make(needs_snapshots=True)
    prompt = list(range(1, 23))  # 22 tokens: blocks end at 4, 8, ..., 20
    _, first = await collect(sched.submit(Request(prompt, SamplingParams(max_tokens=6),
                                                  checkpoints=[(9, TIER_SYSTEM)])))
    assert [c.tokens for c in gen.inserted[0].checkpoints] == [8, 20]
    _, again = await collect(sched.submit(Request(prompt, SamplingParams(max_tokens=2))))
    assert again.usage.cached_tokens == 20  # the end-of-prompt snapshot
    # A longer prompt whose extra blocks came from the finish (no snapshots) resumes
    # from the last snapshot, not from the end of the chain.
    reply = expected_tokens(prompt, 6)
    turn2 = prompt + reply + [9] * 10
    assert pool.cached_prefix_blocks(sched.namespace(None), turn2) == 6
    _, t2 = await collect(sched.submit(Request(turn2, SamplingParams(max_tokens=1))))
    assert t2.usage.cached_tokens == 20 and t2.finish_reason == "length"
    assert_idle(sched, gen, pool)


async def test_a_snapshot_upgrades_a_block_cached_without_one():
    sched, gen, pool = make(needs_snapshots=True)
    prompt = list(range(1, 23))
    reply = expected_tokens(prompt, 10)
    await collect(sched.submit(Request(prompt, SamplingParams(max_tokens=10))))
    # The finish cached blocks up to token 28 without snapshots; the last snapshot is
    # at 20 (the prompt's last full block).
    b = (prompt + reply)[:29]
    _, first = await collect(sched.submit(Request(b, SamplingParams(max_tokens=1))))
    assert first.usage.cached_tokens == 20
    # Its end-of-prompt checkpoint (28) deduplicated against the finish's block and
    # upgraded it with a snapshot, so the same prompt now resumes at 28.
    _, again = await collect(sched.submit(Request(b, SamplingParams(max_tokens=1))))
    assert again.usage.cached_tokens == 28
    assert_idle(sched, gen, pool)


async def test_a_request_hashes_each_block_once(monkeypatch):
    """Keys are computed at submit and handed to lookup and insert (vLLM's
    ``block_hashes``): no block of the prompt is hashed twice."""
    import blockserve.kvpool.hashing as hashing

    calls = []
    real = hashing.digest
    monkeypatch.setattr(hashing, "digest", lambda data: calls.append(data) or real(data))
    sched, gen, pool = make()
    prompt = list(range(1, 23))  # 22 tokens: 5 prompt blocks, blocks at 4 .. 20
    _, last = await collect(sched.submit(Request(prompt, SamplingParams(max_tokens=6),
                                                  checkpoints=[(9, TIER_SYSTEM)])))
    # KV of 22 + 6 - 1 = 27 tokens: 6 full blocks; the root key is one more digest.
    assert last.finish_reason == "length" and len(pool) == 6
    assert len(calls) == 1 + 6
    assert len(set(calls)) == len(calls)
    assert_idle(sched, gen, pool)


# ---- tenants: fair shares, scoped flushes; the engine dying -------------------------------


async def test_one_tenant_filling_every_slot_leaves_one_for_another():
    """A key with 16 unbounded streams can't delay another key's short request: a slot
    is kept for other tenants, and it starts at once."""
    sched, gen, pool = make(SchedulerConfig(max_running=16, tenant_headroom=1),
                             token_delay=0.01)
    hog = [sched.submit(Request([7, i, 1, 2], SamplingParams(max_tokens=10_000),
                                tenant="a")) for i in range(16)]
    assert sched.num_running_of("a") == 15 and sched.num_waiting_of("a") == 1
    short = sched.submit(Request([9, 9, 9], SamplingParams(max_tokens=2), tenant="b"))
    assert sched.num_running_of("b") == 1  # admitted on submit, no wait for a slot
    tokens, last = await collect(short)
    assert sched.num_running_of("a") == 15  # it ran beside the hog's streams
    assert last.finish_reason == "length" and tokens == expected_tokens([9, 9, 9], 2)
    for s in hog:
        s.cancel()
    assert_idle(sched, gen, pool)


async def test_freed_slots_go_round_robin_across_tenants():
    """As slots free, the tenant with the fewest running requests goes first, whatever
    order the requests came in."""
    sched, gen, pool = make(SchedulerConfig(max_running=2), token_delay=0.005)
    streams = [sched.submit(Request([1, i, 3], SamplingParams(max_tokens=3), tenant="a"))
               for i in range(6)]
    streams.append(sched.submit(Request([2, 2, 2], SamplingParams(max_tokens=3),
                                        tenant="b")))
    await asyncio.gather(*(collect(s) for s in streams))
    order = [spec.seq_id for spec in gen.inserted]
    b_id = streams[-1].request_id
    assert order.index(b_id) <= 2  # the first slot that freed, not after a's whole queue
    assert_idle(sched, gen, pool)


async def test_a_tenant_holds_only_its_share_of_the_queue():
    sched, gen, pool = make(SchedulerConfig(max_running=1, max_queue=4), token_delay=0.01)
    streams = [sched.submit(Request([1, i, 3], SamplingParams(max_tokens=50), tenant="a"))
               for i in range(5)]  # one running, four waiting: the queue is full
    with pytest.raises(QueueFullError, match="queue is full"):
        sched.submit(Request([1, 9, 3], tenant="a"))
    # another tenant is under its share: queued even though the queue is full
    streams.append(sched.submit(Request([2, 2, 2], SamplingParams(max_tokens=1),
                                        tenant="b")))
    with pytest.raises(QueueFullError, match="its share of the queue"):
        sched.submit(Request([1, 8, 3], tenant="a"))
    for s in streams:
        s.cancel()
    assert_idle(sched, gen, pool)


async def test_a_scoped_reset_flushes_only_that_tenant():
    sched, gen, pool = make()
    prompt = list(range(1, 19))
    for salt in ("tenant:a", "tenant:a\0salt:x", "tenant:b", "tenant:ab"):
        await collect(sched.submit(Request(prompt, SamplingParams(max_tokens=1),
                                           cache_salt=salt)))
    mine = lambda ns: ns.cache_salt in ("tenant:a", "tenant:a\0salt:x")  # noqa: E731
    blocks, nbytes = pool.usage(mine)
    assert blocks == 8 and nbytes == 8 * 64 and len(pool) == 16
    assert sched.reset_cache(mine) is True
    assert pool.usage(mine) == (0, 0) and len(pool) == 8
    _, b = await collect(sched.submit(Request(prompt, SamplingParams(max_tokens=1),
                                              cache_salt="tenant:b")))
    assert b.usage.cached_tokens == 16  # the other tenant's cache is untouched
    assert_idle(sched, gen, pool)


async def test_when_the_engine_dies_every_request_ends_and_nothing_more_is_taken():
    from blockserve.scheduler.protocol import EngineFailedEvent

    sched, gen, pool = make(SchedulerConfig(max_running=1), token_delay=0.01)
    running = sched.submit(Request([1, 2, 3], SamplingParams(max_tokens=100)))
    waiting = sched.submit(Request([4, 5, 6], SamplingParams(max_tokens=100)))
    assert sched.num_running == 1 and sched.num_waiting == 1
    sched._on_event(EngineFailedEvent("RuntimeError: boom"))
    for s in (running, waiting):
        _, last = await collect(s)
        assert last.finish_reason == "error" and "boom" not in last.error
    assert sched.failed and sched.stopped.is_set()
    with pytest.raises(SchedulerError, match="engine stopped"):
        sched.submit(Request([1, 2, 3]))
    gen.abort(running.request_id)
    assert sched.num_running == 0 and sched.num_waiting == 0
    assert pool.stats().blocks_pinned == 0


async def test_a_step_s_events_come_as_one_list_and_a_stream_s_tokens_as_one_output():
    """The engine hands a step's events over in one call (issue 33): each request's
    tokens in it become one output, in order, with usage counting every token."""
    from blockserve.scheduler.protocol import TokenEvent

    sched, gen, pool = make()
    real = gen._emit
    held: list = []

    def in_steps(event):  # tokens two at a time, the other events flush them first
        held.append(event)
        if not isinstance(event, TokenEvent) or len(held) == 2:
            batch = list(held)
            held.clear()
            real(batch if len(batch) > 1 else batch[0])

    gen._emit = in_steps
    prompt = list(range(1, 10))
    outs = [o async for o in sched.submit(Request(prompt, SamplingParams(max_tokens=5)))]
    tokens = [t for o in outs for t in o.token_ids]
    assert tokens == expected_tokens(prompt, 5)
    assert [len(o.token_ids) for o in outs] == [2, 2, 1, 0]  # the last: the finish
    assert "".join(o.text for o in outs) == "".join(f"<{t}>" for t in tokens)
    assert [o.usage.completion_tokens for o in outs[:3]] == [2, 4, 5]
    assert outs[-1].finish_reason == "length"
    assert_idle(sched, gen, pool)
