"""``/openapi.json``: the API as an OpenAPI 3.1 document, built from the code that reads
requests, so that it can't drift from it.

Each route's request body is what its readers (the handler's own parsers, in its
order) read: the probe runs them on example bodies in a ``fields.Body``, which notes
every field read and what the typed readers (``integer``, ``number``, ``boolean``,
``refuse``, ``take``) say each one is: its type and bounds, and whether the parser
requires it. A field a parser starts to read is in the document at once; the fields a
parser knows to change nothing (its ``inert``) are listed as accepted. Unknown fields
are accepted with a warning in the log (vLLM's rule): ``additionalProperties`` is true.

What a route answers (its 200 body) comes from the ``Doc`` table below, beside the
error shapes of ``errors``: that part is the encoders' and is checked by the tests
against live replies (``schemathesis``'s response conformance).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

from blockserve.engine.text.frontend import TokenizerFrontend
from blockserve.server import admin, anthropic_api, openai_api, openai_input, responses_api
from blockserve.server import responses_input
from blockserve.server.fields import Body, Bounds
from blockserve.server.limits import offload
from blockserve.server.runtime import BOUNDS, FRONTEND, check_model

OPENAPI = web.AppKey("openapi", dict)  # {"document": ...} once built

Reader = Callable[[Body, TokenizerFrontend, Bounds], Any]

# ---- what routes answer --------------------------------------------------------------

OBJECT = {"type": "object"}
_USAGE = {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                           "completion_tokens": {"type": "integer"},
                                           "total_tokens": {"type": "integer"}}}
CHAT = {"type": "object", "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": "chat.completion"},
            "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {
                "type": "object", "required": ["index", "message", "finish_reason"],
                "properties": {"index": {"type": "integer"},
                               "message": {"type": "object", "required": ["role"],
                                           "properties": {
                                               "role": {"const": "assistant"},
                                               "content": {"type": ["string", "null"]},
                                               "tool_calls": {"type": "array"}}},
                               "finish_reason": {"type": ["string", "null"]}}}},
            "usage": _USAGE}}
COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices"],
              "properties": {
                  "id": {"type": "string"}, "object": {"const": "text_completion"},
                  "choices": {"type": "array", "items": {
                      "type": "object", "required": ["index", "text", "finish_reason"],
                      "properties": {"index": {"type": "integer"},
                                     "text": {"type": "string"},
                                     "finish_reason": {"type": ["string", "null"]}}}},
                  "usage": _USAGE}}
RENDERED = {"type": "object", "required": ["model", "token_ids"], "properties": {
    "model": {"type": "string"}, "token_ids": {"type": "array", "items": {"type": "integer"}}}}
MESSAGE = {"type": "object", "required": ["id", "type", "role", "content", "stop_reason",
                                          "usage"],
           "properties": {
               "id": {"type": "string"}, "type": {"const": "message"},
               "role": {"const": "assistant"},
               "content": {"type": "array", "items": {
                   "type": "object", "required": ["type"], "properties": {
                       "type": {"enum": ["text", "thinking", "tool_use"]}}}},
               "stop_reason": {"type": ["string", "null"]},
               "usage": {"type": "object", "required": ["input_tokens", "output_tokens"]}}}
INPUT_TOKENS = {"type": "object", "required": ["input_tokens"],
                "properties": {"input_tokens": {"type": "integer", "minimum": 0}}}
RESPONSE = {"type": "object", "required": ["id", "object", "status", "output"],
            "properties": {"id": {"type": "string"}, "object": {"const": "response"},
                           "status": {"type": "string"},
                           "output": {"type": "array", "items": OBJECT}}}
DELETED = {"type": "object", "required": ["id", "object", "deleted"],
           "properties": {"id": {"type": "string"}, "object": {"const": "response.deleted"},
                          "deleted": {"const": True}}}
MODELS = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"}, "data": {"type": "array", "items": {
        "type": "object", "required": ["id", "object"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}}}}}}
HEALTH = {"type": "object", "required": ["status"], "properties": {
    "status": {"enum": ["ok", "draining", "failed"]}}}
TOKENIZED = {"type": "object", "required": ["count", "tokens"], "properties": {
    "count": {"type": "integer"}, "tokens": {"type": "array", "items": {"type": "integer"}},
    "max_model_len": {"type": "integer"}}}
DETOKENIZED = {"type": "object", "required": ["prompt"],
               "properties": {"prompt": {"type": "string"}}}
CACHE_RESET = {"type": "object", "required": ["reset"], "properties": {
    "reset": {"const": True}, "scope": {"enum": ["all", "tenant"]}}}

# One server-sent event (with stream=true): its name, and JSON (or [DONE]) as data.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"}, "data": {"type": "string"}}}
OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"const": "error"}, "error": {
        "type": "object", "required": ["type", "message"], "properties": {
            "type": {"type": "string"}, "message": {"type": "string"}}}}}


def _model(body: Body, frontend: TokenizerFrontend, bounds: Bounds) -> None:
    check_model(body, frontend)


@dataclass(frozen=True)
class Doc:
    """One route: ``readers`` are its handler's parsers, in order, run on ``examples``
    (bodies they accept) to find its fields; ``ok`` its 200 body; ``stream``, whether
    it may answer with server-sent events; ``anthropic``, its errors' shape."""

    summary: str
    readers: tuple[Reader, ...] = ()
    examples: tuple[dict, ...] = ()
    ok: dict | None = None
    ok_type: str = "application/json"
    stream: bool = False
    anthropic: bool = False
    links: tuple[str, ...] = ()  # operations that take this reply's id


_USER = [{"role": "user", "content": "Hello"}]
_CHAT = Doc("OpenAI chat completion (streamed with stream=true)",
            (_model, openai_input.parse_chat), ({"messages": _USER},), CHAT, stream=True)
_COMPLETION = Doc("OpenAI text completion (streamed with stream=true)",
                  (_model, openai_input.parse_completion), ({"prompt": "Hello"},),
                  COMPLETION, stream=True)
_MESSAGES_EXAMPLE = {"max_tokens": 8, "messages": _USER}


def _count(body: Body, frontend: TokenizerFrontend, bounds: Bounds) -> Any:
    return anthropic_api.parse_messages(body, frontend, bounds, count_only=True)


_count.inert = anthropic_api.parse_messages.inert  # type: ignore[attr-defined]


DOCS: dict[Callable, Doc] = {
    openai_api.chat_completions: _CHAT,
    openai_api.completions: _COMPLETION,
    openai_api.render_chat: Doc("vLLM: the chat prompt's token ids, without generating",
                                _CHAT.readers, _CHAT.examples, RENDERED),
    openai_api.render_completion: Doc("vLLM: the prompt's token ids, without generating",
                                      _COMPLETION.readers, _COMPLETION.examples, RENDERED),
    anthropic_api.messages: Doc(
        "Anthropic Messages (streamed with stream=true)",
        (_model, anthropic_api.parse_messages), (_MESSAGES_EXAMPLE,), MESSAGE,
        stream=True, anthropic=True),
    anthropic_api.count_tokens: Doc("Anthropic: the prompt's token count",
                                    (_model, _count), ({"messages": _USER},), INPUT_TOKENS,
                                    anthropic=True),
    responses_api.create: Doc(
        "OpenAI Responses (streamed with stream=true)",
        (_model, responses_api.previous_response, responses_input.parse_request),
        ({"input": "Hello"},), RESPONSE, stream=True,
        links=("get_v1_responses_response_id", "delete_v1_responses_response_id")),
    responses_api.input_tokens: Doc(
        "OpenAI Responses: the prompt's token count",
        (_model, responses_api.previous_response, responses_input.parse_request),
        ({"input": "Hello"},), {**INPUT_TOKENS, "properties": {
            **INPUT_TOKENS["properties"], "object": {"const": "response.input_tokens"}}}),
    responses_api.retrieve: Doc("A stored response", ok=RESPONSE),
    responses_api.delete: Doc("Delete a stored response", ok=DELETED),
    openai_api.tokenize: Doc("vLLM: token ids of a prompt, or of chat messages",
                             (_model, openai_api.tokenize_body),
                             ({"prompt": "Hello"}, {"messages": _USER}), TOKENIZED),
    openai_api.detokenize: Doc("vLLM: the text of token ids",
                               (_model, openai_api.detokenize_body), ({"tokens": [1, 2]},),
                               DETOKENIZED),
    admin.models: Doc("The served model names", ok=MODELS),
    admin.health: Doc("200 while serving, 503 while draining or failed", ok=HEALTH),
    admin.metrics: Doc("Prometheus metrics", ok={"type": "string"}, ok_type="text/plain"),
    admin.server_info: Doc("Server facts (SGLang's and vLLM's shapes)", ok=OBJECT),
    admin.model_info: Doc("Model facts (SGLang's shape)", ok=OBJECT),
    admin.get_load: Doc("Running and waiting requests", ok=OBJECT),
    admin.cache_stats: Doc("The prefix cache's counters (a tenant sees its own)", ok=OBJECT),
    admin.cache_reset: Doc("Flush the prefix cache (a tenant flushes its own)",
                           ok=CACHE_RESET),
}


# ---- the document ----------------------------------------------------------------------


def request_schema(doc: Doc, frontend: TokenizerFrontend, bounds: Bounds) -> dict:
    """The JSON schema of a route's body: what its readers read of its examples."""
    props: dict[str, dict] = {}
    required: set[str] | None = None
    for example in doc.examples:
        body = Body(example)
        for read in doc.readers:
            read(body, frontend, bounds)
        for name in sorted(body.read):
            props.setdefault(name, dict(body.shapes.get(name, {})))
        # required: by every example (a route may take one field or another)
        required = body.required if required is None else required & body.required
    for read in doc.readers:
        for name in sorted(getattr(read, "inert", ())):
            props.setdefault(name, {"description": "accepted; changes nothing here"})
    return {"type": "object", "properties": dict(sorted(props.items())),
            "required": sorted(required or ()), "additionalProperties": True}


def _responses(doc: Doc) -> dict:
    ok_content = {doc.ok_type: {"schema": doc.ok or OBJECT}}
    if doc.stream:
        ok_content["text/event-stream"] = {"schema": SSE_EVENT}
    error = {"application/json": {"schema": ANTHROPIC_ERROR if doc.anthropic
                                  else OPENAI_ERROR}}
    ok = {"description": doc.summary, "content": ok_content}
    if doc.links:
        ok["links"] = {op: {"operationId": op,
                            "parameters": {"response_id": "$response.body#/id"}}
                       for op in doc.links}
    out = {"200": ok,
           "4XX": {"description": "a request this server refuses; the message says why",
                   "content": error},
           "503": {"description": "draining, shutting down or failed", "content": {
               "application/json": {"schema": {"anyOf": [error["application/json"]["schema"],
                                                        HEALTH]}}}}}
    return out


def build(app: web.Application) -> dict:
    """The OpenAPI 3.1 document of ``app``'s routes."""
    frontend, bounds = app[FRONTEND], app[BOUNDS]
    paths: dict[str, dict] = {}
    for route in app.router.routes():
        method = route.method.lower()
        if method == "head":
            continue
        path = route.resource.canonical
        doc = DOCS.get(route.handler) or Doc(getattr(route.handler, "__doc__", None)
                                             or path)
        op: dict[str, Any] = {"summary": doc.summary.splitlines()[0],
                              "operationId": f"{method}{path.replace('/', '_')}"
                              .replace("{", "").replace("}", ""),
                              "responses": _responses(doc)}
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in _path_params(path)]
        if params:
            op["parameters"] = params
        if doc.readers:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": request_schema(doc, frontend, bounds),
                "examples": {f"example{i}": {"value": example}
                             for i, example in enumerate(doc.examples)}}}}
        paths.setdefault(path, {})[method] = op
    return {"openapi": "3.1.0",
            "info": {"title": "blockserve", "version": "0.1.0",
                     "description": "OpenAI, Anthropic and vLLM-style APIs over one "
                                    "engine. Unknown fields are accepted with a warning."},
            "servers": [{"url": "/"}],
            "components": {"securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
            "security": [{}, {"bearer": []}, {"x-api-key": []}],
            "paths": dict(sorted(paths.items()))}


def _path_params(path: str) -> list[str]:
    return re.findall(r"\{(\w+)\}", path)


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /openapi.json``: built once (its probes parse, off the loop)."""
    cache = request.app[OPENAPI]
    if "document" not in cache:
        cache["document"] = await offload(request, build, request.app)
    return web.json_response(cache["document"])


def install(app: web.Application) -> None:
    app[OPENAPI] = {}
    app.router.add_get("/openapi.json", openapi_json)


DOCS[openapi_json] = Doc("This document (OpenAPI 3.1)", ok=OBJECT)
