"""One request must never hurt another: every hostile request of issue 18 is sent from
one tenant's key while another tenant streams, and the victim's streams finish with
exactly their own tokens; each hostile request gets a 4xx that names what is wrong."""

import asyncio
import gzip
import json
import socket

import aiohttp
import pytest

from blockserve.engine.models.loader import load_weights
from blockserve.engine.runtime.worker import EngineWorker
from tests.engine_harness import reference_tokens, until
from tests.server_harness import serve

MODEL = "demo:tiny"
KEY_A, KEY_B, ADMIN = "key-a", "key-b", "key-admin"
VICTIM = [11, 240, 7, 77, 301, 5, 18, 990, 42, 3, 60, 128, 9, 500, 21, 34, 2, 64]
N = 24


@pytest.fixture(scope="module")
def worker():
    w = EngineWorker(MODEL, block_size=16, max_running=8)
    yield w
    w.close()


@pytest.fixture(scope="module")
def expected(worker):
    model = load_weights(MODEL).model
    return worker.tokenizer.decode(reference_tokens(model, VICTIM, N))


def auth(key):
    return {"Authorization": f"Bearer {key}"}


async def post(url, path, body=None, key=KEY_A, data=None, headers=None):
    """(status, parsed JSON or text) of one request."""
    hdrs = {**auth(key), **(headers or {})}
    async with aiohttp.ClientSession() as s:
        kw = {"data": data} if data is not None else {"json": body}
        async with s.post(url + path, headers=hdrs, **kw) as r:
            text = await r.text()
    try:
        return r.status, json.loads(text)
    except json.JSONDecodeError:
        return r.status, text


async def victim_stream(url):
    """One greedy completion streamed by tenant B: its text."""
    body = {"prompt": VICTIM, "max_tokens": N, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text = []
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/completions", json=body, headers=auth(KEY_B)) as r:
            assert r.status == 200
            async for line in r.content:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    text.append(chunk["choices"][0]["text"])
                    if chunk["choices"][0]["finish_reason"]:
                        assert chunk["choices"][0]["finish_reason"] == "length"
    return "".join(text)


def raw(body_text: str) -> bytes:
    return body_text.encode()


def hostile(vocab: int) -> list[tuple[str, dict | None, bytes | None, dict | None, str]]:
    """(path, body, raw bytes, headers, what the 4xx must name) of each attack."""
    chat = [{"role": "user", "content": "hi"}]
    comp = {"max_tokens": 2}
    return [
        ("/v1/completions", {**comp, "prompt": [2147483647]}, None, None, "vocabulary"),
        ("/v1/completions", {**comp, "prompt": [vocab]}, None, None, "vocabulary"),
        ("/v1/completions", {**comp, "prompt": [2**31]}, None, None, "vocabulary"),
        ("/v1/completions", {**comp, "prompt": [-1]}, None, None, "vocabulary"),
        ("/v1/completions", {**comp, "prompt": [1], "logit_bias": {str(vocab): 5}}, None,
         None, "logit_bias"),
        ("/v1/completions", {**comp, "prompt": [1], "stop_token_ids": [vocab + 3]}, None,
         None, "stop_token_ids"),
        ("/v1/completions", {**comp, "prompt": [1], "stop_token_ids": [1] * 1_000_000}, None,
         None, "stop_token_ids"),
        ("/v1/completions", {**comp, "prompt": [1], "stop": ["x"] * 200_000}, None, None,
         "stop"),
        ("/v1/completions", {**comp, "prompt": [1], "stop": ["x" * 100_000]}, None, None,
         "stop"),
        ("/v1/completions", {**comp, "prompt": [1],
                             "guided_choice": [f"o{i}" for i in range(100_000)]}, None, None,
         "guided_choice"),
        ("/v1/chat/completions", {**comp, "messages": chat, "chat_template_kwargs": {
            "chat_template": "{% for i in range(10**9) %}x{% endfor %}"}}, None, None,
         "chat_template"),
        ("/v1/chat/completions", {**comp, "messages": chat, "chat_template_kwargs": {
            "padding": "max_length", "max_length": 5000}}, None, None, "padding"),
        ("/v1/chat/completions", {**comp, "messages": chat, "chat_template_kwargs": {
            "x": ["y" * 100] * 1000}}, None, None, "chat_template_kwargs"),
        ("/v1/completions", {**comp, "prompt": [1], "seed": -1}, None, None, "seed"),
        ("/v1/completions", {**comp, "prompt": [1], "seed": 2**64}, None, None, "seed"),
        ("/v1/completions", None, raw('{"prompt": [1], "max_tokens": ' + "9" * 5000 + "}"),
         None, "JSON"),
        ("/v1/completions", None, raw('{"prompt": [1], "max_tokens": ' + "9" * 40 + "}"),
         None, "max_tokens"),
        ("/v1/completions", None, raw('{"prompt": [1]}'),
         {"Content-Type": "application/json; charset=x-nope"}, "charset"),
        ("/v1/chat/completions", {**comp, "messages": chat, "functions": 5}, None, None,
         "functions"),
        ("/v1/messages", {"max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": 7}]},
            {"role": "user", "content": "go"}]}, None, None, "thinking"),
        ("/v1/completions", None, raw('{"prompt": [1], "max_tokens": 2, '
                                      '"cache_salt": "\\ud800"}'), None, "surrogate"),
        ("/v1/completions", None, raw("[" * 100_000 + "]" * 100_000), None, "nested"),
        ("/detokenize", {"tokens": [-1]}, None, None, "vocabulary"),
        ("/detokenize", {"tokens": [vocab]}, None, None, "vocabulary"),
        ("/tokenize", None, gzip.compress(json.dumps(
            {"prompt": "a" * (60 << 20)}).encode()), {"Content-Encoding": "gzip",
                                                     "Content-Type": "application/json"},
         "after decompression"),
        ("/v1/chat/completions", {**comp, "messages": chat * 30_000}, None, None,
         "--max-messages"),
    ]


async def test_hostile_requests_from_one_tenant_never_reach_another(worker, expected):
    vocab = worker.vocab_size
    async with serve(worker, api_keys=[KEY_A, KEY_B], admin_key=ADMIN,
                     max_model_len=512) as srv:
        assert await victim_stream(srv.url) == expected  # cold; now cached for B
        victims: list[str] = []
        done = asyncio.Event()

        async def keep_streaming():
            while not done.is_set():
                victims.append(await victim_stream(srv.url))

        streaming = asyncio.create_task(keep_streaming())
        for path, body, data, headers, named in hostile(vocab):
            status, err = await post(srv.url, path, body, data=data, headers=headers)
            assert 400 <= status < 500, (path, status, err)
            message = err["error"]["message"]
            assert named in message or named == err["error"].get("param"), (path, message)
        # top_k past the vocabulary means all tokens: served, not a failed batch
        for top_k in (1_000_000, vocab):
            status, ok = await post(srv.url, "/v1/completions",
                                    {"prompt": [1, 2], "max_tokens": 3, "top_k": top_k,
                                     "temperature": 1.0})
            assert status == 200 and ok["choices"][0]["finish_reason"] in ("length", "stop")
        async with aiohttp.ClientSession() as s:  # a tenant sees its own namespace only
            async with s.get(srv.url + "/v1/cache/stats", headers=auth(KEY_A)) as r:
                assert set((await r.json())["pool"]) == {"blocks_stored", "bytes_stored"}
        # (a tenant's reset flushes its own namespace only: the next test)
        done.set()
        await streaming
        assert victims and all(v == expected for v in victims)
        # the admin key sees, and may flush, the whole pool; a tenant key may not
        async with aiohttp.ClientSession() as s:
            async with s.get(srv.url + "/v1/cache/stats", headers=auth(ADMIN)) as r:
                assert "hit_rate" in (await r.json())["pool"]
        status, ok = await post(srv.url, "/v1/cache/reset", {}, key=ADMIN)
        assert status == 200 and ok["scope"] == "all"
        assert srv.scheduler.pool.stats().blocks_stored == 0


async def test_without_an_admin_key_no_tenant_flushes_another(worker):
    async with serve(worker, api_keys=[KEY_A, KEY_B]) as srv:
        body = {"prompt": VICTIM, "max_tokens": 2}
        assert (await post(srv.url, "/v1/completions", body, key=KEY_B))[0] == 200
        before = srv.scheduler.pool.stats().blocks_stored
        status, ok = await post(srv.url, "/v1/cache/reset", {}, key=KEY_A)
        assert status == 200 and ok["scope"] == "tenant"
        assert srv.scheduler.pool.stats().blocks_stored == before
        status, ok = await post(srv.url, "/v1/cache/reset", {}, key=KEY_B)
        assert status == 200 and srv.scheduler.pool.stats().blocks_stored == 0


async def test_masked_logprobs_are_finite_strict_json(worker):
    async with serve(worker) as srv:
        body = {"messages": [{"role": "user", "content": "pick"}], "max_tokens": 8,
                "logprobs": True, "top_logprobs": 5, "guided_choice": ["yes", "no"]}
        async with aiohttp.ClientSession() as s:
            async with s.post(srv.url + "/v1/chat/completions", json=body) as r:
                text = await r.text()

        def refuse(c):
            raise ValueError(f"not strict JSON: {c}")

        reply = json.loads(text, parse_constant=refuse)
        tops = [t["logprob"] for e in reply["choices"][0]["logprobs"]["content"]
                for t in e["top_logprobs"]]
        assert tops and min(tops) == -9999.0  # the grammar masked some of the top five


async def test_a_client_that_stops_reading_is_aborted_and_frees_its_blocks(worker):
    async with serve(worker, stalled_stream_timeout=1.0, max_model_len=60_000) as srv:
        host, port = srv.url[len("http://"):].split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connect: a
        sock.connect((host, int(port)))  # small window, so the server's writes back up
        body = json.dumps({"prompt": VICTIM, "max_tokens": 50_000, "ignore_eos": True,
                           "stream": True, "logprobs": 5}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        for _ in range(600):  # never read: the server's writes stall, then it aborts
            await asyncio.sleep(0.1)
            if srv.scheduler.stats.finished["abort"]:
                break
        assert srv.scheduler.stats.finished["abort"] == 1
        assert srv.scheduler.num_running == 0
        assert srv.scheduler.pool.stats().blocks_pinned == 0
        sock.close()


async def _events(resp) -> list[tuple[str, dict]]:
    events, name = [], None
    async for line in resp.content:
        line = line.decode().strip()
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


async def test_an_anthropic_reply_cut_by_shutdown_never_looks_complete(worker):
    """Running and queued streams end with an error event, not ``end_turn``."""
    async with serve(worker, max_num_seqs=1) as srv:
        body = {"max_tokens": 2000, "stream": True,
                "messages": [{"role": "user", "content": "Write a long story."}]}
        async with aiohttp.ClientSession() as s:
            running = await s.post(srv.url + "/v1/messages", json=body)
            assert (await running.content.readline()).startswith(b"event: message_start")
            queued = asyncio.create_task(s.post(srv.url + "/v1/messages", json=body))
            await until(lambda: srv.scheduler.num_waiting == 1, "the second one waits")
            assert srv.scheduler.num_running == 1
            srv.scheduler.shutdown()
            for resp in (running, await queued):
                events = await _events(resp)
                kinds = [k for k, _ in events]
                assert kinds[-1] == "error" and "message_stop" not in kinds, kinds
                assert events[-1][1]["error"]["type"] == "overloaded_error"
                assert all(d.get("delta", {}).get("stop_reason") != "end_turn"
                           for _, d in events)


async def test_a_key_filling_every_slot_does_not_delay_another_key(worker):
    """Tenant A holds n=8 unbounded streams (every slot of this engine); tenant B's short
    request is admitted at once and finishes while A's streams still run."""
    async with serve(worker, api_keys=[KEY_A, KEY_B], max_num_seqs=8,
                     max_model_len=60_000) as srv:
        hog_body = {"prompt": [1, 2, 3], "max_tokens": 50_000, "ignore_eos": True, "n": 8,
                    "stream": True, "temperature": 1.0}
        async with aiohttp.ClientSession() as s:
            hog = await s.post(srv.url + "/v1/completions", json=hog_body, headers=auth(KEY_A))
            await hog.content.readline()  # A's streams are running
            sched = srv.scheduler
            assert sched.num_running + sched.num_waiting == 8
            status, ok = await asyncio.wait_for(post(
                srv.url, "/v1/completions", {"prompt": VICTIM, "max_tokens": 4}, key=KEY_B),
                30)
            assert status == 200 and ok["usage"]["completion_tokens"] >= 1
            assert sched.num_running_of(None) == 0  # nobody anonymous
            assert sched.num_running >= 7  # A's streams were running all along
            hog.close()
    # the server closed under running streams: the engine lives on for the next one
    assert worker.run_sync(lambda m: 0) == 0
