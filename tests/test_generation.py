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
