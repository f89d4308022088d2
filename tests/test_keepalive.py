"""Keepalive while a stream has nothing to send (a long prefill): each API's own
signal, which its official SDK passes over, and the request still freed at the end."""

import json
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from blockserve.engine.models.loader import resolve
from blockserve.server import keepalive
from tests.server_harness import serve_scripted

MODEL = "demo:tiny"
ANSWER = "It prints 1."
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(Path(resolve(MODEL)[1]))


@pytest.fixture(autouse=True)
def fast_ticks(monkeypatch):
    monkeypatch.setattr(keepalive, "INTERVAL_S", 0.02)


async def raw(url, path, body):
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body) as r:
            return await r.text()


async def test_openai_chat_sends_comments_the_sdk_skips(tokenizer):
    async with serve_scripted(tokenizer, MODEL, [ANSWER], token_delay=0.1) as (url, *_):
        text = await raw(url, "/v1/chat/completions", {"messages": CHAT, "stream": True})
        assert text.count(": keepalive\n\n") > 2
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(model=MODEL, messages=CHAT,
                                                      stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == ANSWER


async def test_anthropic_sends_pings_the_sdk_skips(tokenizer):
    async with serve_scripted(tokenizer, MODEL, [ANSWER], token_delay=0.1) as (url, *_):
        text = await raw(url, "/v1/messages", {"messages": CHAT, "stream": True,
                                               "max_tokens": 32})
        events = [json.loads(line[6:]) for line in text.splitlines()
                  if line.startswith("data: ")]
        kinds = [e["type"] for e in events]
        assert kinds.count("ping") > 2 and kinds[-1] == "message_stop"
        client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
        async with client.messages.stream(model=MODEL, max_tokens=32,
                                          messages=CHAT) as stream:
            msg = await stream.get_final_message()
        assert msg.content[0].text == ANSWER


async def test_ticks_never_cancel_the_source():
    import asyncio

    async def slow():
        for i in range(3):
            await asyncio.sleep(0.05)
            yield i

    got = [x async for x in keepalive.with_idle_ticks(slow(), 0.01)]
    assert [x for x in got if x is not None] == [0, 1, 2] and got.count(None) >= 6


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": CHAT, "stream": True}),
    ("/v1/messages", {"messages": CHAT, "stream": True, "max_tokens": 32}),
    ("/v1/responses", {"input": "hi", "stream": True})])
async def test_a_client_gone_between_ticks_frees_its_request(tokenizer, path, body):
    import asyncio

    async with serve_scripted(tokenizer, MODEL, [ANSWER * 8], token_delay=0.1) as (
            url, gen, sched, _):
        async with aiohttp.ClientSession() as s:
            async with s.post(url + path, json=body) as r:
                await r.content.read(64)  # the stream has started; then the client goes
        for _ in range(100):
            if gen.active == 0 and sched.pool.stats().blocks_pinned == 0:
                break
            await asyncio.sleep(0.02)
        assert gen.active == 0 and gen.aborted, "the request was not aborted"
