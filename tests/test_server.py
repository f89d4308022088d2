"""The HTTP server against real clients: the official openai and anthropic SDKs, raw
sockets for disconnects, and every error case followed by a good request."""

import asyncio
import json
import random

import aiohttp
import anthropic
import openai
import pytest

from blockserve.engine.models.loader import load_weights
from blockserve.engine.runtime.worker import EngineWorker
from tests.engine_harness import EngineHold, active_sequences, reference_tokens, until
from tests.server_harness import metrics, serve

MODEL = "demo:tiny"


@pytest.fixture(scope="module")
def worker():
    w = EngineWorker(MODEL, block_size=16, max_running=16)
    yield w
    w.close()


@pytest.fixture(scope="module")
def ref_model():
    return load_weights(MODEL).model


def oa(url, key="unused"):
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


CHAT = [{"role": "system", "content": "You are a careful coding agent. " * 4},
        {"role": "user", "content": "Open the file and print each value."}]


async def wait_idle(url, timeout=60.0):
    end = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < end:
        m = await metrics(url)
        if (m['blockserve_kv_blocks{state="pinned"}'] == 0
                and m["blockserve_requests_running"] == 0
                and m["blockserve_requests_waiting"] == 0):
            return m
        await asyncio.sleep(0.05)
    raise AssertionError(f"server not idle: {m}")


async def test_openai_chat_stream_and_cached_tokens(worker):
    async with serve(worker) as srv:
        client = oa(srv.url)
        r1 = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                                  temperature=0)
        assert r1.choices[0].finish_reason in ("length", "stop")
        assert r1.usage.prompt_tokens > 32 and r1.usage.prompt_tokens_details.cached_tokens == 0
        r2 = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                                  temperature=0)
        assert r2.choices[0].message.content == r1.choices[0].message.content
        assert r2.usage.prompt_tokens_details.cached_tokens > 0
        stream = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == r1.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == r1.usage.completion_tokens
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        await wait_idle(srv.url)


async def test_openai_completions_stream_and_not(worker):
    async with serve(worker) as srv:
        client = oa(srv.url)
        r = await client.completions.create(model=MODEL, prompt="The cache block of",
                                            max_tokens=6, temperature=0)
        assert r.choices[0].text and r.usage.completion_tokens == 6
        stream = await client.completions.create(model=MODEL, prompt="The cache block of",
                                                 max_tokens=6, temperature=0, stream=True)
        text = "".join([c.choices[0].text async for c in stream])
        assert text == r.choices[0].text


async def test_anthropic_messages_stream_and_not(worker):
    async with serve(worker) as srv:
        client = anthropic.AsyncAnthropic(base_url=srv.url, api_key="unused", max_retries=0,
                                         timeout=60)
        system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1; h=abc"},
                  {"type": "text", "text": "You are a careful coding agent. " * 4}]
        msgs = [{"role": "user", "content": [{"type": "text", "text": "List the files."}]}]
        greedy = {"extra_body": {"temperature": 0}}  # SDK 2.x has no sampling arguments
        m1 = await client.messages.create(model=MODEL, max_tokens=8, system=system,
                                          messages=msgs, **greedy)
        assert m1.content[0].type == "text" and m1.stop_reason in ("max_tokens", "end_turn")
        assert m1.usage.cache_read_input_tokens == 0
        # Another billing hash must not defeat reuse: the block is dropped.
        system[0]["text"] = "x-anthropic-billing-header: cc_version=1; h=def"
        async with client.messages.stream(model=MODEL, max_tokens=8, system=system,
                                          messages=msgs, **greedy) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == m1.content[0].text
        assert final.usage.cache_read_input_tokens > 0
        assert final.usage.output_tokens == m1.usage.output_tokens
        await wait_idle(srv.url)


async def test_greedy_over_http_equals_mlx_lm(worker, ref_model):
    async with serve(worker) as srv:
        client = oa(srv.url)
        for msgs in (CHAT, CHAT[:1] + [{"role": "user", "content": "Write a function"}]):
            prompt = srv.frontend.render_chat(msgs).tokens
            ref = reference_tokens(ref_model, prompt, 20)
            r = await client.chat.completions.create(
                model=MODEL, messages=msgs, max_tokens=20, temperature=0,
                extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 20
            assert r.choices[0].message.content == worker.tokenizer.decode(ref)


async def test_speculated_streams_equal_mlx_lm_and_are_counted(worker, ref_model,
                                                               monkeypatch):
    """A reply drafted from its own context streams several tokens a step, equal to
    mlx-lm's, and the drafts show in /metrics."""
    from blockserve.engine.runtime.lookup import Drafting

    monkeypatch.setattr(Drafting, "MIN_SAVED", 0)  # a random model: draft to the end
    prompt = list(range(10, 90))
    ref = reference_tokens(ref_model, prompt, 40)
    async with serve(worker) as srv:
        before = await metrics(srv.url)
        stream = await oa(srv.url).completions.create(
            model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        text = "".join([c.choices[0].text async for c in stream])
        assert text == worker.tokenizer.decode(ref, skip_special_tokens=True)
        after = await wait_idle(srv.url)
    drafted = (after["blockserve_spec_decode_draft_tokens_total"]
               - before["blockserve_spec_decode_draft_tokens_total"])
    accepted = (after["blockserve_spec_decode_accepted_tokens_total"]
                - before["blockserve_spec_decode_accepted_tokens_total"])
    assert drafted >= accepted > 0
    assert after["blockserve_spec_decode_drafts_total"] > before[
        "blockserve_spec_decode_drafts_total"]


async def raw_post(srv, body: dict):
    """A chat request over a bare socket, so a test can vanish mid-request."""
    reader, writer = await asyncio.open_connection("127.0.0.1",
                                                   int(srv.url.rsplit(":", 1)[1]))
    payload = json.dumps(body).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    return reader, writer


async def post(url, path, body, headers=None, raw=None):
    async with aiohttp.ClientSession() as s:
        data = raw if raw is not None else json.dumps(body)
        h = {"Content-Type": "application/json", **(headers or {})}
        async with s.post(url + path, data=data, headers=h) as r:
            return r.status, await r.json(), r.headers


@pytest.mark.parametrize("body, raw, status, param", [
    (None, b"{not json", 400, None),
    ({"messages": "hello"}, None, 400, "messages"),
    ({"messages": []}, None, 400, "messages"),
    ({"messages": CHAT, "max_tokens": -5}, None, 400, "max_tokens"),
    ({"messages": CHAT, "temperature": "hot"}, None, 400, "temperature"),
    ({"messages": CHAT, "n": 0}, None, 400, "n"),
    ({"messages": CHAT, "n": 17}, None, 400, "n"),
    ({"messages": CHAT, "logprobs": "yes"}, None, 400, "logprobs"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 50}, None, 400, "top_logprobs"),
    ({"messages": CHAT, "response_format": {"type": "xml"}}, None, 400, "response_format"),
    ({"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(?=a)"}}}}, None, 400,
     "response_format"),
    ({"messages": CHAT, "tool_choice": "required"}, None, 400, "tool_choice"),
    ({"messages": CHAT, "presence_penalty": 9}, None, 400, "presence_penalty"),
    ({"messages": CHAT, "logit_bias": {"x": 1}}, None, 400, "logit_bias"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     None, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, None, 400, "messages"),
    ({"model": "gpt-17", "messages": CHAT}, None, 404, "model"),
])
async def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
        worker, body, raw, status, param):
    async with serve(worker) as srv:
        code, err, _ = await post(srv.url, "/v1/chat/completions", body, raw=raw)
        assert code == status
        assert set(err["error"]) == {"message", "type", "param", "code"}
        assert err["error"]["param"] == param and err["error"]["message"]
        ok, good, _ = await post(srv.url, "/v1/chat/completions",
                                 {"messages": CHAT, "max_tokens": 2})
        assert ok == 200 and good["choices"][0]["finish_reason"] in ("length", "stop")


async def test_prompt_over_the_context_limit_is_refused_before_compute(worker):
    async with serve(worker, max_model_len=64) as srv:
        long = [{"role": "user", "content": "word " * 200}]
        code, err, _ = await post(srv.url, "/v1/chat/completions", {"messages": long})
        assert code == 400 and "64" in err["error"]["message"]
        assert err["error"]["code"] == "context_length_exceeded"
        m = await metrics(srv.url)
        assert m["blockserve_prompt_tokens_computed_total"] == 0
        code, err, _ = await post(srv.url, "/v1/messages",
                                  {"messages": long, "max_tokens": 4})
        assert code == 400 and err["type"] == "error"
        assert err["error"]["type"] == "invalid_request_error"
        ok, _, _ = await post(srv.url, "/v1/chat/completions",
                              {"messages": CHAT[1:], "max_tokens": 2})
        assert ok == 200


async def test_anthropic_errors_use_anthropic_shape(worker):
    async with serve(worker) as srv:
        code, err, _ = await post(srv.url, "/v1/messages", {"messages": CHAT[1:]})
        assert code == 400 and err == {"type": "error", "error": {
            "type": "invalid_request_error", "message": "'max_tokens' is required"}}
        code, err, _ = await post(srv.url, "/v1/messages",
                                  {"model": "claude-9", "max_tokens": 3,
                                   "messages": CHAT[1:]})
        assert code == 404 and err["error"]["type"] == "not_found_error"


async def test_api_key_is_required_when_set(worker):
    async with serve(worker, api_keys=["sekret"]) as srv:
        body = {"messages": CHAT, "max_tokens": 2}
        code, err, _ = await post(srv.url, "/v1/chat/completions", body)
        assert code == 401 and err["error"]["type"] == "authentication_error"
        code, _, _ = await post(srv.url, "/v1/chat/completions", body,
                                {"Authorization": "Bearer wrong"})
        assert code == 401
        code, err, _ = await post(srv.url, "/v1/messages", {**body, "messages": CHAT[1:]})
        assert code == 401 and err["error"]["type"] == "authentication_error"
        code, _, _ = await post(srv.url, "/v1/chat/completions", body,
                                {"Authorization": "Bearer sekret"})
        assert code == 200
        code, _, _ = await post(srv.url, "/v1/messages", {**body, "messages": CHAT[1:]},
                                {"x-api-key": "sekret"})
        assert code == 200
        async with aiohttp.ClientSession() as s:
            async with s.get(srv.url + "/health") as r:
                assert r.status == 200  # health stays open for load balancers


async def test_full_queue_gets_429_with_retry_after(worker):
    async with serve(worker, max_num_seqs=1, max_queue=1) as srv:
        body = {"messages": CHAT, "max_tokens": 8, "ignore_eos": True}
        with EngineHold.now(worker) as hold:  # the first can't finish while it is held
            await hold.wait()
            first = asyncio.create_task(post(srv.url, "/v1/chat/completions", body))
            await until(lambda: srv.scheduler.num_running == 1, "the first request runs")
            second = asyncio.create_task(post(srv.url, "/v1/chat/completions", body))
            await until(lambda: srv.scheduler.num_waiting == 1, "the second one waits")
            code, err, headers = await post(srv.url, "/v1/chat/completions", body)
            assert code == 429 and headers["Retry-After"] == "1"
            assert err["error"]["code"] == "queue_full"
            assert srv.scheduler.num_running == 1 and srv.scheduler.num_waiting == 1
        for t in (first, second):
            status, _, _ = await t
            assert status == 200
        ok, _, _ = await post(srv.url, "/v1/chat/completions",
                              {"messages": CHAT, "max_tokens": 2})
        assert ok == 200


async def test_client_disconnect_mid_stream_frees_everything(worker):
    async with serve(worker) as srv:
        await post(srv.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1})
        body = {"messages": CHAT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        reader, writer = await raw_post(srv, body)
        seen = b""
        while seen.count(b"data:") < 4:
            seen += await reader.read(4096)
        m = await metrics(srv.url)
        assert m["blockserve_requests_running"] == 1
        assert m['blockserve_kv_blocks{state="pinned"}'] > 0  # its cached prefix
        writer.close()  # the client goes away mid-stream
        m = await wait_idle(srv.url)
        assert m['blockserve_requests_total{finish_reason="abort"}'] == 1
        assert srv.scheduler.stats.finished["abort"] == 1
        assert active_sequences(worker) == (0, 0)


async def test_sixteen_concurrent_streams_finish_correctly(worker, ref_model):
    async with serve(worker) as srv:
        client = oa(srv.url)
        rng = random.Random(0)
        words = "file code value list tool agent cache block model token reply".split()
        users = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(16)]

        async def one(u):
            msgs = [CHAT[0], {"role": "user", "content": u}]
            stream = await client.chat.completions.create(
                model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
            ref = reference_tokens(ref_model, srv.frontend.render_chat(msgs).tokens, 10)
            return text, worker.tokenizer.decode(ref)

        results = await asyncio.gather(*(one(u) for u in users))
        for text, expected in results:
            assert text == expected  # each stream got its own request's tokens
        # As distinct as the model makes them (a random tiny model has attractors).
        assert len({t for t, _ in results}) == len({e for _, e in results}) >= 12
        await wait_idle(srv.url)


async def test_cache_admin_stats_and_refused_flush(worker):
    async with serve(worker) as srv:
        await post(srv.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
        async with aiohttp.ClientSession() as s:
            async with s.get(srv.url + "/v1/cache/stats") as r:
                stats = await r.json()
        assert stats["pool"]["blocks_stored"] > 0
        with EngineHold.now(worker) as hold:  # the request can't finish while held
            await hold.wait()
            task = asyncio.create_task(post(srv.url, "/v1/chat/completions",
                                            {"messages": CHAT, "max_tokens": 8,
                                             "ignore_eos": True}))
            await until(lambda: srv.scheduler.pool.stats().blocks_pinned,
                        "the running request pins its cached prefix")
            code, err, _ = await post(srv.url, "/v1/cache/reset", {})
            assert code == 409 and "in use" in err["error"]["message"]
            assert srv.scheduler.num_running == 1
        await task
        code, body, _ = await post(srv.url, "/v1/cache/reset", {})
        assert code == 200 and body == {"reset": True, "scope": "all"}
        assert srv.scheduler.pool.stats().blocks_stored == 0


async def test_client_disconnect_while_waiting_for_a_non_streamed_reply(worker):
    async with serve(worker) as srv:
        _, writer = await raw_post(srv, {"messages": CHAT, "max_tokens": 2000,
                                         "ignore_eos": True})
        await until(lambda: srv.scheduler.num_running, "the request runs")
        assert srv.scheduler.num_running == 1
        writer.close()  # gone before any byte of the reply
        await wait_idle(srv.url)
        assert srv.scheduler.stats.finished["abort"] == 1
        assert active_sequences(worker) == (0, 0)


async def test_anthropic_tool_blocks_become_messages(worker):
    async with serve(worker) as srv:
        body = {"max_tokens": 4, "messages": [
            {"role": "user", "content": "List the files."},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Calling ls."},
                {"type": "tool_use", "id": "t1", "name": "ls", "input": {"path": "."}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1",
                 "content": [{"type": "text", "text": "a.py b.py"}]}]}]}
        code, msg, _ = await post(srv.url, "/v1/messages", body)
        assert code == 200 and msg["type"] == "message"
        from blockserve.server.anthropic_api import parse_messages as _parse
        from blockserve.server.fields import Bounds

        gen = _parse(body, srv.frontend, Bounds(srv.frontend.vocab_size))
        text = worker.tokenizer.decode(gen.prompt)
        assert 'Calling ls.\n<tool_call>\n{"name": "ls", "arguments": {"path": "."}}' in text
        assert "<|im_start|>user\n<tool_response>\na.py b.py\n</tool_response>" in text
        code, err, _ = await post(srv.url, "/v1/messages", {
            "max_tokens": 4, "messages": [{"role": "user", "content": [
                {"type": "image", "source": {}}]}]})
        assert code == 400 and "image" in err["error"]["message"]


async def test_metrics_expose_the_required_series(worker):
    async with serve(worker) as srv:
        await post(srv.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
        await post(srv.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
        m = await metrics(srv.url)
        for name in ["blockserve_prefix_cache_queries_tokens_total",
                     "blockserve_prefix_cache_hits_tokens_total",
                     'blockserve_kv_blocks{state="pinned"}',
                     'blockserve_kv_blocks{state="cached"}',
                     'blockserve_kv_blocks{state="free"}', "blockserve_kv_cache_bytes",
                     'blockserve_kv_evictions_total{tier="0"}',
                     "blockserve_requests_running", "blockserve_requests_waiting",
                     'blockserve_requests_total{finish_reason="length"}',
                     "blockserve_time_to_first_token_seconds_count",
                     "blockserve_e2e_request_latency_seconds_count"]:
            assert name in m, name
        assert m["blockserve_prefix_cache_hits_tokens_total"] > 0
        assert m['blockserve_requests_total{finish_reason="length"}'] == 2
        assert m["blockserve_time_to_first_token_seconds_count"] == 2
        assert m['blockserve_kv_blocks{state="cached"}'] > 0


async def test_logprobs_in_chat_and_completions(worker):
    async with serve(worker) as srv:
        client = oa(srv.url)
        r = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6,
                                                 temperature=0, logprobs=True,
                                                 top_logprobs=3,
                                                 extra_body={"ignore_eos": True})
        entries = r.choices[0].logprobs.content
        assert len(entries) == r.usage.completion_tokens == 6
        assert "".join(e.token for e in entries) == r.choices[0].message.content
        for e in entries:  # greedy: the chosen token is the most likely one
            assert len(e.top_logprobs) == 3 and e.logprob <= 0
            assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)
            assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        stream = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
            stream=True, extra_body={"ignore_eos": True})
        streamed = [e.logprob async for c in stream if c.choices and c.choices[0].logprobs
                    for e in c.choices[0].logprobs.content]
        assert streamed == pytest.approx([e.logprob for e in entries], abs=1e-5)
        c = await client.completions.create(model=MODEL, prompt="Open the file", max_tokens=4,
                                            temperature=0, logprobs=2,
                                            extra_body={"ignore_eos": True})
        lp = c.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
        assert "".join(lp.tokens) == c.choices[0].text
        assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)


async def test_logit_bias_and_penalties_apply_per_request(worker, ref_model):
    """mlx-lm's logits processors, per sequence: a biased and a penalised request share
    the batch with a plain one, which stays exact."""
    async with serve(worker) as srv:
        client = oa(srv.url)
        forced = worker.tokenizer.encode(" file")[0]
        plain_prompt = srv.frontend.render_chat(CHAT).tokens

        async def ask(**kw):
            r = await client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                **{"extra_body": {"ignore_eos": True}, **kw})
            return r.choices[0].message.content, [e.logprob for e in
                                                  r.choices[0].logprobs.content]

        (biased, _), (_, penalised), (_, presence), (plain, plain_lp) = await asyncio.gather(
            ask(logit_bias={str(forced): 100}),
            ask(extra_body={"ignore_eos": True, "repetition_penalty": 5.0}),
            ask(presence_penalty=2.0, frequency_penalty=2.0),
            ask())
        assert plain == worker.tokenizer.decode(reference_tokens(ref_model, plain_prompt, 8))
        assert biased == worker.tokenizer.decode([forced] * 8)
        # The prompt's tokens are penalised, so the distribution of the first token moves.
        assert penalised[0] != pytest.approx(plain_lp[0], abs=1e-4)
        assert presence[0] != pytest.approx(plain_lp[0], abs=1e-4)
        await wait_idle(srv.url)


async def test_tenants_never_share_blocks(worker):
    """Each API key is a tenant: the same prompt under two keys shares nothing (no hit,
    so no timing channel either); under one key it hits; a cache_salt nests inside."""
    async with serve(worker, api_keys=["key-a", "key-b"]) as srv:
        a, b = oa(srv.url, "key-a"), oa(srv.url, "key-b")

        async def cached(client, **kw):
            r = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2,
                                                     temperature=0, **kw)
            return r.usage.prompt_tokens_details.cached_tokens

        assert await cached(a) == 0
        assert await cached(b) == 0  # another tenant: a miss
        assert await cached(a) > 0 and await cached(b) > 0  # each hits its own
        assert await cached(a, extra_body={"cache_salt": "s1"}) == 0  # nested salt
        assert await cached(a, extra_body={"cache_salt": "s1"}) > 0
        with pytest.raises(openai.AuthenticationError):
            await oa(srv.url, "key-c").chat.completions.create(model=MODEL, messages=CHAT,
                                                               max_tokens=2)
        namespaces = {b.namespace for b in srv.scheduler.pool.blocks()}
        assert len(namespaces) == 3 and all(ns.cache_salt for ns in namespaces)
        assert not any("key-" in ns.cache_salt for ns in namespaces)  # keys are not kept


async def test_n_choices_share_one_prefill(worker, ref_model):
    """n choices of one prompt: its blocks are computed once and shared (each sibling
    recomputes at most its last partial block); greedy choices are identical and exact;
    with a seed they are reproducible and differ."""
    async with serve(worker) as srv:
        client = oa(srv.url)
        prompt = srv.frontend.render_chat(CHAT).tokens
        before = (await metrics(srv.url))["blockserve_prompt_tokens_computed_total"]
        r = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                                 temperature=0, n=4,
                                                 extra_body={"ignore_eos": True})
        after = (await metrics(srv.url))["blockserve_prompt_tokens_computed_total"]
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        texts = {c.message.content for c in r.choices}
        assert texts == {worker.tokenizer.decode(reference_tokens(ref_model, prompt, 8))}
        assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 32
        assert after - before <= len(prompt) + 3 * 16  # not 4 x len(prompt)
        # A completion has no chat checkpoints: the siblings still share its blocks.
        text = " ".join(["the cache block of the first file"] * 12)
        n_prompt = len(worker.tokenizer.encode(text))
        before = after
        c = await client.completions.create(model=MODEL, prompt=text, max_tokens=4, n=4,
                                            temperature=0, extra_body={"ignore_eos": True})
        after = (await metrics(srv.url))["blockserve_prompt_tokens_computed_total"]
        assert len({x.text for x in c.choices}) == 1 and c.usage.prompt_tokens == n_prompt
        assert n_prompt > 64 and after - before <= n_prompt + 3 * 16
        sampled = [await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, seed=7, n=3,
            extra_body={"ignore_eos": True, "cache_salt": f"run{i}"}) for i in range(2)]
        first, again = ([c.message.content for c in x.choices] for x in sampled)
        assert first == again  # reproducible, choice by choice
        assert len(set(first)) > 1  # seed + index: different streams
        stream = await client.completions.create(model=MODEL, prompt="Open the file",
                                                 max_tokens=4, n=2, stream=True,
                                                 temperature=0,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        finished = {c.choices[0].index for c in chunks
                    if c.choices and c.choices[0].finish_reason == "length"}
        assert finished == {0, 1}
        assert chunks[-1].usage.completion_tokens == 8
        await wait_idle(srv.url)


async def test_largest_seed_wraps_per_choice(worker):
    """The largest seed with n=2: choice 1's seed is seed + 1 wrapped within 64 bits
    (0), so it samples as seed 0 does, not a 500."""
    top = 2**64 - 1
    async with serve(worker) as srv:
        client = oa(srv.url)
        kw = dict(model=MODEL, messages=CHAT, max_tokens=6, temperature=1.0,
                  extra_body={"ignore_eos": True})
        r = await client.chat.completions.create(n=2, seed=top, **kw)
        zero = await client.chat.completions.create(n=1, seed=0, **kw)
        last = await client.chat.completions.create(n=1, seed=top, **kw)
        assert [c.message.content for c in r.choices] == [last.choices[0].message.content,
                                                           zero.choices[0].message.content]
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(n=1, seed=2**64, **kw)
