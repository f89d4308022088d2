"""The OpenAI Responses API (``/v1/responses``) through the official openai SDK: text,
reasoning and tool calls out of a scripted model (the demo tokenizer and template),
streamed events as the SDK accumulates them, the round trip served from cache, the
store, and every malformed field a 400 that names it."""

import contextlib
import json
import logging
from pathlib import Path

import aiohttp
import openai
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from blockserve.engine.models.loader import resolve
from blockserve.server import keepalive
from tests.server_harness import serve, serve_scripted

MODEL = "demo:tiny"
THINK = "<think>\nThe user wants a.py.\n</think>\n\n"
ANSWER = "It prints 1."


def call(name, args):
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'


REPLY = THINK + "Reading it.\n" + call("read", {"path": "a.py"})
TOOLS = [{"type": "function", "name": "read", "description": "Read a file.",
          "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                         "required": ["path"]}}]
SYSTEM = "You are a coding agent. Read files before you answer. " * 6
INPUT = [{"type": "message", "role": "developer",
          "content": [{"type": "input_text", "text": SYSTEM}]},
         {"type": "message", "role": "user",
          "content": [{"type": "input_text", "text": "Open a.py"}]}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(Path(resolve(MODEL)[1]))


@contextlib.asynccontextmanager
async def scripted(tokenizer, *scripts, **kw):
    async with serve_scripted(tokenizer, MODEL, list(scripts), **kw) as (url, gen, _, _):
        yield url, gen


def oa(url):
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


async def post(url, body, path="/v1/responses"):
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body) as r:
            return r.status, await r.text()


def sse_events(text):
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


async def test_create_reasoning_text_and_a_tool_call(tokenizer):
    async with scripted(tokenizer, REPLY) as (url, _):
        r = await oa(url).responses.create(model=MODEL, input=INPUT, tools=TOOLS,
                                           max_output_tokens=64)
        assert r.status == "completed" and r.id.startswith("resp_")
        assert [o.type for o in r.output] == ["reasoning", "message", "function_call"]
        assert r.output[0].content[0].text == "The user wants a.py."
        assert r.output_text == "Reading it."
        fc = r.output[2]
        assert fc.name == "read" and json.loads(fc.arguments) == {"path": "a.py"}
        assert fc.call_id.startswith("call_") and fc.namespace is None
        u = r.usage
        assert u.input_tokens > 50 and u.output_tokens == len(tokenizer.encode(REPLY)) + 1
        assert 0 < u.output_tokens_details.reasoning_tokens < u.output_tokens
        assert u.total_tokens == u.input_tokens + u.output_tokens
        assert u.input_tokens_details.cached_tokens == 0


async def test_plain_string_input_and_instructions(tokenizer):
    async with scripted(tokenizer, ANSWER) as (url, _):
        r = await oa(url).responses.create(model=MODEL, input="hi", instructions=SYSTEM)
        assert r.output_text == ANSWER and [o.type for o in r.output] == ["message"]
        assert r.instructions == SYSTEM


async def test_stream_events_as_the_sdk_accumulates_them(tokenizer):
    async with scripted(tokenizer, REPLY) as (url, _):
        async with oa(url).responses.stream(model=MODEL, input=INPUT, tools=TOOLS,
                                            max_output_tokens=64) as stream:
            events = [e async for e in stream]
            final = await stream.get_final_response()
        kinds = [e.type for e in events]
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[-1] == "response.completed"
        assert [e.sequence_number for e in events] == list(range(len(events)))
        for k in ("response.reasoning_text.delta", "response.output_text.delta",
                  "response.output_text.done", "response.content_part.added",
                  "response.function_call_arguments.delta",
                  "response.function_call_arguments.done"):
            assert k in kinds, k
        assert kinds.count("response.output_item.added") == 3
        assert kinds.count("response.output_item.done") == 3
        assert final.output_text == "Reading it."
        fc = final.output[-1]
        assert fc.type == "function_call" and json.loads(fc.arguments) == {"path": "a.py"}
        assert final.usage.output_tokens > 0


async def test_a_summary_asked_for_is_the_reasoning_itself(tokenizer):
    async with scripted(tokenizer, THINK + ANSWER) as (url, _):
        client = oa(url)
        async with client.responses.stream(model=MODEL, input=INPUT,
                                           reasoning={"summary": "auto"}) as stream:
            events = [e async for e in stream]
            final = await stream.get_final_response()
        kinds = [e.type for e in events]
        summary = "".join(e.delta for e in events
                          if e.type == "response.reasoning_summary_text.delta")
        assert summary == "The user wants a.py." and kinds.index(
            "response.reasoning_summary_part.added") < kinds.index(
            "response.reasoning_summary_part.done")
        rs = final.output[0]
        assert rs.summary[0].text == rs.content[0].text == summary
        r = await client.responses.create(model=MODEL, input=INPUT)  # none asked: none
        assert r.output[0].summary == [] and r.output[0].content[0].text == summary
        count = await client.responses.input_tokens.count(model=MODEL, input=INPUT)
        assert count.input_tokens == r.usage.input_tokens


async def test_the_round_trip_is_served_from_cache_through_reasoning(tokenizer):
    """Turn 2 sends turn 1's output back (reasoning as encrypted_content) with the
    call's output: its prompt hits the blocks of turn 1's prompt and reply."""
    async with scripted(tokenizer, REPLY, ANSWER) as (url, _):
        client = oa(url)
        r1 = await client.responses.create(model=MODEL, input=INPUT, tools=TOOLS, store=False,
                                           include=["reasoning.encrypted_content"])
        rs = r1.output[0]
        assert rs.encrypted_content and "wants" not in rs.encrypted_content
        history = INPUT + [o.model_dump(exclude_none=True) for o in r1.output]
        history[2].pop("content")  # as Codex sends it back: the encrypted blob only
        history.append({"type": "function_call_output", "call_id": r1.output[2].call_id,
                        "output": "print(1)"})
        r2 = await client.responses.create(model=MODEL, input=history, tools=TOOLS)
        assert r2.output_text == ANSWER
        turn1 = r1.usage.input_tokens + r1.usage.output_tokens
        cached = r2.usage.input_tokens_details.cached_tokens
        assert cached >= turn1 // 16 * 16 - 16 and cached > r1.usage.input_tokens


async def test_namespace_and_custom_tools_map_back(tokenizer):
    tools = [{"type": "namespace", "name": "agents", "description": "Sub-agents.",
              "tools": [{"type": "function", "name": "spawn", "parameters": {
                  "type": "object", "properties": {"task": {"type": "string"}}}}]},
             {"type": "custom", "name": "apply_patch", "description": "Patch files.",
              "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
             {"type": "web_search"}]
    patch = "*** Begin Patch\n*** End Patch"
    script = call("agents__spawn", {"task": "t"}) + "\n" + call("apply_patch",
                                                                 {"input": patch})
    async with scripted(tokenizer, script, ANSWER) as (url, gen):
        client = oa(url)
        r1 = await client.responses.create(model=MODEL, input=INPUT, tools=tools,
                                           max_output_tokens=256)
        fc, ctc = r1.output
        assert (fc.type, fc.name, fc.namespace) == ("function_call", "spawn", "agents")
        assert (ctc.type, ctc.name, ctc.input) == ("custom_tool_call", "apply_patch", patch)
        history = INPUT + [o.model_dump(exclude_none=True) for o in r1.output]
        history[-1]["namespace"] = "functions"  # a client's own label on a plain tool
        history += [
            {"type": "function_call_output", "call_id": fc.call_id, "output": "ok"},
            {"type": "custom_tool_call_output", "call_id": ctc.call_id, "output": "done"}]
        r2 = await client.responses.create(model=MODEL, input=history, tools=tools)
        assert r2.output_text == ANSWER
        prompt = tokenizer.decode(gen.inserted[-1].prompt)
        assert "start: /.+/" in prompt and "web_search" not in prompt
        assert prompt.count(script) == 1  # the calls re-render as the model wrote them
        assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens // 16 * 16


async def test_store_previous_response_id_get_and_delete(tokenizer):
    async with scripted(tokenizer, ANSWER, "Second.") as (url, gen):
        client = oa(url)
        r1 = await client.responses.create(model=MODEL, input="Say it.", instructions=SYSTEM)
        got = await client.responses.retrieve(r1.id)
        assert got.id == r1.id and got.output_text == ANSWER
        r2 = await client.responses.create(model=MODEL, input="Again.",
                                           previous_response_id=r1.id)
        assert r2.output_text == "Second." and r2.previous_response_id == r1.id
        prompt = tokenizer.decode(gen.inserted[-1].prompt)
        assert "Say it." in prompt and ANSWER in prompt and "Again." in prompt
        assert SYSTEM not in prompt  # instructions are not carried over, as OpenAI
        await client.responses.delete(r1.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(r1.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model=MODEL, input="x", previous_response_id="nope")
        r3 = await client.responses.create(model=MODEL, input="x", store=False)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(r3.id)


async def test_stored_responses_are_per_tenant(tokenizer):
    async with scripted(tokenizer, ANSWER, api_keys=("ka", "kb")) as (url, _):
        a = openai.AsyncOpenAI(base_url=url + "/v1", api_key="ka", max_retries=0)
        b = openai.AsyncOpenAI(base_url=url + "/v1", api_key="kb", max_retries=0)
        r = await a.responses.create(model=MODEL, input="hi")
        assert (await a.responses.retrieve(r.id)).id == r.id
        with pytest.raises(openai.NotFoundError):
            await b.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            await b.responses.create(model=MODEL, input="x", previous_response_id=r.id)


async def test_reasoning_effort_is_the_thinking_switch(tokenizer):
    async with scripted(tokenizer, ANSWER) as (url, gen):
        client = oa(url)
        await client.responses.create(model=MODEL, input="hi", reasoning={"effort": "none"})
        off = tokenizer.decode(gen.inserted[-1].prompt)
        await client.responses.create(model=MODEL, input="hi", reasoning={"effort": "high"})
        on = tokenizer.decode(gen.inserted[-1].prompt)
        assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")


async def test_max_output_tokens_is_incomplete(tokenizer):
    async with scripted(tokenizer, THINK + ANSWER * 4) as (url, _):
        r = await oa(url).responses.create(model=MODEL, input="hi", max_output_tokens=20)
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert r.usage.output_tokens == 20
        status, text = await post(url, {"model": MODEL, "input": "hi", "stream": True,
                                        "max_output_tokens": 20})
        events = sse_events(text)
        assert status == 200 and events[-1]["type"] == "response.incomplete"
        assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_a_prompt_over_the_context_is_a_failed_event(tokenizer):
    async with scripted(tokenizer, ANSWER, max_prompt_tokens=64) as (url, _):
        status, text = await post(url, {"model": MODEL, "input": SYSTEM * 4, "stream": True})
        events = sse_events(text)
        assert status == 200 and [e["type"] for e in events] == ["response.created",
                                                                 "response.failed"]
        assert events[-1]["response"]["error"]["code"] == "context_length_exceeded"
        status, text = await post(url, {"model": MODEL, "input": SYSTEM * 4})
        error = json.loads(text)["error"]
        assert status == 400 and (error["code"], error["param"]) == (
            "context_length_exceeded", "input")


async def test_keepalive_while_nothing_is_produced(tokenizer, monkeypatch):
    monkeypatch.setattr(keepalive, "INTERVAL_S", 0.02)
    async with scripted(tokenizer, ANSWER, token_delay=0.1) as (url, _):
        async with oa(url).responses.stream(model=MODEL, input="hi") as stream:
            kinds = [e.type async for e in stream]
            final = await stream.get_final_response()
        assert kinds.count("response.in_progress") > 2 and final.output_text == ANSWER


async def test_hosted_tools_and_unknown_fields_are_ignored_with_a_warning(tokenizer, caplog):
    caplog.set_level(logging.WARNING, "blockserve.server")
    body = {"model": MODEL, "input": INPUT, "tools": TOOLS + [{"type": "web_search"}],
            "tool_choice": "auto", "parallel_tool_calls": True, "store": False,
            "reasoning": {"summary": "auto", "effort": "low"}, "prompt_cache_key": "k",
            "include": ["reasoning.encrypted_content"], "client_metadata": {"a": "b"},
            "frobnicate": 1}
    async with scripted(tokenizer, ANSWER) as (url, _):
        status, text = await post(url, body)
        assert status == 200 and json.loads(text)["output"][0]["type"] == "message"
        assert "ignoring field(s) with no effect here: frobnicate" in caplog.text
        assert "ignoring hosted tool(s) web_search" in caplog.text


BAD = [({"input": 3}, "input"), ({"input": []}, "input"), ({"input": [1]}, "input"),
       ({"input": [{"type": "message", "role": "boss", "content": "x"}]}, "input"),
       ({"input": [{"type": "function_call", "name": "f", "arguments": {}}]}, "input"),
       ({"input": [{"type": "item_reference", "id": "x"}]}, "input"),
       ({"max_output_tokens": 0}, "max_output_tokens"),
       ({"max_output_tokens": "9"}, "max_output_tokens"),
       ({"temperature": 7}, "temperature"), ({"top_p": "x"}, "top_p"),
       ({"tools": {}}, "tools"), ({"tools": [{"type": "function"}]}, "tools"),
       ({"tools": [{"type": "function", "name": "f", "parameters": 1}]}, "tools"),
       ({"tools": TOOLS + TOOLS}, "tools"), ({"tool_choice": 5}, "tool_choice"),
       ({"tool_choice": "required"}, "tool_choice"),
       ({"tool_choice": {"type": "web_search"}}, "tool_choice"),
       ({"text": {"format": {"type": "xml"}}}, "text.format"),
       ({"text": {"format": {"type": "json_schema", "schema": 1}}}, "text.format.schema"),
       ({"reasoning": {"effort": "max"}}, "reasoning.effort"),
       ({"reasoning": {"summary": "long"}}, "reasoning.summary"),
       ({"metadata": {"k": 1}}, "metadata"), ({"include": "x"}, "include"),
       ({"instructions": ["x"]}, "instructions"), ({"background": True}, "background"),
       ({"previous_response_id": 1}, "previous_response_id"), ({"stream": "yes"}, "stream"),
       ({"input": [{"type": "message", "role": "user", "content": [
           {"type": "input_image", "image_url": "data:,"}]}]}, "messages")]


async def test_malformed_fields_are_400s_that_name_them(tokenizer):
    async with scripted(tokenizer, ANSWER) as (url, _):
        for extra, param in BAD:
            status, text = await post(url, {"model": MODEL, "input": "hi", **extra})
            assert status == 400, (extra, text)
            assert json.loads(text)["error"]["param"] == param, (extra, text)
        status, text = await post(url, {"model": MODEL, "input": "hi"})
        assert status == 200, text


# ---- on a real (random-weight) demo model: the engine, the grammars, the cache -------


@pytest.fixture(scope="module")
def worker():
    from blockserve.engine.runtime.worker import EngineWorker

    w = EngineWorker(MODEL, block_size=16, max_running=4)
    yield w
    w.close()


async def test_demo_model_create_then_stream_hits_the_cache(worker):
    async with serve(worker) as srv:
        client = oa(srv.url)
        r1 = await client.responses.create(model=MODEL, instructions=SYSTEM, input="Hi.",
                                           max_output_tokens=8, temperature=0)
        assert r1.status in ("completed", "incomplete") and r1.usage.output_tokens > 0
        assert r1.usage.input_tokens_details.cached_tokens == 0
        async with client.responses.stream(model=MODEL, instructions=SYSTEM, input="Hi.",
                                           max_output_tokens=8, temperature=0) as stream:
            events = [e async for e in stream]
        # a random model rarely stops: the SDK's final response is the last event's
        assert events[-1].type == f"response.{r1.status}"
        r2 = events[-1].response
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == r2.output_text == r1.output_text  # greedy: the same reply
        assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens // 16 * 16


async def test_demo_model_forced_call_and_json_schema_through_the_grammar(worker):
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    async with serve(worker) as srv:
        client = oa(srv.url)
        tools = [{**TOOLS[0], "parameters": {  # bounded, so a random model finishes
            "type": "object", "properties": {"path": {"type": "string", "maxLength": 8}},
            "required": ["path"], "additionalProperties": False}}]
        r = await client.responses.create(model=MODEL, input="Open a.py", tools=tools,
                                          tool_choice="required", parallel_tool_calls=False,
                                          max_output_tokens=128, temperature=0)
        calls = [o for o in r.output if o.type == "function_call"]
        assert calls and all(c.name == "read" for c in calls), r.output
        assert all(isinstance(json.loads(c.arguments)["path"], str) for c in calls)
        schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                   "population": {"type": "integer",
                                                                  "maximum": 99}},
                  "required": ["name", "population"], "additionalProperties": False}
        parsed = await client.responses.parse(
            model=MODEL, input="A city?", text_format=City, max_output_tokens=64,
            temperature=0,
            extra_body={"text": {"format": {"type": "json_schema", "name": "City",
                                            "schema": schema, "strict": True}}})
        city = parsed.output_parsed
        assert isinstance(city, City) and len(city.name) <= 8 and city.population <= 99


JUNK = [None, 0, -1, 1e308, "x", "", True, [], {}, [1], [{}], {"type": 1}, {"type": "x"},
        [{"type": "function"}], [{"type": "message", "role": "user", "content": [{}]}]]
FIELDS = ["input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "stream",
          "max_output_tokens", "temperature", "top_p", "text", "reasoning", "include",
          "store", "previous_response_id", "metadata", "user", "background", "truncation",
          "top_logprobs", "stream_options", "prompt_cache_key", "model"]
ITEMS = [{"type": t, **extra} for t in ("message", "function_call", "function_call_output",
                                         "reasoning", "custom_tool_call",
                                         "custom_tool_call_output", "web_search_call", 7)
         for extra in ({}, {"role": 1, "content": 1, "name": 1, "call_id": 1, "output": 1,
                            "arguments": 1, "input": 1, "encrypted_content": 1},
                       {"role": "user", "content": [1, {"type": 1}], "name": "f",
                        "call_id": "c", "output": [{"type": "input_text"}], "arguments": "{",
                        "input": "i", "encrypted_content": "bs1.%%%", "summary": 1})]


async def test_no_junk_in_any_field_is_a_5xx(tokenizer):
    async with scripted(tokenizer, ANSWER) as (url, _):
        for name in FIELDS:
            for value in JUNK:
                status, text = await post(url, {"model": MODEL, "input": "hi", name: value})
                assert status < 500, (name, value, text)
        for item in ITEMS:
            status, text = await post(url, {"model": MODEL, "input": [item]})
            assert status < 500, (item, text)
