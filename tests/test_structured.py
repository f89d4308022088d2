"""Structured output on real engines: JSON schemas, JSON mode, regexes, choices and
forced tool calls, through the official SDKs. On a random-weight demo model the output
conforms only because the grammar makes it, so every check here can fail."""

import asyncio
import json

import anthropic
import jsonschema
import mlx.core as mx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockserve.engine.models.loader import DEFAULT_MODEL, load_weights, resolve
from blockserve.engine.runtime.sampling import GrammarProcessor
from blockserve.engine.text.structured import Grammars, JsonCloser
from blockserve.engine.runtime.worker import EngineWorker
from tests.engine_harness import reference_tokens
from tests.server_harness import metrics, serve

MODEL = "demo:tiny"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                 "minItems": 1, "maxItems": 3},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 16},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "days": {"type": "integer", "minimum": 1,
                                                     "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
READ = {"type": "object", "properties": {"path": {"type": "string", "maxLength": 30}},
        "required": ["path"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "read", "parameters": READ}}]
TOOLS_AN = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]}
            for t in TOOLS]
PROMPTS = [f"Tell me about user number {i}, please." for i in range(6)]


@pytest.fixture(scope="module")
def worker():
    w = EngineWorker(MODEL, block_size=16, max_running=16)
    yield w
    w.close()


@pytest.fixture(scope="module")
def grammars():
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from pathlib import Path

    return Grammars(load_tokenizer(Path(resolve(MODEL)[1])))


def oa(url):
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def user(text):
    return [{"role": "user", "content": text}]


async def test_a_nested_schema_always_conforms(worker):
    """Greedy and sampled, concurrent in one batch: every reply validates."""
    async with serve(worker) as srv:
        fmt = {"type": "json_schema",
               "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
        greedy = [oa(srv.url).chat.completions.create(
            model=MODEL, messages=user(p), temperature=0, max_tokens=200,
            response_format=fmt) for p in PROMPTS]
        sampled = [oa(srv.url).chat.completions.create(
            model=MODEL, messages=user(p), temperature=1.0, seed=i, max_tokens=200,
            response_format=fmt) for i, p in enumerate(PROMPTS)]
        replies = await asyncio.gather(*greedy, *sampled)
        for r in replies:
            c = r.choices[0]
            assert c.finish_reason == "stop", c.message.content
            jsonschema.validate(json.loads(c.message.content), PERSON)
        texts = {r.choices[0].message.content for r in replies}
        assert len(texts) > len(PROMPTS), "the replies should differ (the model is free "\
                                          "where the schema allows)"


async def test_anthropic_output_format_conforms(worker):
    async with serve(worker) as srv:
        client = anthropic.AsyncAnthropic(base_url=srv.url, api_key="x", max_retries=0)
        for p in PROMPTS[:3]:
            msg = await client.messages.create(
                model=MODEL, max_tokens=200, messages=user(p),
                extra_body={"temperature": 0, "output_config": {
                    "format": {"type": "json_schema", "schema": PERSON}}})
            assert msg.stop_reason == "end_turn"
            jsonschema.validate(json.loads(msg.content[0].text), PERSON)


async def test_json_mode_always_yields_a_json_object(worker):
    """The random model writes strings forever; near max_tokens the engine completes the
    document, so it parses, and the finish reason still says it was cut short."""
    async with serve(worker) as srv:
        replies = await asyncio.gather(*[oa(srv.url).chat.completions.create(
            model=MODEL, messages=user(p), temperature=t, seed=seed, max_tokens=40,
            response_format={"type": "json_object"})
            for p in PROMPTS for t in (0, 1) for seed in (1, 2)])
        for r in replies:
            assert isinstance(json.loads(r.choices[0].message.content), dict)
            assert r.usage.completion_tokens <= 40
        assert "length" in {r.choices[0].finish_reason for r in replies}


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=5), _JSON, max_size=4))
def test_every_prefix_of_a_document_closes_to_json(doc):
    """Cut a compact document anywhere: the closer's text completes it to an object
    (None only inside a multi-byte character)."""
    data = json.dumps(doc, ensure_ascii=False, separators=(", ", ": ")).encode()
    for cut in range(len(data) + 1):
        closer = JsonCloser()
        closer.feed(data[:cut])
        tail = closer.closing()
        if tail is None:
            with pytest.raises(UnicodeDecodeError):
                data[:cut].decode()
            continue
        assert isinstance(json.loads(data[:cut].decode() + tail), dict), (data[:cut], tail)


async def test_forced_tool_choices_yield_parsable_calls(worker):
    async with serve(worker) as srv:
        for p in PROMPTS[:3]:
            r = await oa(srv.url).chat.completions.create(
                model=MODEL, messages=user(p), temperature=0, max_tokens=200, tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
            c = r.choices[0]
            assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
            call = c.message.tool_calls[0].function
            assert call.name == "get_weather"
            jsonschema.validate(json.loads(call.arguments), WEATHER)
        r = await oa(srv.url).chat.completions.create(
            model=MODEL, messages=user("Go."), temperature=0, max_tokens=300, tools=TOOLS,
            tool_choice="required", parallel_tool_calls=False)
        calls = r.choices[0].message.tool_calls
        assert len(calls) == 1
        schema = {"get_weather": WEATHER, "read": READ}[calls[0].function.name]
        jsonschema.validate(json.loads(calls[0].function.arguments), schema)

        client = anthropic.AsyncAnthropic(base_url=srv.url, api_key="x", max_retries=0)
        for choice in ({"type": "tool", "name": "read"}, {"type": "any"}):
            msg = await client.messages.create(  # up to 8 parallel calls under "any"
                model=MODEL, max_tokens=600, tools=TOOLS_AN, tool_choice=choice,
                messages=user("Open the file."), extra_body={"temperature": 0})
            assert msg.stop_reason == "tool_use"
            uses = [b for b in msg.content if b.type == "tool_use"]
            assert uses and (choice["type"] == "any" or uses[0].name == "read")
            for u in uses:
                jsonschema.validate(u.input, {"get_weather": WEATHER, "read": READ}[u.name])


async def test_streamed_constrained_replies(worker):
    """The same guarantees when streamed: a forced call arrives as tool-call deltas,
    schema output as text deltas that join into valid JSON."""
    async with serve(worker) as srv:
        stream = await oa(srv.url).chat.completions.create(
            model=MODEL, messages=user("Weather?"), temperature=0, max_tokens=200,
            tools=TOOLS, stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        calls, finish = {}, None
        async for chunk in stream:
            c = chunk.choices[0]
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"name": "", "arguments": ""})
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
            finish = c.finish_reason or finish
        assert finish == "tool_calls" and [c["name"] for c in calls.values()] == [
            "get_weather"]
        jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)

        client = anthropic.AsyncAnthropic(base_url=srv.url, api_key="x", max_retries=0)
        text = []
        async with client.messages.stream(
                model=MODEL, max_tokens=200, messages=user("A user."),
                extra_body={"temperature": 0, "output_config": {
                    "format": {"type": "json_schema", "schema": PERSON}}}) as s:
            async for delta in s.text_stream:
                text.append(delta)
        assert len(text) > 3
        jsonschema.validate(json.loads("".join(text)), PERSON)


async def test_the_forced_call_is_in_the_models_own_format(worker):
    """The reply re-rendered by the template is the tokens the model produced, so the
    next turn's prompt hits the cache through the call."""
    async with serve(worker) as srv:
        msgs = user("What is the weather?")
        r = await oa(srv.url).chat.completions.create(
            model=MODEL, messages=msgs, temperature=0, max_tokens=200, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        call = r.choices[0].message.tool_calls[0]
        turn = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                       {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        r2 = await oa(srv.url).chat.completions.create(
            model=MODEL, messages=turn, temperature=0, max_tokens=4, tools=TOOLS)
        prompt1 = r.usage.prompt_tokens + r.usage.completion_tokens
        assert r2.usage.prompt_tokens_details.cached_tokens >= (prompt1 - 1) // 16 * 16


async def test_regex_and_choice_on_completions(worker):
    async with serve(worker) as srv:
        r = await oa(srv.url).completions.create(
            model=MODEL, prompt="The code is", max_tokens=32, temperature=0,
            extra_body={"guided_regex": r"[A-Z]{3}-[0-9]{4}"})
        assert r.choices[0].text and __import__("re").fullmatch(r"[A-Z]{3}-[0-9]{4}",
                                                                r.choices[0].text)
        r = await oa(srv.url).completions.create(  # an escaped slash (issue 29)
            model=MODEL, prompt="The ratio is", max_tokens=12, temperature=0,
            extra_body={"guided_regex": r"\d{1,3}\/\d{1,3}"})
        assert __import__("re").fullmatch(r"\d{1,3}/\d{1,3}", r.choices[0].text)
        r = await oa(srv.url).chat.completions.create(
            model=MODEL, messages=user("Yes or no?"), max_tokens=8, temperature=0,
            extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
        assert r.choices[0].message.content in ("yes", "no", "maybe")


# Real-world patterns as clients write them (Python's re, JavaScript, JSON encoders
# that escape slashes): (pattern, strings it matches whole, strings it doesn't).
REAL_PATTERNS = [
    (r"\d+\/\d+", ["3/4", "10/200"], ["3\\/4", "3-4", "/4"]),  # issue 29
    (r"^\d{4}-\d{2}-\d{2}$", ["2024-01-31"], ["2024-1-31", "2024/01/31"]),
    (r"\d{1,2}\/\d{1,2}\/\d{4}", ["1/2/2024", "12/31/1999"], ["1-2-2024"]),
    (r"(\/[\w.-]+)+\/?", ["/usr/local/bin/", "/a.txt"], ["usr/bin", "//"]),
    (r"[A-Za-z]:\\[\w\\ .-]*", ["C:\\Program Files\\x.exe"], ["C:/x"]),
    (r"[\w.+-]+@[\w-]+\.[\w.-]+", ["ann.lee+x@mail.example.com"], ["ann@", "a@b"]),
    (r"^[a-zA-Z0-9._%+\-]+@[a-zA-Z0-9.\-]+\.[a-zA-Z]{2,}$", ["a_b-c@x-y.org"],
     ["a@b.c", "a b@c.org"]),
    (r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([\w.-]+))?(?:\+([\w.-]+))?",
     ["1.2.3", "10.0.1-rc.1+build.5"], ["1.2", "01.2.3"]),
    (r"[0-9a-f]{8}-[0-9a-f]{4}-[1-5][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
     ["123e4567-e89b-12d3-a456-426614174000"], ["123e4567-e89b-62d3-a456-426614174000"]),
    (r"(?i)[0-9A-F]{8}(-[0-9A-F]{4}){3}-[0-9A-F]{12}",
     ["123E4567-e89b-12d3-A456-426614174000"], ["123E4567"]),
    (r"https?:\/\/[^\s/$.?#][^\s]*", ["https://example.com/a?b=1"], ["ftp://x", "http:// x"]),
    (r"\$\d+\.\d{2}", ["$12.50"], ["12.50", "$1.5"]),
    (r"\<b\>\w+\<\/b\>", ["<b>hi</b>"], ["<b>hi</b"]),  # \< is a literal in re
    (r"a{,2}b\{", ["b{", "aab{"], ["aaab{"]),
    (r"[\b\t]\x41\u00e9\N{DIGIT ONE}\0", ["\bA\u00e91\x00"], ["\bA\u00e91"]),
    (r"(?P<key>\w+)=(?P<value>[^;]*)(?#a comment);", ["k=v;", "k=;"], ["=v;"]),
    (r"[]a[]+", ["]a[", "["], ["b"]),  # Python's literal ] and [ in a class
]


@pytest.mark.parametrize("pattern, good, bad", REAL_PATTERNS)
def test_real_world_regexes_mean_what_pythons_re_means(grammars, pattern, good, bad):
    """Each pattern compiles as a regex and as a JSON schema's ``pattern``, and the
    grammar accepts exactly what ``re.fullmatch`` does on the samples."""
    import re

    import llguidance as llg

    vocab = grammars.vocab

    def accepts(grammar, text):
        m = llg.LLMatcher(vocab, grammar)
        toks = vocab.tokenize_str(text)
        return m.try_consume_tokens(toks) == len(toks) and m.is_accepting()

    for s in good + bad:  # the table itself is right
        assert bool(re.fullmatch(pattern, s)) == (s in good), s
    rx = grammars.regex(pattern).grammar
    schema = grammars.json_schema({"type": "string", "pattern": pattern}).grammar
    for s in good:
        assert accepts(rx, s) and accepts(schema, json.dumps(s, ensure_ascii=False)), s
    for s in bad:
        assert not accepts(rx, s), s


@pytest.mark.parametrize("pattern, construct", [
    (r"(?=a)a", "lookahead"), (r"(?<!a)b", "lookbehind"), (r"(a)\1", "backreference"),
    (r"(?P<x>a)(?P=x)", "backreference"), (r"\bword\b", "word boundary"),
    (r"\Bx", "word-boundary"), (r"a*+", "possessive"), (r"(?>a)", "atomic group"),
    (r"(a)?(?(1)b|c)", "conditional"), (r"(?a)\w", "ASCII flag"),
    (r"\p{L}", "bad escape \\p"), (r"[a-", "not a valid regular expression"),
])
def test_regexes_that_cant_be_enforced_name_the_construct(grammars, pattern, construct):
    from blockserve.engine.text.structured import GrammarError

    for compile_ in (lambda: grammars.regex(pattern),
                     lambda: grammars.json_schema({"type": "string", "pattern": pattern})):
        with pytest.raises(GrammarError) as e:
            compile_()
        assert construct in str(e.value)


async def test_n_choices_each_conform(worker):
    async with serve(worker) as srv:
        before = (await metrics(srv.url)).get(
            'blockserve_structured_requests_total{format="json"}', 0)
        r = await oa(srv.url).chat.completions.create(
            model=MODEL, messages=user("A person."), n=4, temperature=1.0, seed=7,
            max_tokens=200, response_format={"type": "json_schema", "json_schema": {
                "name": "p", "schema": PERSON}})
        assert len(r.choices) == 4
        for c in r.choices:
            jsonschema.validate(json.loads(c.message.content), PERSON)
        after = (await metrics(srv.url))['blockserve_structured_requests_total{format="json"}']
        assert after - before == 4


@pytest.mark.parametrize("body, param, reason", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"not": {"type": "string"}}}}}, "response_format", "not"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}},
     "response_format", "minimum"),
    ({"guided_json": "{not json"}, "guided_json", "JSON"),
    ({"guided_regex": "(?<=a)b"}, "guided_regex", "look"),
    ({"guided_grammar": "root ::= x"}, "guided_grammar", "not supported"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "nope"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {
        "type": "json_object"}}, "tool_choice", "combined"),
])
async def test_formats_that_cant_be_enforced_are_400s_that_say_why(worker, body, param,
                                                                  reason):
    async with serve(worker) as srv:
        with pytest.raises(openai.BadRequestError) as e:
            await oa(srv.url).chat.completions.create(model=MODEL, messages=user("hi"),
                                                      max_tokens=4, extra_body=body)
        err = e.value.body
        assert err["param"] == param and reason in err["message"], err
        r = await oa(srv.url).chat.completions.create(model=MODEL, messages=user("hi"),
                                                      max_tokens=2)
        assert r.choices[0].finish_reason in ("length", "stop")  # still serving


async def test_free_requests_stay_exact_beside_constrained_ones(worker):
    """Constrained and free requests share batches; the free ones still produce
    exactly mlx-lm's greedy tokens."""
    ref_model = load_weights(MODEL).model
    n = 24
    async with serve(worker) as srv:
        fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
        free = [oa(srv.url).completions.create(
            model=MODEL, prompt=p, max_tokens=n, temperature=0,
            extra_body={"ignore_eos": True})
            for p in PROMPTS[:4]]
        constrained = [oa(srv.url).chat.completions.create(
            model=MODEL, messages=user(p), temperature=0, max_tokens=200,
            response_format=fmt) for p in PROMPTS[:4]]
        replies = await asyncio.gather(*free, *constrained)
        for p, r in zip(PROMPTS[:4], replies[:4]):
            expected = reference_tokens(ref_model, srv.frontend.encode(p), n)
            assert r.choices[0].text == srv.frontend.decode(expected)
        for r in replies[4:]:
            jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def _allowed_after(proc, context, logits):
    out = proc(mx.array(context), logits)
    return {i for i, v in enumerate(out[0].tolist()) if v > float("-inf")}


def test_the_mask_waits_for_the_end_of_reasoning():
    """A reply that opens in reasoning is free until the end-of-thinking tokens; with
    thinking asked for, the first token may open a think block instead of the answer.
    Either way the answer after it follows the grammar."""
    tok = load_weights(MODEL).tokenizer
    grammars = Grammars(tok)
    think_start = tok.encode("<think>", add_special_tokens=False)
    think_end = tok.encode("</think>", add_special_tokens=False)
    answers = {tok.encode(w, add_special_tokens=False)[0] for w in ("yes", "no")}
    logits = mx.zeros((1, grammars.vocab.vocab_size))
    prompt = tok.encode("hello", add_special_tokens=False)

    opened = grammars.with_reasoning(grammars.choice(["yes", "no"]), True, False)
    proc = GrammarProcessor(grammars.vocab, opened, max_tokens=100)
    context = list(prompt)
    assert mx.array_equal(proc(mx.array(context), logits), logits)  # reasoning: free
    for t in [*tok.encode(" thinking", add_special_tokens=False), *think_end]:
        context.append(t)
        allowed = _allowed_after(proc, context, logits)
    assert answers <= allowed and len(allowed) < 10

    optional = grammars.with_reasoning(grammars.choice(["yes", "no"]), False, True)
    proc = GrammarProcessor(grammars.vocab, optional, max_tokens=100)
    context = list(prompt)
    first = _allowed_after(proc, context, logits)
    assert answers | set(think_start) <= first and len(first) < 10
    for t in [*think_start, *tok.encode(" hmm", add_special_tokens=False)]:
        context.append(t)
        assert mx.array_equal(proc(mx.array(context), logits), logits)
    context += think_end
    after = _allowed_after(proc, context, logits)
    assert answers <= after and not set(think_start) & after

    plain = grammars.with_reasoning(grammars.choice(["yes", "no"]), False, False)
    proc = GrammarProcessor(grammars.vocab, plain, max_tokens=100)
    first = _allowed_after(proc, list(prompt), logits)
    assert answers <= first and not set(think_start) & first


async def test_a_model_asked_to_think_thinks_before_the_constrained_answer(worker):
    """With thinking on, the reply may reason first (here steered into it with
    logit_bias) and the answer after the reasoning still conforms."""
    async with serve(worker) as srv:
        start = srv.frontend.encode("<think>", add_special_tokens=False)[0]
        end = srv.frontend.encode("</think>", add_special_tokens=False)[0]
        r = await oa(srv.url).chat.completions.create(
            model=MODEL, messages=user("A user."), temperature=0, max_tokens=200,
            logit_bias={str(start): 50, str(end): 100}, logprobs=True,
            response_format={"type": "json_schema", "json_schema": {"name": "p",
                                                                   "schema": PERSON}},
            extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        tokens = [t.token for t in r.choices[0].logprobs.content]
        assert tokens[:2] == ["<think>", "</think>"]  # it did think (briefly) first
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


async def test_a_real_model_without_a_call_format_gets_bare_calls():
    """SmolLM2 has no tool-call format: a forced choice makes the whole reply one JSON
    call, which comes back as a tool call; its schema output is real JSON too."""
    w = EngineWorker(DEFAULT_MODEL, block_size=16, max_running=4)
    try:
        async with serve(w) as srv:
            r = await oa(srv.url).chat.completions.create(
                model=srv.frontend.model_id, messages=user("What's the weather in Paris?"),
                temperature=0, max_tokens=100, tools=TOOLS, tool_choice="required")
            c = r.choices[0]
            assert c.finish_reason == "tool_calls" and c.message.content is None
            call = c.message.tool_calls[0].function
            schema = {"get_weather": WEATHER, "read": READ}[call.name]
            jsonschema.validate(json.loads(call.arguments), schema)
            r = await oa(srv.url).chat.completions.create(
                model=srv.frontend.model_id, messages=user("Describe a user of our app."),
                temperature=0, max_tokens=200, response_format={
                    "type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
            jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    finally:
        w.close()
