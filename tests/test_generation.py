"""Sampling, stop tokens and stop strings through the real engine and scheduler."""

import pytest

from blockserve.engine.runtime.worker import EngineWorker
from blockserve.scheduler import Request, SamplingParams
from tests.engine_harness import assert_idle, make_scheduler


@pytest.fixture(scope="module")
def worker():
    w = EngineWorker("demo:tiny", block_size=16, max_running=8)
    yield w
    w.close()


async def generate(sched, prompt, params):
    outs = [o async for o in sched.submit(Request(prompt, params))]
    return ("".join(o.text for o in outs), [t for o in outs for t in o.token_ids], outs[-1])


async def test_stop_string_spanning_tokens_is_cut_from_the_text(worker):
    sched = make_scheduler(worker)
    prompt = worker.tokenizer.encode("The cache block of the model returns a value")
    text, tokens, last = await generate(sched, prompt, SamplingParams(max_tokens=24,
                                                                      ignore_eos=True))
    pieces = [worker.tokenizer.decode(tokens[:i]) for i in range(len(tokens) + 1)]
    # A stop string that starts inside one token and ends inside a later one.
    boundary = len(pieces[6])
    stop = text[boundary - 1 : boundary + 2]
    assert len(stop) == 3 and stop not in text[: boundary - 1]
    cut, _, last = await generate(sched, prompt, SamplingParams(max_tokens=24, stop=(stop,),
                                                                ignore_eos=True))
    assert last.finish_reason == "stop"
    assert cut == text[: text.index(stop)]
    assert_idle(sched, worker)


async def test_stop_token_ends_generation_without_its_text(worker):
    sched = make_scheduler(worker)
    prompt = worker.tokenizer.encode("Write a function please")
    text, tokens, _ = await generate(sched, prompt, SamplingParams(max_tokens=16,
                                                                   ignore_eos=True))
    k = next(i for i in range(3, 16) if tokens[i] not in tokens[:i])
    cut, cut_tokens, last = await generate(
        sched, prompt,
        SamplingParams(max_tokens=16, stop_token_ids=(tokens[k],), ignore_eos=True))
    assert last.finish_reason == "stop" and cut_tokens == tokens[:k]
    assert last.usage.completion_tokens == k + 1  # the stop token was generated
    assert cut == worker.tokenizer.decode(tokens[:k])
    assert_idle(sched, worker)


async def test_seeded_sampling_is_reproducible(worker):
    sched = make_scheduler(worker)
    prompt = worker.tokenizer.encode("Print the list of values")
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
    _, a, _ = await generate(sched, prompt, p)
    _, b, _ = await generate(sched, prompt, p)
    _, greedy, _ = await generate(sched, prompt, SamplingParams(max_tokens=12,
                                                                ignore_eos=True))
    assert a == b and a != greedy
    assert_idle(sched, worker)


async def test_a_stop_string_completed_by_the_last_allowed_token(worker):
    """The runner ends the sequence for its length on the very token whose text
    completes a stop string: the worker still finishes it once, as a stop."""
    sched = make_scheduler(worker)
    prompt = worker.tokenizer.encode("The cache block of the model returns a value")
    text, tokens, _ = await generate(sched, prompt, SamplingParams(max_tokens=24,
                                                                   ignore_eos=True))
    pieces = [worker.tokenizer.decode(tokens[:i]) for i in range(len(tokens) + 1)]
    k = next(k for k in range(8, 24) if pieces[k + 1][len(pieces[k]):].strip()
             and pieces[k + 1][len(pieces[k]):] not in pieces[k])
    stop = pieces[k + 1][len(pieces[k]):]
    cut, _, last = await generate(sched, prompt, SamplingParams(
        max_tokens=k + 1, stop=(stop,), ignore_eos=True))
    assert last.finish_reason == "stop"
    assert cut == pieces[k + 1][: pieces[k + 1].index(stop)]
    assert_idle(sched, worker)


def test_a_step_s_events_cross_threads_once_and_nothing_follows_a_finish():
    """The engine thread hands each step's events over in one call (issue 33), in order:
    a sequence's tokens, then its finish, and nothing for it after that."""
    import queue as queue_mod

    from blockserve.scheduler import SamplingParams
    from blockserve.scheduler.protocol import FinishEvent, SequenceSpec, TokenEvent

    w = EngineWorker("demo:tiny", block_size=16, max_running=8)
    calls: queue_mod.Queue = queue_mod.Queue()
    try:
        w.start(calls.put)
        for i, n in enumerate((5, 9, 12)):
            w.insert(SequenceSpec(f"s{i}", [3 + i, 7, 11, 13], 0, [], [],
                                  SamplingParams(max_tokens=n, ignore_eos=True)))
        events, lists, finished = [], 0, set()
        while len(finished) < 3:
            call = calls.get(timeout=60)
            lists += isinstance(call, list)
            for e in call if isinstance(call, list) else [call]:
                events.append(e)
                if isinstance(e, FinishEvent):
                    finished.add(e.seq_id)
    finally:
        w.close()
    assert lists > 0  # several streams' tokens share a call
    for i, n in enumerate((5, 9, 12)):
        mine = [e for e in events if e.seq_id == f"s{i}" and
                isinstance(e, (TokenEvent, FinishEvent))]
        assert [type(e) for e in mine] == [TokenEvent] * n + [FinishEvent]
