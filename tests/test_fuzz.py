"""Property-based fuzzing of every endpoint (hypothesis): whatever a body holds, the
answer is a 2xx or a 4xx with a JSON error, never a 5xx or a hang, and the server still
serves, with nothing pinned, afterwards."""

import asyncio
import json
import threading
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockserve.engine.runtime.worker import EngineWorker
from tests.server_harness import serve

MODEL = "demo:tiny"
KEY = "fuzz-key"
ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/messages",
             "/v1/messages/count_tokens", "/v1/responses", "/v1/responses/input_tokens",
             "/tokenize", "/detokenize", "/v1/chat/completions/render",
             "/v1/completions/render", "/v1/cache/reset"]
FIELDS = ["model", "messages", "prompt", "input", "instructions", "max_tokens",
          "max_completion_tokens", "max_output_tokens", "temperature", "top_p", "top_k",
          "min_p", "seed", "stop", "stop_sequences", "stop_token_ids", "logit_bias",
          "logprobs", "top_logprobs", "n", "best_of", "stream", "stream_options", "tools",
          "tool_choice", "functions", "response_format", "guided_json", "guided_regex",
          "guided_choice", "structured_outputs", "chat_template_kwargs", "cache_salt",
          "system", "thinking", "output_config", "reasoning", "text", "tokens",
          "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty",
          "reasoning_effort", "parallel_tool_calls", "continue_final_message",
          "include_reasoning", "skip_special_tokens", "echo", "suffix", "store",
          "previous_response_id", "metadata", "include"]

# Numbers where checks go wrong: the edges of int32, int64 and the vocabulary, floats
# that are not numbers.
EDGES = [-1, 0, 1, 1029, 1030, 2**31 - 1, 2**31, 2**63, 2**64, -(2**63), 10**30,
         float("nan"), float("inf"), -float("inf"), 1e308, 0.5, -0.0]
scalars = (st.none() | st.booleans() | st.sampled_from(EDGES) | st.integers()
           | st.floats() | st.text(max_size=20)
           | st.sampled_from(["user", "assistant", "system", "tool", "developer",
                              "function", "text", "image", "tool_use", "tool_result",
                              "thinking", "input_text", "message", "function_call",
                              "json_schema", "json_object", "auto", "required", "none",
                              "\ud800", "<|im_start|>", "{{ x }}"]))
values = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.sampled_from(FIELDS + ["role", "content", "type",
                                                               "text", "name", "function",
                                                               "arguments", "schema"])
                                     | st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                 "content": st.text(max_size=12) | values})
bodies = st.fixed_dictionaries(
    {}, optional={"messages": st.lists(message, max_size=3) | values,
                  "prompt": st.text(max_size=12) | st.lists(st.sampled_from(EDGES + [5, 7]),
                                                            max_size=3) | values,
                  "max_tokens": st.integers(-2, 6) | values,
                  "stream": st.booleans(), "input": st.text(max_size=12) | values,
                  "tokens": st.lists(st.sampled_from(EDGES + [5]), max_size=3) | values}
).flatmap(lambda base: st.dictionaries(st.sampled_from(FIELDS), values, max_size=4)
          .map(lambda extra: {**base, **extra}))


HI = [{"role": "user", "content": "hi"}]
VALID = {  # a body each endpoint serves; the fuzz changes a few of its fields
    "/v1/chat/completions": {"messages": HI, "max_tokens": 2},
    "/v1/chat/completions/render": {"messages": HI},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/completions/render": {"prompt": [1, 2]},
    "/v1/messages": {"messages": HI, "max_tokens": 2},
    "/v1/messages/count_tokens": {"messages": HI},
    "/v1/responses": {"input": "hi", "max_output_tokens": 2},
    "/v1/responses/input_tokens": {"input": HI},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 2]},
    "/v1/cache/reset": {},
}


@st.composite
def requests(draw):
    """(endpoint, body): a random body, or a valid one with a few hostile fields."""
    path = draw(st.sampled_from(ENDPOINTS))
    if draw(st.booleans()):
        return path, draw(bodies)
    changes = draw(st.dictionaries(st.sampled_from(FIELDS), values, min_size=1,
                                   max_size=3))
    return path, {**VALID[path], **changes}


class Background:
    """The server on its own event loop in a thread, so hypothesis can call it."""

    def __init__(self, worker):
        self.url = None
        self.srv = None
        self._stop = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(worker),))
        self._thread.start()
        assert self._ready.wait(60)

    async def _main(self, worker):
        self._stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        async with serve(worker, api_keys=[KEY], max_model_len=96,
                         default_max_tokens=4) as srv:
            self.url, self.srv = srv.url, srv
            self._ready.set()
            await self._stop.wait()

    def close(self):
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def server():
    worker = EngineWorker(MODEL, block_size=16, max_running=8)
    bg = Background(worker)
    yield bg
    bg.close()
    worker.close()


def call(url: str, path: str, data: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json",
                                                    "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:  # a hang fails here
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests())
def test_no_body_gets_a_5xx(server, request):
    path, body = request
    data = json.dumps(body).encode()  # NaN and Infinity too: Python's json reads them
    status, text = call(server.url, path, data)
    assert status < 500, (path, body, text[:500])
    if status >= 400:
        assert "error" in json.loads(text)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(ENDPOINTS), data=st.binary(max_size=64)
       | st.text(max_size=64).map(str.encode))
def test_no_raw_bytes_get_a_5xx(server, path, data):
    status, text = call(server.url, path, data)
    assert status < 500, (path, data, text[:500])


def test_every_valid_body_is_served(server):
    """The fuzz's starting points are served (so its changes are what it tests)."""
    for path, body in VALID.items():
        status, text = call(server.url, path, json.dumps(body).encode())
        assert status == 200, (path, text)


def test_the_server_still_serves_and_holds_nothing_after_the_fuzz(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, text = call(server.url, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200 and json.loads(text)["choices"][0]["message"]
    sched = server.srv.scheduler
    for _ in range(1200):  # a state polled for up to a minute, asserted below
        if sched.idle and not sched.pool.stats().blocks_pinned:
            break
        threading.Event().wait(0.05)
    assert sched.idle and sched.pool.stats().blocks_pinned == 0 and sched.failed is None
