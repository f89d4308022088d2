"""Shared helpers for tests that run real tiny models through the scheduler."""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import greedy_sampler

from blockserve.engine.runtime.worker import EngineWorker
from blockserve.scheduler import Request, SamplingParams, Scheduler
from blockserve.scheduler.protocol import EngineEvent, TokenEvent
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


# ---- holding the engine thread at a known point ---------------------------------------

HOLD_TIMEOUT = 120.0  # seconds: far beyond any step here; reached only when a premise broke


class EngineHold:
    """Holds the engine thread at a known point, so a test sets up an overlap by events,
    never by a sleep: ``entered`` is set once the thread is held there, and it stays
    there until ``release()``. Two points:

    - ``EngineHold.now(worker)``: a call queued on the thread, so it is held between two
      steps; requests submitted meanwhile are inserted together before its next step.
    - ``EngineHold.after(worker, predicate)``: right after the thread reports the first
      event for which ``predicate(event)`` is true (e.g. a sequence's k-th token),
      inside that step; the step finishes once released.

    A hold that is never entered fails the test (``wait``), and one never released lets
    the thread go after ``HOLD_TIMEOUT``, so a broken test can't hang the session."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self._release = threading.Event()
        self._thread: threading.Thread | None = None

    def _hold(self) -> None:
        self.entered.set()
        self._release.wait(HOLD_TIMEOUT)

    @classmethod
    def now(cls, worker: EngineWorker) -> "EngineHold":
        hold = cls()
        hold._thread = threading.Thread(target=worker.run_sync,
                                        args=(lambda _: hold._hold(),), daemon=True)
        hold._thread.start()
        return hold

    @classmethod
    def after(cls, worker: EngineWorker, predicate: Callable[[EngineEvent], bool]
              ) -> "EngineHold":
        """Set it after the scheduler started the worker (``make_scheduler``): it wraps
        the listener the worker reports to. Fires once."""
        hold = cls()
        emit = worker._emit
        assert emit is not None, "start the scheduler first"

        def wrapped(event: EngineEvent) -> None:
            emit(event)
            if not hold.entered.is_set() and predicate(event):
                hold._hold()

        worker._emit = wrapped
        return hold

    def wait_sync(self, timeout: float = HOLD_TIMEOUT) -> None:
        assert self.entered.wait(timeout), "the engine thread never reached the hold"

    async def wait(self, timeout: float = HOLD_TIMEOUT) -> None:
        """Until the thread is held (the event loop keeps running meanwhile)."""
        assert await asyncio.to_thread(self.entered.wait, timeout), \
            "the engine thread never reached the hold"

    def release(self) -> None:
        self._release.set()
        if self._thread is not None:
            self._thread.join(HOLD_TIMEOUT)

    def __enter__(self) -> "EngineHold":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def token_of(seq_id: str, k: int = 1) -> Callable[[EngineEvent], bool]:
    """A predicate for ``EngineHold.after``: the k-th token event of ``seq_id``."""
    seen = [0]

    def predicate(event: EngineEvent) -> bool:
        if isinstance(event, TokenEvent) and event.seq_id == seq_id:
            seen[0] += 1
        return seen[0] >= k

    return predicate


async def until(cond: Callable[[], object], what: str, timeout: float = 60.0,
                poll: float = 0.005) -> None:
    """Wait for a state, polled; fail naming ``what`` if it never comes. The timeout is
    a safety net far past any wait here, not a premise."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, f"never happened: {what}"
        await asyncio.sleep(poll)
