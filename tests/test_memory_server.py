"""The memory limit over HTTP: a 503 with Retry-After while the process is over it (and
/health saying why) while running streams finish, a 400 that says what a prompt that
can never fit needs, the split in /metrics, and max_tokens that defaults to what the
context allows."""

import asyncio
import json
import socket
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from blockserve.engine.runtime.memory import resident_bytes
from blockserve.engine.runtime.worker import EngineWorker
from blockserve.scheduler.memory import KV_ALLOC_STEP
from tests.server_harness import metrics, serve

MODEL = "demo:tiny"
CHAT = [{"role": "user", "content": "Count the blocks of the cache, one by one."}]


@pytest.fixture(scope="module")
def worker():
    w = EngineWorker(MODEL, block_size=16, max_running=4)
    yield w
    w.close()


def headroom_limit(worker, kv_bytes: int) -> int:
    """A limit that leaves about ``kv_bytes`` of K/V beside what this process holds now
    (the test process's resident set, larger than the engine's own at load)."""
    m = worker.memory
    held = max(resident_bytes(), m.weights_bytes + m.baseline_bytes)
    # A step's activations, and as much again for MLX's buffer cache.
    return held + 2 * worker.activation_reserve(worker.max_context) + kv_bytes


async def _post(s, url, body):
    async with s.post(url + "/v1/chat/completions", json=body) as r:
        return r.status, dict(r.headers), await r.json()


async def test_over_the_limit_new_requests_get_503_and_running_streams_finish(worker):
    limit = headroom_limit(worker, 64 << 20)
    async with serve(worker, memory_limit=limit) as srv, aiohttp.ClientSession() as s:
        body = {"messages": CHAT, "max_tokens": 4, "temperature": 0}
        status, _, _ = await _post(s, srv.url, body)
        assert status == 200
        async with s.post(srv.url + "/v1/chat/completions", json={
                **body, "max_tokens": 60, "stream": True, "ignore_eos": True}) as stream:
            first = await stream.content.readline()
            assert first.startswith(b"data: ")
            # Memory held by someone else (here: this process), touched so it is resident.
            hog = np.ones((limit - resident_bytes() + (64 << 20)) // 8)
            assert resident_bytes() > limit  # the premise
            status, headers, err = await _post(s, srv.url, body)
            assert status == 503 and headers["Retry-After"]
            assert err["error"]["code"] == "memory_pressure"
            assert "over its memory limit" in err["error"]["message"]
            async with s.get(srv.url + "/health") as r:
                health = await r.json()
                assert r.status == 503 and health["status"] == "memory_pressure"
                assert "MiB resident" in health["reason"]
            # The stream that was running finishes.
            events = [json.loads(line[6:]) for line in (await stream.read()).split(b"\n")
                      if line.startswith(b"data: {")]
            assert events[-1]["choices"][0]["finish_reason"] == "length"
        del hog
        assert resident_bytes() <= limit  # freed: large buffers go back to the system
        status, _, _ = await _post(s, srv.url, body)
        assert status == 200
        m = await metrics(srv.url)
        assert m["blockserve_memory_pressure_refusals_total"] == 1
        assert m['blockserve_memory_bytes{part="limit"}'] == limit
        assert m['blockserve_memory_bytes{part="weights"}'] == worker.memory.weights_bytes
        async with s.get(srv.url + "/v1/cache/stats") as r:
            stats = await r.json()
        assert stats["memory"]["limit"] == limit and stats["scheduler"]["pressure_refusals"] == 1


async def test_a_prompt_that_can_never_fit_is_a_400_with_what_it_needs(worker):
    cap = 2 * KV_ALLOC_STEP * worker.kv_bytes_per_token  # two allocation steps
    async with serve(worker, active_kv_memory_bytes=cap) as srv, aiohttp.ClientSession() as s:
        long_prompt = [{"role": "user", "content": "block " * 700}]
        status, _, err = await _post(s, srv.url, {"messages": long_prompt, "max_tokens": 2})
        assert status == 400 and err["error"]["code"] == "request_too_large"
        assert "bytes of KV" in err["error"]["message"]
        assert str(cap) in err["error"]["message"]
        status, _, _ = await _post(s, srv.url, {"messages": CHAT, "max_tokens": 2})
        assert status == 200  # the server goes on


async def test_max_tokens_defaults_to_what_the_context_allows(worker):
    async with serve(worker, max_model_len=80, default_max_tokens=None) as srv, \
            aiohttp.ClientSession() as s:
        status, _, reply = await _post(s, srv.url, {"messages": CHAT, "temperature": 0,
                                                    "ignore_eos": True})
        assert status == 200
        usage = reply["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 80
        assert reply["choices"][0]["finish_reason"] == "length"


async def test_max_tokens_cap_bounds_what_a_request_asks(worker):
    async with serve(worker, default_max_tokens=None, max_tokens_cap=5) as srv, \
            aiohttp.ClientSession() as s:
        status, _, reply = await _post(s, srv.url, {"messages": CHAT, "temperature": 0,
                                                    "ignore_eos": True, "max_tokens": 50})
        assert status == 200 and reply["usage"]["completion_tokens"] == 5


def test_a_flood_three_times_the_limit_is_served_exactly_within_it():
    """Subprocess servers (an OOM would kill only them): the flood's replies under a
    limit whose K/V share fits a third of its K/V equal those of a server with room to spare;
    every request completes or is refused with 503/429; the peak resident set stays
    within the limit + 5%."""
    import argparse

    from blockserve.bench import memory_flood

    ap = argparse.ArgumentParser()
    memory_flood.add_args(ap)
    # Prompts within one allocation step, replies that take each to three: whatever
    # the limit admits at first must grow past it, so something is preempted.
    with socket.socket() as a, socket.socket() as b:  # two free ports, side by side
        a.bind(("127.0.0.1", 0))
        port = a.getsockname()[1]
        b.bind(("127.0.0.1", port + 1))
    args = ap.parse_args(["--clients", "8", "--prompt-words", "100", "--reply-tokens",
                          "600", "--port", str(port), "--timeout", "600"])
    free, pressured = asyncio.run(memory_flood.run(args))
    report = memory_flood.report(free, pressured)
    assert set(pressured.statuses) <= {200, 429, 503}, report
    assert free.statuses == {200: 8}, report
    assert pressured.preemptions >= 1, report  # the premise: the limit bit
    done = [(a, b) for a, b in zip(free.texts, pressured.texts) if b is not None]
    assert done and all(a == b for a, b in done), report
    assert pressured.peak_rss_bytes <= 1.05 * pressured.limit_bytes, report


async def test_a_codex_turn_with_a_long_reply_is_not_cut_short():
    """Codex sends no max_output_tokens: a 1,500-token reply comes back whole (the old
    default of 512 cut it off ``incomplete``)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from blockserve.engine.models.loader import resolve
    from tests.server_harness import serve_scripted

    tokenizer = load_tokenizer(Path(resolve(MODEL)[1]))
    reply = " ".join(f"line {i}: the block cache keeps value {i * 7}." for i in range(160))
    n_tokens = len(tokenizer.encode(reply, add_special_tokens=False))
    assert n_tokens > 1500  # the premise
    async with serve_scripted(tokenizer, MODEL, [reply], max_context=8192,
                              default_max_tokens=None) as (url, _, _, _), \
            aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/responses", json={
                "model": MODEL, "input": "Write the lines.", "stream": False}) as r:
            body = await r.json()
    assert body["status"] == "completed", body.get("incomplete_details")
    assert body["usage"]["output_tokens"] >= n_tokens
    text = "".join(c["text"] for item in body["output"] if item["type"] == "message"
                   for c in item["content"])
    assert text == reply
