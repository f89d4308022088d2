"""Shared helpers for tests that run real tiny models through the scheduler."""

from __future__ import annotations

import asyncio

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import greedy_sampler

from blockserve.engine.runtime.worker import EngineWorker
from blockserve.scheduler import Request, SamplingParams, Scheduler
from blockserve.stack import StackConfig, build_stack


def reference_tokens(model, prompt: list[int], n: int) -> list[int]:
    """mlx-lm's own single-request greedy generation (no stop tokens)."""
    out = []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n, sampler=greedy_sampler):
        out.append(int(tok))
    return out


def make_scheduler(worker: EngineWorker, budget: int = 256 << 20, **config) -> Scheduler:
    """A started scheduler over ``worker``; ``config``: ``StackConfig`` fields."""
    stack = build_stack(StackConfig(**{"block_size": worker.block_size,
                                       "max_num_seqs": worker.max_running,
                                       "kv_cache_memory_bytes": budget, **config}), worker)
    stack.scheduler.start()
    return stack.scheduler


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


async def run(sched: Scheduler, prompt: list[int], n: int, **kw):
    """(tokens, final output) of one request."""
    outs = [o async for o in sched.submit(Request(list(prompt), greedy(n), **kw))]
    assert outs[-1].finish_reason == "length", outs[-1]
    return [t for o in outs for t in o.token_ids], outs[-1]


async def run_many(sched, prompts, n, **kw):
    return await asyncio.gather(*(run(sched, p, n, **kw) for p in prompts))


def assert_idle(sched: Scheduler, worker: EngineWorker) -> None:
    s = sched.pool.stats()
    assert s.blocks_pinned == 0
    assert sched.num_running == 0 and sched.num_waiting == 0
    assert worker.run_sync(lambda m: 0) == 0  # the engine thread is responsive
    assert active_sequences(worker) == (0, 0)


def active_sequences(worker: EngineWorker) -> tuple[int, int]:
    """(sequences the worker tracks, bytes of KV its batch still holds), read on its
    thread: a test's look inside, kept out of the production class."""
    return worker.run_sync(lambda _: (len(worker._seqs), worker._bg.prompt_cache_nbytes))
