"""What coding agents need from the server, checked with the official SDKs: reasoning and
tool calls out of a scripted model (the demo tokenizer and template, Qwen3's shapes),
the tool round trip served from cache, and requests exactly as Claude Code sends them."""

import contextlib
import json
import logging
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from mlx_lm.tokenizer_utils import load as load_tokenizer

from blockserve.engine.text.frontend import TokenizerFrontend
from blockserve.engine.models.loader import resolve
from blockserve.kvpool import BlockPool
from blockserve.scheduler import Scheduler, SchedulerConfig
from blockserve.server.app import ServerConfig, create_app
from tests.fakes import ScriptedGenerator

MODEL = "demo:tiny"
THINK = "<think>\nThe user wants a.py.\n</think>\n\n"
CALL = '<tool_call>\n{"name": "read", "arguments": {"path": "a.py"}}\n</tool_call>'
REPLY = THINK + "Reading it." + "\n" + CALL
ANSWER = "It prints 1."
TOOLS_OA = [{"type": "function", "function": {
    "name": "read", "description": "Read a file.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                   "required": ["path"]}}}]
TOOLS_AN = [{"name": "read", "description": "Read a file.",
             "input_schema": TOOLS_OA[0]["function"]["parameters"]}]
SYSTEM = "You are a coding agent. Read files before you answer. " * 6


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(Path(resolve(MODEL)[1]))


@contextlib.asynccontextmanager
async def scripted(tokenizer, *scripts, names=(MODEL,)):
    gen = ScriptedGenerator(block_size=16, tokenizer=tokenizer, scripts=list(scripts))
    sched = Scheduler(gen, BlockPool(16, 64 << 20), SchedulerConfig())
    frontend = TokenizerFrontend(list(names), tokenizer, resolve(MODEL)[1])
    runner = web.AppRunner(create_app(sched, frontend, ServerConfig(64)),
                           handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", sched
    finally:
        await runner.cleanup()
    assert sched.pool.stats().blocks_pinned == 0 and gen.active == 0


def oa(url):
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def an(url):
    return anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)


OA_CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Open a.py"}]


async def test_openai_tool_call_and_reasoning(tokenizer):
    async with scripted(tokenizer, REPLY) as (url, _):
        r = await oa(url).chat.completions.create(model=MODEL, messages=OA_CHAT,
                                                  tools=TOOLS_OA, max_tokens=64)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Reading it."
        assert choice.message.model_extra["reasoning_content"] == "The user wants a.py."
        (call,) = choice.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name == "read"
        assert json.loads(call.function.arguments) == {"path": "a.py"}


async def test_openai_streamed_tool_call(tokenizer):
    async with scripted(tokenizer, REPLY) as (url, _):
        stream = await oa(url).chat.completions.create(
            model=MODEL, messages=OA_CHAT, tools=TOOLS_OA, max_tokens=64, stream=True)
        content, reasoning, calls, finish = "", "", {}, None
        async for chunk in stream:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            for tc in delta.tool_calls or []:
                c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                c["id"] = c["id"] or tc.id
                c["name"] += tc.function.name or ""
                c["arguments"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls"
        assert content == "Reading it." and reasoning == "The user wants a.py."
        assert list(calls) == [0] and calls[0]["name"] == "read" and calls[0]["id"]
        assert json.loads(calls[0]["arguments"]) == {"path": "a.py"}


async def test_anthropic_tool_use_and_thinking(tokenizer):
    async with scripted(tokenizer, REPLY) as (url, _):
        msg = await an(url).messages.create(
            model=MODEL, system=SYSTEM, max_tokens=64, tools=TOOLS_AN,
            messages=[{"role": "user", "content": "Open a.py"}],
            thinking={"type": "enabled", "budget_tokens": 1024})
        assert msg.stop_reason == "tool_use"
        kinds = [b.type for b in msg.content]
        assert kinds == ["thinking", "text", "tool_use"]
        assert msg.content[0].thinking == "The user wants a.py."
        tool = msg.content[2]
        assert tool.id.startswith("toolu_") and tool.name == "read"
        assert tool.input == {"path": "a.py"}


async def test_anthropic_streamed_tool_use(tokenizer):
    async with scripted(tokenizer, REPLY) as (url, _):
        async with an(url).messages.stream(
                model=MODEL, system=SYSTEM, max_tokens=64, tools=TOOLS_AN,
                messages=[{"role": "user", "content": "Open a.py"}]) as stream:
            events = [e.type async for e in stream]
            msg = await stream.get_final_message()
        assert msg.stop_reason == "tool_use"
        assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"]
        assert msg.content[2].input == {"path": "a.py"} and msg.content[2].name == "read"
        assert "input_json" in events and "thinking" in events


async def test_the_round_trip_is_served_from_cache(tokenizer):
    """Turn 2 sends the tool call back with its result: its prompt hits the blocks of
    turn 1 (system prompt, tool list, question and the model's own reply)."""
    async with scripted(tokenizer, REPLY, ANSWER) as (url, sched):
        client = an(url)
        first = await client.messages.create(
            model=MODEL, system=SYSTEM, max_tokens=64, tools=TOOLS_AN,
            messages=[{"role": "user", "content": "Open a.py"}])
        tool = first.content[-1]
        history = [{"role": "user", "content": "Open a.py"},
                   {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                   {"role": "user", "content": [{"type": "tool_result",
                                                 "tool_use_id": tool.id,
                                                 "content": "print(1)"}]}]
        second = await client.messages.create(model=MODEL, system=SYSTEM, max_tokens=64,
                                              tools=TOOLS_AN, messages=history)
        assert second.stop_reason == "end_turn" and second.content[0].text == ANSWER
        u1, u2 = first.usage, second.usage
        turn1 = u1.input_tokens + u1.cache_read_input_tokens
        # Everything of turn 1, prompt and reply, is in the cache, whole blocks of it.
        assert u2.cache_read_input_tokens >= (turn1 + u1.output_tokens) // 16 * 16 - 16
        assert u2.cache_read_input_tokens > turn1


CLAUDE_CODE_BODY = {
    "model": MODEL, "max_tokens": 32, "stream": True,
    "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; h=1"},
               {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
    "tools": TOOLS_AN + [{"type": "web_search_20250305", "name": "web_search"}],
    "thinking": {"type": "adaptive"}, "context_management": {"edits": []},
    "output_config": {"effort": "high"}, "metadata": {"user_id": "u"},
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Look at this screenshot"},
                                     {"type": "image", "source": {"type": "base64",
                                                                  "media_type": "image/png",
                                                                  "data": "AAAA"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Read it.", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a.png"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "image", "source": {"type": "base64", "data": "AAAA",
                                                      "media_type": "image/png"}}]},
            {"type": "text", "text": "What does it show?"}]},
        {"role": "system", "content": "<system-reminder>Be brief.</system-reminder>"}],
}


async def post(url, path, body, headers=None):
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body, headers=headers or {}) as r:
            return r.status, await r.text()


async def test_claude_code_requests_are_accepted_as_sent(tokenizer, caplog):
    caplog.set_level(logging.WARNING, "blockserve.server")
    async with scripted(tokenizer, ANSWER) as (url, _):
        status, text = await post(url, "/v1/messages?beta=true", CLAUDE_CODE_BODY,
                                  {"anthropic-beta": "interleaved-thinking-2025-05-14",
                                   "anthropic-version": "2023-06-01"})
        assert status == 200, text
        events = [json.loads(line[6:]) for line in text.splitlines()
                  if line.startswith("data: ")]
        assert events[-1]["type"] == "message_stop"
        assert "".join(e["delta"].get("text", "") for e in events
                       if e["type"] == "content_block_delta") == ANSWER
        assert "ignoring tool 'web_search'" in caplog.text
        status, text = await post(url, "/v1/messages/count_tokens?beta=true",
                                  {k: v for k, v in CLAUDE_CODE_BODY.items()
                                   if k not in ("max_tokens", "stream")})
        assert status == 200 and json.loads(text)["input_tokens"] > 100
        # An image in the turn being answered can't be read: a 400 that says so, logged.
        body = {**CLAUDE_CODE_BODY, "messages": CLAUDE_CODE_BODY["messages"][:1]}
        status, text = await post(url, "/v1/messages", body)
        assert status == 400 and "text only" in text
        assert "-> 400: messages[0]: this model reads text only" in caplog.text


def test_the_prompt_keeps_what_the_model_must_see(tokenizer):
    from blockserve.server.anthropic_api import parse_messages as _parse
    from blockserve.server.fields import Bounds

    frontend = TokenizerFrontend([MODEL], tokenizer, resolve(MODEL)[1])
    body = {k: v for k, v in CLAUDE_CODE_BODY.items() if k not in ("max_tokens", "stream")}
    prompt = tokenizer.decode(_parse(body, frontend, Bounds(frontend.vocab_size), count_only=True).prompt)
    assert "billing" not in prompt and '"name": "read"' in prompt
    assert "web_search" not in prompt
    assert prompt.count("[image omitted: this model reads text only]") == 2
    assert "<|im_start|>system\n<system-reminder>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # Thinking of turns before the last question is dropped, as Qwen3's template does;
    # inside the current tool loop (the last message a tool result) it is kept.
    assert "Read it." not in prompt
    body["messages"] = body["messages"][:2] + [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "a cat"}]}]
    prompt = tokenizer.decode(_parse(body, frontend, Bounds(frontend.vocab_size), count_only=True).prompt)
    assert "<think>\nRead it.\n</think>\n\n<tool_call>" in prompt


@pytest.mark.parametrize("api,call,param", [
    ("anthropic", {"type": "tool_use", "name": "read", "input": {"path": "a.py"}},
     "messages[1].content[0].id"),
    ("anthropic", {"type": "tool_use", "id": 7, "name": "read", "input": {}},
     "messages[1].content[0].id"),
    ("openai", {"id": "c1", "type": "function",
                "function": {"name": "read", "arguments": 3}},
     "messages[1].tool_calls[0].function.arguments"),
    ("openai", {"id": "c1", "type": "function", "function": {"name": "read"}},
     "messages[1].tool_calls[0].function.arguments"),
    ("openai", {"id": "c1", "type": "function",
                "function": {"name": "read", "arguments": ["a.py"]}},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_malformed_tool_calls_in_history_are_refused(tokenizer, api, call, param):
    """A tool_use without an id, a call whose arguments are not JSON text: 400s that
    name the field, as the official APIs answer (an arguments object stays accepted)."""
    from blockserve.server.anthropic_api import parse_messages as _parse
    from blockserve.server.errors import ApiError
    from blockserve.server.fields import Bounds
    from blockserve.server.openai_input import parse_chat

    frontend = TokenizerFrontend([MODEL], tokenizer, resolve(MODEL)[1])
    bounds = Bounds(frontend.vocab_size)
    if api == "anthropic":
        def body(c):
            return {"max_tokens": 4, "tools": TOOLS_AN, "messages": [
                {"role": "user", "content": "Open a.py"},
                {"role": "assistant", "content": [c]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                              "content": "x"}]}]}
        parse, good = _parse, {**call, "id": "toolu_1", "input": {"path": "a.py"}}
    else:
        def body(c):
            return {"tools": TOOLS_OA, "messages": [
                OA_CHAT[1], {"role": "assistant", "content": None, "tool_calls": [c]},
                {"role": "tool", "tool_call_id": "c1", "content": "x"}]}
        parse = parse_chat
        good = {**call, "function": {"name": "read", "arguments": {"path": "a.py"}}}
    with pytest.raises(ApiError) as e:
        parse(body(call), frontend, bounds)
    assert e.value.status == 400 and e.value.param == param and param in e.value.message
    prompt = tokenizer.decode(parse(body(good), frontend, bounds).prompt)
    assert '"path": "a.py"' in prompt  # the well-formed call renders


async def test_unknown_fields_are_ignored_with_a_warning(tokenizer, caplog):
    caplog.set_level(logging.WARNING, "blockserve.server")
    async with scripted(tokenizer, ANSWER) as (url, _):
        client = oa(url)
        r = await client.chat.completions.create(
            model=MODEL, messages=OA_CHAT, max_tokens=8, reasoning_effort="low",
            extra_body={"frobnicate": 1, "prompt_cache_key": "k", "verbosity": "low",
                        "safety_identifier": "s", "include_reasoning": False,
                        "skip_special_tokens": True, "no_stop_trim": False})
        assert r.choices[0].message.content == ANSWER
        assert "ignoring field(s) with no effect here: frobnicate" in caplog.text


async def test_include_reasoning_false_drops_it(tokenizer):
    async with scripted(tokenizer, THINK + ANSWER) as (url, _):
        r = await oa(url).chat.completions.create(
            model=MODEL, messages=OA_CHAT, max_tokens=64,
            extra_body={"include_reasoning": False})
        assert r.choices[0].message.content == ANSWER
        assert "reasoning_content" not in r.choices[0].message.model_extra


async def test_tool_choice_none_parses_no_calls(tokenizer):
    async with scripted(tokenizer, REPLY) as (url, _):
        r = await oa(url).chat.completions.create(model=MODEL, messages=OA_CHAT,
                                                  tools=TOOLS_OA, tool_choice="none",
                                                  max_tokens=64)
        assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
        assert CALL in r.choices[0].message.content


async def test_a_truncated_call_is_text_with_the_true_finish(tokenizer):
    async with scripted(tokenizer, "Sure." + CALL) as (url, _):
        r = await oa(url).chat.completions.create(model=MODEL, messages=OA_CHAT,
                                                  tools=TOOLS_OA, max_tokens=12)
        assert r.choices[0].finish_reason == "length"
        assert r.choices[0].message.content.startswith("Sure.<tool_call>")
        assert not r.choices[0].message.tool_calls


async def test_served_model_names(tokenizer):
    async with scripted(tokenizer, ANSWER, names=("local-sonnet", MODEL)) as (url, _):
        msg = await an(url).messages.create(model="local-sonnet", max_tokens=8,
                                            messages=[{"role": "user", "content": "hi"}])
        assert msg.model == "local-sonnet" and msg.content[0].text == ANSWER
        models = await oa(url).models.list()
        assert [m.id for m in models.data] == ["local-sonnet", MODEL]
        with pytest.raises(anthropic.NotFoundError):
            await an(url).messages.create(model="gpt-5", max_tokens=8,
                                          messages=[{"role": "user", "content": "hi"}])
