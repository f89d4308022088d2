"""``/openapi.json``: built from the parsers (a field a parser starts to read is in it),
lists every route, and holds against a fuzzer we didn't write: schemathesis generates
valid and invalid requests for every operation from the document, and checks that no
reply is a 5xx, that every reply matches the document, and that the server still
serves after."""

import asyncio
import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import aiohttp
import openai
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from blockserve.engine.models.loader import resolve
from blockserve.engine.text.frontend import TokenizerFrontend
from blockserve.server import openai_input, openapi
from blockserve.server.fields import Bounds, integer, take
from tests.server_harness import serve, serve_scripted

MODEL = "demo:tiny"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(Path(resolve(MODEL)[1]))


async def get_document(url: str) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/openapi.json") as r:
            assert r.status == 200 and r.content_type == "application/json"
            return await r.json()


def body_schema(doc: dict, path: str, method: str = "post") -> dict:
    return doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]


async def test_every_route_is_documented(tokenizer):
    """Every route the app serves is in the document, with a ``Doc`` of its own (a new
    endpoint without one fails here), and every JSON endpoint has its body's schema."""
    async with serve_scripted(tokenizer, MODEL, ["hi"]) as (url, _, _, _):
        doc = await get_document(url)
    assert doc["openapi"].startswith("3.1")

    routes = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages",
                 "/v1/messages/count_tokens", "/v1/responses", "/v1/responses/input_tokens",
                 "/tokenize", "/detokenize", "/v1/chat/completions/render",
                 "/v1/completions/render"):
        assert ("post", path) in routes
        schema = body_schema(doc, path)
        assert schema["additionalProperties"] is True  # unknown fields: a warning
        assert schema["properties"]
    assert {("get", "/openapi.json"), ("get", "/health"), ("get", "/v1/models"),
            ("get", "/v1/responses/{response_id}"),
            ("delete", "/v1/responses/{response_id}")} <= routes
    chat = body_schema(doc, "/v1/chat/completions")
    assert chat["required"] == ["messages"]
    assert chat["properties"]["temperature"] == {"type": ["number", "null"], "minimum": 0.0,
                                                 "maximum": 2.0}
    assert chat["properties"]["n"]["maximum"] == openai_input.MAX_CHOICES
    assert chat["properties"]["seed"]["maximum"] == 2**64 - 1
    assert "prompt_cache_key" in chat["properties"]  # inert: accepted, changes nothing
    an = body_schema(doc, "/v1/messages")
    assert an["required"] == ["max_tokens", "messages"]
    assert an["properties"]["stop_sequences"]["items"] == {"type": "string"}  # renamed
    assert "guided_regex" not in an["properties"]


def test_every_handler_has_a_doc(tokenizer):
    """The table covers the app's handlers: a route added without a ``Doc`` fails."""
    from blockserve.kvpool import BlockPool
    from blockserve.scheduler import Scheduler, SchedulerConfig
    from blockserve.server.app import ServerConfig, create_app
    from tests.fakes import ScriptedGenerator

    gen = ScriptedGenerator(block_size=16, tokenizer=tokenizer, scripts=["x"])
    app = create_app(Scheduler(gen, BlockPool(16, 1 << 20), SchedulerConfig()),
                     TokenizerFrontend([MODEL], tokenizer, resolve(MODEL)[1]),
                     ServerConfig(16))
    handlers = {r.handler for r in app.router.routes() if r.method != "HEAD"}
    assert handlers <= set(openapi.DOCS), handlers - set(openapi.DOCS)


def test_a_field_a_parser_reads_is_in_the_schema(tokenizer, monkeypatch):
    """Add a field to a parser (``_n``, which chat and completions call): it appears in
    both routes' schemas with what its reader says, without touching the document."""
    frontend = TokenizerFrontend([MODEL], tokenizer, resolve(MODEL)[1])
    bounds = Bounds(frontend.vocab_size)
    chat = openapi.DOCS[openapi.openai_api.chat_completions]
    assert "beam_width" not in openapi.request_schema(chat, frontend, bounds)["properties"]
    n = openai_input._n

    def with_new_fields(body):
        integer(body, "beam_width", 1, 1, hi=8)
        take(body, "speculation", {"enum": ["off", "lookup"]}, required=True)
        return n(body)

    monkeypatch.setattr(openai_input, "_n", with_new_fields)
    for handler in (openapi.openai_api.chat_completions, openapi.openai_api.completions):
        schema = openapi.request_schema(openapi.DOCS[handler], frontend, bounds)
        assert schema["properties"]["beam_width"] == {"type": ["integer", "null"],
                                                      "minimum": 1, "maximum": 8}
        assert schema["properties"]["speculation"] == {"enum": ["off", "lookup"]}
        assert "speculation" in schema["required"]


# ---- schemathesis against the live server ----------------------------------------------

# Bounded for two cores: a few examples per operation, short replies (the server's
# context is small, so no request can ask for a long generation).
MAX_EXAMPLES = int(os.environ.get("BLOCKSERVE_FUZZ_EXAMPLES", "12"))


def _schemathesis() -> str:
    exe = Path(sys.executable).with_name("schemathesis")
    return str(exe) if exe.exists() else shutil.which("schemathesis") or "schemathesis"


async def test_schemathesis_finds_no_5xx_and_no_reply_off_the_schema(tmp_path):
    pytest.importorskip("schemathesis")
    from blockserve.engine.runtime.worker import EngineWorker

    worker = EngineWorker(MODEL, block_size=16, max_running=4)
    try:
        async with serve(worker, max_model_len=192, default_max_tokens=8) as srv:
            junit = tmp_path / "junit.xml"
            proc = await asyncio.create_subprocess_exec(
                _schemathesis(), "run", srv.url + "/openapi.json",
                "--checks", "not_a_server_error,response_schema_conformance",
                "--mode", "all", "--phases", "examples,coverage,fuzzing,stateful",
                "--max-examples", str(MAX_EXAMPLES),
                "--seed", os.environ.get("BLOCKSERVE_FUZZ_SEED", "29"), "--workers", "2",
                "--request-timeout", "60", "--suppress-health-check", "all",
                "--generation-database", "none", "--no-color",
                "--report", "junit", "--report-junit-path", str(junit),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                cwd=tmp_path)  # its cache folder lands there
            out, _ = await asyncio.wait_for(proc.communicate(), 600)
            text = out.decode(errors="replace")
            if os.environ.get("BLOCKSERVE_FUZZ_LOG"):
                Path(os.environ["BLOCKSERVE_FUZZ_LOG"]).write_text(text)
            assert proc.returncode == 0, text[-6000:]
            cases = ET.parse(junit).getroot().iter("testcase")
            assert len(list(cases)) >= 20, text[-3000:]  # every operation was run
            # ... and the server still serves.
            async with aiohttp.ClientSession() as s:
                async with s.get(srv.url + "/health") as r:
                    assert r.status == 200 and (await r.json())["status"] == "ok"
            client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x",
                                        max_retries=0)
            r = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                temperature=0, extra_body={"ignore_eos": True})
            assert r.choices[0].finish_reason == "length"
            assert json.dumps(await get_document(srv.url))  # the document still builds
    finally:
        worker.close()


@pytest.mark.parametrize("path, body", [  # what schemathesis found (500s before)
    ("/v1/chat/completions", {"messages": [{"role": {}, "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": []}]}]}),
    ("/v1/messages", {"max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": {}, "text": "x"}]}]}),
    ("/v1/messages/count_tokens", {"system": [{"type": {}}], "messages": [
        {"role": "user", "content": "hi"}]}),
    ("/v1/responses", {"input": [{"type": {}, "role": "user", "content": "hi"}]}),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": ["x"]}]}]}),
])
async def test_types_that_are_not_strings_are_4xx_not_5xx(tokenizer, path, body):
    async with serve_scripted(tokenizer, MODEL, ["hi"] * 4) as (url, _, _, _):
        async with aiohttp.ClientSession() as s:
            async with s.post(url + path, json=body) as r:
                assert r.status < 500, await r.text()
