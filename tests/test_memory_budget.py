"""The memory limit, seen from the scheduler (fake generator, no MLX): K/V taken on
demand, the prefix cache given what running requests leave, preemption into the cache
with an exact resume, refusals under pressure."""

import asyncio

import pytest

from blockserve.kvpool import TIER_SYSTEM, BlockPool
from blockserve.scheduler import (
    MemoryBudget,
    MemoryPressureError,
    Request,
    RequestTooLargeError,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
)
from blockserve.scheduler.memory import KV_ALLOC_STEP
from tests.fakes import FakeGenerator
from tests.test_scheduler import BS, assert_idle, collect, expected_tokens

BPT = 16  # the fake's K/V bytes a position
STEP = KV_ALLOC_STEP * BPT  # one allocation step of one sequence


def budget(running_steps: int, **kw) -> MemoryBudget:
    """A limit that leaves ``running_steps`` allocation steps of K/V to run in (and a
    one-step margin); no weights, no activations."""
    return MemoryBudget(limit_bytes=(running_steps + 1) * STEP, kv_bytes_per_token=BPT,
                        step_tokens=0, **kw)


def make(memory, footprint=None, max_running=8, **fake_kw):
    gen = FakeGenerator(block_size=BS, kv_bytes_per_token=BPT, **fake_kw)
    pool = BlockPool(BS, budget_bytes=memory.cache_budget(0))
    sched = Scheduler(gen, pool, SchedulerConfig(max_running=max_running, memory=memory,
                                                 footprint=footprint))
    sched.start()
    return sched, gen, pool


def test_the_split_counts_weights_activations_and_allocation_steps():
    m = MemoryBudget(limit_bytes=10 << 20, weights_bytes=4 << 20, baseline_bytes=1 << 20,
                     activation_bytes=1 << 20, kv_bytes_per_token=BPT, step_tokens=64,
                     cache_cap_bytes=1 << 20)
    assert m.kv_bytes == 4 << 20
    assert m.margin_bytes == (64 + KV_ALLOC_STEP) * BPT
    assert m.sequence_bytes(0) == m.sequence_bytes(255) == STEP
    assert m.sequence_bytes(256) == 2 * STEP
    assert m.running_limit_bytes == (4 << 20) - m.margin_bytes
    assert m.cache_budget(0) == 1 << 20  # the cap
    assert m.cache_budget(m.running_limit_bytes) == 0  # running requests come first


async def test_kv_on_demand_runs_what_fits_now_not_prompt_plus_max_tokens():
    # Each request holds one allocation step until it grows past 255 positions; the
    # limit leaves three. Reserving prompt + max_tokens (8 + 200) would have admitted
    # one at a time in a budget of 208 positions.
    sched, gen, pool = make(budget(3), token_delay=0.002)
    peak = 0
    emit = gen._emit

    def watch(e):
        nonlocal peak
        peak = max(peak, sched.num_running)
        emit(e)

    gen._emit = watch
    prompts = [[i + 1] * 8 for i in range(5)]
    results = await asyncio.gather(*(collect(sched.submit(
        Request(p, SamplingParams(max_tokens=200)))) for p in prompts))
    for p, (tokens, last) in zip(prompts, results):
        assert last.finish_reason == "length" and tokens == expected_tokens(p, 200)
    assert peak == 3
    assert sched.stats.preemptions == 0
    assert_idle(sched, gen, pool)


@pytest.mark.parametrize("burst", [1, 4], ids=["a token a step", "4 tokens a step"])
@pytest.mark.parametrize("room", ["cache keeps its blocks", "no room left"])
async def test_preemption_parks_the_newest_and_it_resumes_exactly(room, burst):
    # Both start in one allocation step each; past 255 positions each needs a second,
    # and the running requests may hold three steps, so the newest is parked and waits
    # at the head of the queue. With a running cap inside a larger limit, the cache
    # keeps its blocks and it resumes by a hit; with the limit itself at three steps,
    # the cache's budget is what the first leaves (nothing), so it recomputes: exact
    # either way. Tokens that come several to a step (speculation) grow K/V alike.
    memory = (budget(64, running_cap_bytes=3 * STEP) if room == "cache keeps its blocks"
              else budget(3))
    sched, gen, pool = make(memory, token_delay=0.001, burst=burst)
    first, second = [1] * 8, [2] * 8
    a = sched.submit(Request(first, SamplingParams(max_tokens=400)))
    b = sched.submit(Request(second, SamplingParams(max_tokens=400)))
    (ta, la), (tb, lb) = await asyncio.gather(collect(a), collect(b))
    assert gen.preempted == [b.request_id]  # the premise: the newest was preempted
    assert sched.stats.preemptions == 1
    assert ta == expected_tokens(first, 400) and tb == expected_tokens(second, 400)
    assert la.finish_reason == lb.finish_reason == "length"
    assert lb.usage.completion_tokens == 400 and lb.usage.prompt_tokens == 8
    resumed = [s for s in gen.inserted if s.seq_id == b.request_id and s.resume]
    assert len(resumed) == 1
    assert sched.stats.resumed_cached_tokens == resumed[0].cached_tokens
    if room == "cache keeps its blocks":
        assert resumed[0].cached_tokens > 200  # a hit on what it had computed
    else:
        assert resumed[0].cached_tokens == 0
    assert_idle(sched, gen, pool)


async def test_a_preempted_request_aborted_while_parked_frees_everything():
    sched, gen, pool = make(budget(3), token_delay=0.001)
    a = sched.submit(Request([1] * 8, SamplingParams(max_tokens=600)))
    b = sched.submit(Request([2] * 8, SamplingParams(max_tokens=600)))
    # Read b until the scheduler has parked it (its stream pauses, it waits again).
    async for _ in b:
        if b.request_id in gen.preempted:
            break
    for _ in range(100):  # the loop's turns until the engine's event is handled
        if sched.num_waiting:
            break
        await asyncio.sleep(0)
    assert sched.num_waiting == 1 and sched.stats.preemptions == 1
    assert sched.abort(b.request_id)
    assert b.request_id in gen.aborted  # the engine drops the parked sequence
    await collect(a)
    assert_idle(sched, gen, pool)


async def test_a_lone_request_that_outgrows_the_limit_ends_with_length():
    sched, gen, pool = make(budget(1))
    tokens, last = await collect(sched.submit(Request([1] * 8, SamplingParams(
        max_tokens=1000))))
    assert last.finish_reason == "length"
    assert len(tokens) < 1000  # the limit, not max_tokens, ended it
    assert tokens == expected_tokens([1] * 8, len(tokens))
    assert_idle(sched, gen, pool)


async def test_a_prompt_that_can_never_fit_is_refused_with_its_size():
    sched, gen, pool = make(budget(1))
    with pytest.raises(RequestTooLargeError, match=r"300 tokens need 8192 bytes"):
        sched.submit(Request([1] * 300))
    tokens, _ = await collect(sched.submit(Request([1] * 8, SamplingParams(max_tokens=3))))
    assert len(tokens) == 3  # the server goes on
    assert_idle(sched, gen, pool)


async def test_over_the_limit_new_requests_are_refused_and_running_ones_finish():
    resident = [0]
    sched, gen, pool = make(budget(4), footprint=lambda: resident[0], token_delay=0.001)
    running = sched.submit(Request([1] * 8, SamplingParams(max_tokens=30)))
    first = await running.__anext__()
    assert first.token_ids
    resident[0] = sched.config.memory.limit_bytes + 1  # another allocation, a leak
    assert "over its memory limit" in sched.memory_pressure()
    with pytest.raises(MemoryPressureError, match="over its memory limit"):
        sched.submit(Request([2] * 8))
    assert sched.stats.pressure_refusals == 1
    tokens, last = await collect(running)
    assert last.finish_reason == "length" and len(tokens) == 29  # the first came above
    resident[0] = 0
    assert sched.memory_pressure() is None
    tokens, _ = await collect(sched.submit(Request([2] * 8, SamplingParams(max_tokens=2))))
    assert len(tokens) == 2
    assert_idle(sched, gen, pool)


async def test_the_prefix_cache_gets_what_running_requests_leave():
    sched, gen, pool = make(budget(4), token_delay=0.001)
    full = pool.budget_bytes
    stream = sched.submit(Request([1] * 8, SamplingParams(max_tokens=20)))
    await stream.__anext__()
    assert pool.budget_bytes == full - STEP  # one running sequence's step
    await collect(stream)
    assert pool.budget_bytes == full  # given back when it ends
    assert_idle(sched, gen, pool)


async def test_preempting_a_request_others_wait_on_lets_them_go_on():
    # C grows past its first step; A, the newest, is prefilling a prefix that B waits
    # for (in-flight sharing). A is parked: B must not wait for blocks nobody computes.
    sched, gen, pool = make(budget(64, running_cap_bytes=3 * STEP), token_delay=0.001,
                            prefill_delay=0.005)
    prefix = list(range(300, 492))  # 192 tokens, a system checkpoint at its end
    c = sched.submit(Request([7] * 8, SamplingParams(max_tokens=400)))
    first = (await c.__anext__()).token_ids  # C runs before A and B arrive
    a = sched.submit(Request(prefix + [1] * 8, SamplingParams(max_tokens=20),
                             checkpoints=[(192, TIER_SYSTEM)]))
    b = sched.submit(Request(prefix + [2] * 8, SamplingParams(max_tokens=20),
                             checkpoints=[(192, TIER_SYSTEM)]))
    results = await asyncio.gather(collect(c), collect(a), collect(b))
    results[0] = (first + results[0][0], results[0][1])
    assert a.request_id in gen.preempted  # the premise
    for stream, prompt, (tokens, last) in zip((c, a, b), ([7] * 8, prefix + [1] * 8,
                                                          prefix + [2] * 8), results):
        n = 400 if stream is c else 20
        assert last.finish_reason == "length" and tokens == expected_tokens(prompt, n)
    assert_idle(sched, gen, pool)


async def test_siblings_of_one_prompt_are_preempted_and_resume_exactly():
    # n = 2: two choices share the prompt's blocks; the newer one is parked.
    sched, gen, pool = make(budget(3), token_delay=0.001)
    prompt = list(range(40, 60))
    streams = [sched.submit(Request(prompt, SamplingParams(max_tokens=400),
                                    share_prompt=True)) for _ in range(2)]
    (t1, _), (t2, _) = await asyncio.gather(*(collect(s) for s in streams))
    assert gen.preempted == [streams[1].request_id]
    assert t1 == t2 == expected_tokens(prompt, 400)
    assert_idle(sched, gen, pool)


async def test_a_preempted_sequences_blocks_go_to_the_disk_tier_and_it_resumes_there(
        tmp_path):
    from blockserve.kvpool import DiskTier, PrefixCache
    from tests.fakes import FakeCodec

    memory = budget(4)
    gen = FakeGenerator(block_size=BS, kv_bytes_per_token=BPT, token_delay=0.001)
    disk = DiskTier(str(tmp_path), FakeCodec(), BS, 1 << 30)
    cache = PrefixCache(BlockPool(BS, memory.cache_budget(0)), disk)
    sched = Scheduler(gen, cache, SchedulerConfig(max_running=4, memory=memory))
    sched.start()
    try:
        # B is parked when A passes 512 positions; as A grows on, the cache's budget
        # goes to zero and B's blocks are evicted to disk, where B's resume finds them.
        a = sched.submit(Request([1] * 8, SamplingParams(max_tokens=1000)))
        b = sched.submit(Request([2] * 8, SamplingParams(max_tokens=600)))
        (ta, _), (tb, _) = await asyncio.gather(collect(a), collect(b))
        assert gen.preempted == [b.request_id]
        assert ta == expected_tokens([1] * 8, 1000) and tb == expected_tokens([2] * 8, 600)
        resumed = [s for s in gen.inserted if s.seq_id == b.request_id and s.resume]
        assert resumed[0].cached_tokens > 0
        assert disk.stats().hit_tokens >= resumed[0].cached_tokens > 0
        assert_idle(sched, gen, cache.pool)
    finally:
        cache.close(spill=False)
