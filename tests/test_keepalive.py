"""Keepalive while a stream has nothing to send (a long prefill): each API's own
signal, which its official SDK passes over, and the request still freed at the end."""

import asyncio
import json
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from blockserve.engine.models.loader import resolve
from blockserve.server import keepalive
from tests.engine_harness import until
from tests.server_harness import serve_scripted

MODEL = "demo:tiny"
ANSWER = "It prints 1."
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(Path(resolve(MODEL)[1]))


N_TICKS = 3


class Ticks:
    """Counts the keepalive ticks the server sends (every stream's, in one count)."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def tick(self) -> None:
        self.count += 1
        self._changed.set()

    async def more(self, k: int = N_TICKS) -> None:
        """Until ``k`` more ticks were sent: a reply held on this sends nothing else
        meanwhile, so its stream carries them."""
        target = self.count + k
        while self.count < target:
            self._changed.clear()
            await self._changed.wait()


@pytest.fixture(autouse=True)
def ticks(monkeypatch) -> Ticks:
    """Fast ticks, counted as the server sends them."""
    monkeypatch.setattr(keepalive, "INTERVAL_S", 0.02)
    counter = Ticks()
    real = keepalive.with_idle_ticks

    async def counting(source, interval):
        inner = real(source, interval)
        try:
            async for item in inner:
                if item is None:
                    counter.tick()
                yield item
        finally:
            await inner.aclose()  # frees the request when the client goes

    monkeypatch.setattr(keepalive, "with_idle_ticks", counting)
    return counter


async def raw(url, path, body):
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body) as r:
            return await r.text()


async def test_openai_chat_sends_comments_the_sdk_skips(tokenizer, ticks):
    async with serve_scripted(tokenizer, MODEL, [ANSWER]) as (url, gen, *_):
        gen.first_token_gate = ticks.more  # each reply waits for three ticks
        text = await raw(url, "/v1/chat/completions", {"messages": CHAT, "stream": True})
        assert text.count(": keepalive\n\n") >= N_TICKS
        assert text.index(": keepalive") < text.index('"content": "It')  # before the reply
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        before = ticks.count
        stream = await client.chat.completions.create(model=MODEL, messages=CHAT,
                                                      stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == ANSWER
        assert ticks.count - before >= N_TICKS  # the SDK's stream carried them


async def test_anthropic_sends_pings_the_sdk_skips(tokenizer, ticks):
    async with serve_scripted(tokenizer, MODEL, [ANSWER]) as (url, gen, *_):
        gen.first_token_gate = ticks.more
        text = await raw(url, "/v1/messages", {"messages": CHAT, "stream": True,
                                               "max_tokens": 32})
        events = [json.loads(line[6:]) for line in text.splitlines()
                  if line.startswith("data: ")]
        kinds = [e["type"] for e in events]
        assert kinds.count("ping") >= N_TICKS and kinds[-1] == "message_stop"
        client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
        before = ticks.count
        async with client.messages.stream(model=MODEL, max_tokens=32,
                                          messages=CHAT) as stream:
            msg = await stream.get_final_message()
        assert msg.content[0].text == ANSWER
        assert ticks.count - before >= N_TICKS


async def test_ticks_never_cancel_the_source():
    """Each item comes only after two ticks: a tick that cancelled the source's
    pending step would lose it (or break the generator)."""
    gates = [asyncio.Event() for _ in range(3)]

    async def gated():
        for i, gate in enumerate(gates):
            await gate.wait()
            yield i

    got, idle = [], 0
    async for x in keepalive.with_idle_ticks(gated(), 0.01):
        got.append(x)
        idle = idle + 1 if x is None else 0
        if idle == 2:
            next(g for g in gates if not g.is_set()).set()
    assert [x for x in got if x is not None] == [0, 1, 2] and got.count(None) == 6


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": CHAT, "stream": True}),
    ("/v1/messages", {"messages": CHAT, "stream": True, "max_tokens": 32}),
    ("/v1/responses", {"input": "hi", "stream": True})])
async def test_a_client_gone_between_ticks_frees_its_request(tokenizer, ticks, path, body):
    async with serve_scripted(tokenizer, MODEL, [ANSWER]) as (url, gen, sched, _):
        gen.first_token_gate = asyncio.Event().wait  # no token ever: only ticks
        async with aiohttp.ClientSession() as s:
            async with s.post(url + path, json=body) as r:
                await r.content.read(64)  # the stream has started; then the client goes
                await ticks.more(1)
        await until(lambda: gen.active == 0 and sched.pool.stats().blocks_pinned == 0,
                    "the request is freed")
        assert gen.aborted, "the request was not aborted"
