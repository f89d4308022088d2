"""Preemption on real (tiny) models: a sequence parked to keep the memory limit resumes
from the prefix cache and generates exactly the tokens it would have unpreempted, on
the ragged runner with speculation, and on mlx-lm's BatchGenerator for the hybrid and
sliding-window families; greedy and seeded."""

import asyncio

import pytest
from mlx_lm.utils import load

from blockserve.engine.models.loader import resolve
from blockserve.engine.runtime.worker import EngineWorker
from blockserve.scheduler import Request, SamplingParams
from blockserve.scheduler.memory import KV_ALLOC_STEP
from tests.engine_harness import assert_idle, make_scheduler, reference_tokens

BS = 16
N = 300  # past 256 positions: each sequence needs a second allocation step


@pytest.fixture(scope="module", params=["demo:tiny-qwen3", "demo:tiny-qwen3_next",
                                        "demo:tiny-gemma3_text"])
def engine_pair(request):
    worker = EngineWorker(request.param, block_size=BS, max_running=4)
    ref_model, _ = load(resolve(request.param)[1])
    yield worker, ref_model
    worker.close()


def capped(worker):
    """A scheduler whose running requests may hold three allocation steps of K/V: two
    sequences start in one each, and the second to need another is parked."""
    return make_scheduler(worker, active_kv_memory_bytes=3 * KV_ALLOC_STEP
                          * worker.kv_bytes_per_token)


async def _tokens(sched, prompt, sampling):
    outs = [o async for o in sched.submit(Request(list(prompt), sampling))]
    assert outs[-1].finish_reason == "length", outs[-1]
    return [t for o in outs for t in o.token_ids]


async def test_a_preempted_sequence_resumes_exactly(engine_pair):
    worker, ref_model = engine_pair
    sched = capped(worker)
    prompts = [list(range(5, 45)), list(range(100, 137))]
    greedy = SamplingParams(max_tokens=N, ignore_eos=True)
    got = await asyncio.gather(*(_tokens(sched, p, greedy) for p in prompts))
    assert sched.stats.preemptions >= 1  # the premise: someone was parked
    assert sched.stats.resumed_cached_tokens > 0  # and came back by a cache hit
    for p, tokens in zip(prompts, got):
        assert tokens == reference_tokens(ref_model, p, N)
    assert_idle(sched, worker)
    assert worker.run_sync(lambda _: len(worker._parked)) == 0


async def test_a_seeded_preempted_sequence_draws_what_it_would_have(engine_pair):
    worker, _ = engine_pair
    prompts = [list(range(7, 40)), list(range(200, 230))]
    sampled = [SamplingParams(max_tokens=N, ignore_eos=True, temperature=1.0, seed=s)
               for s in (3, 4)]
    free = make_scheduler(worker)
    expected = await asyncio.gather(*(_tokens(free, p, s) for p, s in zip(prompts, sampled)))
    assert free.stats.preemptions == 0
    sched = capped(worker)
    got = await asyncio.gather(*(_tokens(sched, p, s) for p, s in zip(prompts, sampled)))
    assert sched.stats.preemptions >= 1
    assert got == expected
    assert_idle(sched, worker)


def test_the_engine_measures_what_it_holds(engine_pair):
    worker, _ = engine_pair
    m = worker.memory
    assert m.weights_bytes > 0 and m.baseline_bytes > 0
    assert m.activation.per_token > 0  # a forward's projections and logits
    assert worker.activation_reserve(4096) > worker.activation_reserve(16)
