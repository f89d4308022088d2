"""One sequence's failure is its own: the engine charges it to that sequence, rebuilds
the batch for the others (who go on with exactly their tokens), and a dead engine
thread ends every request and tells the scheduler, never hangs it."""

import asyncio

import pytest

import blockserve.engine.runtime.sampling as sampling
from blockserve.engine.models.loader import load_weights
from blockserve.engine.runtime.worker import EngineWorker
from blockserve.scheduler import Request, SamplingParams
from tests.engine_harness import (EngineHold, assert_idle, greedy, make_scheduler,
                                  reference_tokens, token_of)

MODEL = "demo:tiny"
VICTIM = [5, 17, 99, 3, 250, 12, 8, 40, 7, 61, 33, 2, 90, 14, 77, 21, 6, 18]


@pytest.fixture(scope="module", params=["ragged", "batch"])
def worker(request):
    """Both runners: ours (ragged batches) and mlx-lm's BatchGenerator, the fallback."""
    w = EngineWorker(MODEL, block_size=16, max_running=8, runner=request.param)
    assert w.runner == request.param
    yield w
    w.close()


@pytest.fixture(scope="module")
def ref_model():
    return load_weights(MODEL).model


async def _collect(sched, req):
    """(tokens, final output) of ``req``."""
    outs = [o async for o in sched.submit(req)]
    return [t for o in outs for t in o.token_ids], outs[-1]


def _victim_decoding(sched, worker, n):
    """The victim's request, and a hold of the engine thread just after its first
    token: it is decoding (past its prompt) and far from its ``n`` tokens, whatever the
    machine's load, when the culprit joins."""
    req = Request(list(VICTIM), greedy(n))
    hold = EngineHold.after(worker, token_of(req.request_id))
    return req, hold


def _decoding_then(worker, victim_id, n):
    """On the engine thread: is the victim in the batch, decoding, with tokens to go?"""
    seqs = [s for uid, s in worker._seqs.items() if s.spec.seq_id == victim_id]
    return (len(seqs) == 1 and 0 < len(seqs[0].tokens) < n
            and worker._uids[victim_id] not in worker._fresh)


async def test_a_raising_sampler_fails_its_sequence_alone(worker, ref_model, monkeypatch):
    real = sampling.apply_min_p
    shared = []  # on the culprit's first sample: was the victim decoding in its batch?

    def min_p(logprobs, p):
        if abs(p - 0.37) < 1e-9:
            if not shared:
                shared.append(_decoding_then(worker, req.request_id, 40))
            raise ValueError("this sequence's sampler is broken")
        return real(logprobs, p)

    monkeypatch.setattr(sampling, "apply_min_p", min_p)
    sched = make_scheduler(worker)
    req, hold = _victim_decoding(sched, worker, 40)
    victim = asyncio.create_task(_collect(sched, req))
    with hold:
        await hold.wait()
        culprit = sched.submit(Request([1, 2, 3, 4], SamplingParams(
            max_tokens=20, temperature=0.8, min_p=0.37)))
    last = [o async for o in culprit][-1]
    assert last.finish_reason == "error" and "sampler is broken" in last.error
    assert shared == [True], "the culprit's sampler never ran beside the decoding victim"
    tokens, out = await victim
    assert out.finish_reason == "length" and out.error is None
    assert tokens == reference_tokens(ref_model, VICTIM, 40)
    assert_idle(sched, worker)


async def test_a_failed_step_rebuilds_the_batch_and_the_others_go_on_exactly(
        worker, ref_model, monkeypatch):
    """A step that raises fails the sequence that joined it; the victim, mid-decode, is
    resumed from its prompt and generated tokens and ends with mlx-lm's own tokens."""
    runner = type(worker._bg)  # a failed step rebuilds one of the same class
    real_next = runner.next
    poisoned = []

    def next_(self):
        culprits = [s for uid, s in worker._seqs.items()
                    if uid in worker._fresh and s.spec.prompt[0] == 1000]
        if culprits and not poisoned:
            poisoned.append(_decoding_then(worker, req.request_id, 48))
            raise RuntimeError("a poisoned batch step")
        return real_next(self)

    monkeypatch.setattr(runner, "next", next_)
    sched = make_scheduler(worker)
    req, hold = _victim_decoding(sched, worker, 48)
    victim = asyncio.create_task(_collect(sched, req))
    with hold:
        await hold.wait()
        culprit = sched.submit(Request([1000, 2, 3], SamplingParams(max_tokens=8)))
    last = [o async for o in culprit][-1]
    assert poisoned == [True], "the poisoned step never ran with the victim decoding in it"
    assert last.finish_reason == "error" and "poisoned batch step" in last.error
    tokens, out = await victim
    assert out.error is None
    assert tokens == reference_tokens(ref_model, VICTIM, 48)
    assert_idle(sched, worker)


async def test_an_unattributable_failure_never_shows_one_request_another_s_error(
        worker, monkeypatch):
    """With several new sequences in the failed step, none is told the error text (it
    may be another's)."""
    runner = type(worker._bg)
    real_next = runner.next
    calls = []

    def next_(self):
        if len(worker._fresh) >= 2 and not calls:
            calls.append(1)
            raise RuntimeError("secret detail of someone's request")
        return real_next(self)

    monkeypatch.setattr(runner, "next", next_)
    sched = make_scheduler(worker)
    with EngineHold.now(worker) as hold:  # both are inserted before the next step
        await hold.wait()
        a = sched.submit(Request([1, 2, 3], SamplingParams(max_tokens=4)))
        b = sched.submit(Request([4, 5, 6], SamplingParams(max_tokens=4)))
        assert sched.num_running == 2  # both handed to the engine while it is held
    lasts = [[o async for o in s][-1] for s in (a, b)]
    assert calls, "the two requests never were new in one step"
    assert all(o.finish_reason == "error" and "secret" not in o.error for o in lasts)
    assert_idle(sched, worker)


async def test_a_dead_engine_thread_fails_everything_and_is_reported():
    w = EngineWorker(MODEL, block_size=16, max_running=4)
    try:
        sched = make_scheduler(w)

        def die():
            raise SystemExit("the engine thread is gone")  # escapes every except Exception

        w._step = die  # the next step kills the thread
        last = [o async for o in sched.submit(Request([1, 2, 3],
                                                      SamplingParams(max_tokens=4)))][-1]
        assert last.finish_reason == "error" and "engine stopped" in last.error
        await asyncio.wait_for(sched.stopped.wait(), 10)
        assert "the engine thread is gone" in sched.failed
        with pytest.raises(RuntimeError, match="stopped"):
            w.run_sync(lambda m: 0)
    finally:
        w.close()
