"""OpenAI's Responses API: ``POST /v1/responses`` streamed or not, ``GET`` and ``DELETE``
``/v1/responses/{id}``, ``POST /v1/responses/input_tokens``. A third API on the same scheduler, output parser and grammars:
the parser's deltas become output items (reasoning, message, function_call,
custom_tool_call), and the stream carries the events Codex and the OpenAI SDK parse.
The request side is ``responses_input``."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiohttp import web

from blockserve.scheduler import PromptTooLongError, Usage
from blockserve.server.runtime import (
    BOUNDS,
    FRONTEND,
    TENANT,
    Encoder,
    Event,
    Run,
    Step,
    check_model,
    read_json,
    respond,
    send,
    sse,
)
from blockserve.server.errors import ApiError, invalid
from blockserve.server.fields import log, take
from blockserve.server.limits import offload
from blockserve.server.responses_input import ResponsesRequest, encode_reasoning, parse_request
from blockserve.server.responses_store import ResponseStore
from blockserve.server.responses_tools import Tools

STORE = web.AppKey("responses_store", ResponseStore)


def install(app: web.Application) -> None:
    """The routes, and the store of recent responses."""
    app[STORE] = ResponseStore()
    app.router.add_post("/v1/responses", create)
    app.router.add_post("/v1/responses/input_tokens", input_tokens)
    app.router.add_get("/v1/responses/{response_id}", retrieve)
    app.router.add_delete("/v1/responses/{response_id}", delete)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class ItemWriter:
    """Output items from the parser's deltas, with the stream events that build them:
    one item per run of reasoning or text, one per tool call."""

    def __init__(self, tools: Tools, encrypted: bool, summary: bool = False):
        self.tools = tools
        self.encrypted = encrypted  # reasoning items carry encrypted_content
        # A summary was asked for: there is none, so the reasoning is its own summary
        # too (clients such as Codex show summaries, and raw reasoning only if told to).
        self.summary = summary
        self.items: list[dict] = []
        self._open: str | None = None  # "reasoning" or "content": the last item grows

    def feed(self, d: Any) -> list[dict]:
        """One parser delta: the events it makes (an item opened, grown or closed)."""
        events = []
        if self._open is not None and (d.kind != self._open or d.kind == "tool_call"):
            events += self.close()
        if d.kind == "tool_call":
            return events + self._call(d)
        if self._open is None:
            events += self._start(d.kind)
        item, index = self.items[-1], len(self.items) - 1
        part = item["content"][0]
        part["text"] += d.text
        kind = "reasoning_text" if d.kind == "reasoning" else "output_text"
        extra = {} if d.kind == "reasoning" else {"logprobs": []}
        events.append({"type": f"response.{kind}.delta", "item_id": item["id"],
                       "output_index": index, "content_index": 0, "delta": d.text, **extra})
        if d.kind == "reasoning" and self.summary:
            item["summary"][0]["text"] += d.text
            events.append({"type": "response.reasoning_summary_text.delta",
                           "item_id": item["id"], "output_index": index,
                           "summary_index": 0, "delta": d.text})
        return events

    def close(self, status: str = "completed") -> list[dict]:
        """Close the open item (if any): its done events."""
        if self._open is None:
            return []
        item, index = self.items[-1], len(self.items) - 1
        part = item["content"][0]
        kind = "reasoning_text" if self._open == "reasoning" else "output_text"
        extra = {} if self._open == "reasoning" else {"logprobs": []}
        if self._open == "reasoning" and self.encrypted:
            item["encrypted_content"] = encode_reasoning(part["text"])
        item["status"] = status
        self._open = None
        where = {"item_id": item["id"], "output_index": index}
        events = [{"type": f"response.{kind}.done", **where, "content_index": 0,
                   "text": part["text"], **extra},
                  {"type": "response.content_part.done", **where, "content_index": 0,
                   "part": dict(part)}]
        if item.get("summary"):
            summary = dict(item["summary"][0])
            events += [{"type": "response.reasoning_summary_text.done", **where,
                        "summary_index": 0, "text": summary["text"]},
                       {"type": "response.reasoning_summary_part.done", **where,
                        "summary_index": 0, "part": summary}]
        return events + [{"type": "response.output_item.done", "output_index": index,
                          "item": _copy(item)}]

    def _start(self, kind: str) -> list[dict]:
        """Open a reasoning or message item: its added events."""
        if kind == "reasoning":
            item = {"id": _id("rs"), "type": "reasoning", "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}],
                    "encrypted_content": None, "status": "in_progress"}
        else:
            item = {"id": _id("msg"), "type": "message", "role": "assistant",
                    "status": "in_progress",
                    "content": [{"type": "output_text", "text": "", "annotations": [],
                                 "logprobs": []}]}
        self.items.append(item)
        self._open = kind
        index = len(self.items) - 1
        shown = {**item, "content": [], **({"summary": []} if kind == "reasoning" else {})}
        events = [{"type": "response.output_item.added", "output_index": index,
                   "item": shown},
                  {"type": "response.content_part.added", "item_id": item["id"],
                   "output_index": index, "content_index": 0,
                   "part": dict(item["content"][0])}]
        if kind == "reasoning" and self.summary:
            item["summary"] = [{"type": "summary_text", "text": ""}]
            events.append({"type": "response.reasoning_summary_part.added",
                           "item_id": item["id"], "output_index": index,
                           "summary_index": 0, "part": dict(item["summary"][0])})
        return events

    def _call(self, d: Any) -> list[dict]:
        """A whole tool call: a function_call (its namespace mapped back) or a
        custom_tool_call, added, its arguments in one delta, and done."""
        ref = self.tools.ref(d.name)
        index = len(self.items)
        if ref.kind == "custom":
            payload = _custom_input(d.arguments)
            item = {"id": _id("ctc"), "type": "custom_tool_call", "call_id": _id("call"),
                    "name": ref.name, "input": payload, "status": "completed"}
            field, event = "input", "response.custom_tool_call_input"
        else:
            payload = d.arguments
            item = {"id": _id("fc"), "type": "function_call", "call_id": _id("call"),
                    "name": ref.name, "arguments": payload, "status": "completed"}
            if ref.namespace:
                item["namespace"] = ref.namespace
            field, event = "arguments", "response.function_call_arguments"
        self.items.append(item)
        where = {"item_id": item["id"], "output_index": index}
        return [{"type": "response.output_item.added", "output_index": index,
                 "item": {**item, field: "", "status": "in_progress"}},
                {"type": f"{event}.delta", **where, "delta": payload},
                {"type": f"{event}.done", **where, field: payload,
                 **({"name": ref.name} if field == "arguments" else {})},
                {"type": "response.output_item.done", "output_index": index,
                 "item": _copy(item)}]

    def stored_items(self) -> list[dict]:
        """The output as input items for a next turn (reasoning always re-renderable)."""
        out = []
        for item in self.items:
            if item["type"] == "reasoning":
                item = {**item, "encrypted_content": encode_reasoning(
                    item["content"][0]["text"])}
            out.append(_copy(item))
        return out


def _copy(item: dict) -> dict:
    return {k: ([dict(p) for p in v] if isinstance(v, list) else v) for k, v in item.items()}


def _custom_input(arguments: str) -> str:
    """A custom tool's freeform input: the one string argument the model was given."""
    try:
        args = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(args, dict) and isinstance(args.get("input"), str):
        return args["input"]
    return arguments


class ResponsesEncoder(Encoder):
    """One response being made, streamed or collected: its output items (from the
    parser's deltas), the events that build them, each with its ``sequence_number``,
    and the response object in each state; a finished response is stored."""

    def __init__(self, request: web.Request, req: ResponsesRequest, model: str,
                 previous: str | None, run_id: str | None = None):
        self.request = request
        self.seq = 0
        self.response: dict | None = None  # the closing response, once there is one
        self.req = req
        self.model = model
        self.previous = previous
        self.id = "resp_" + (run_id or uuid.uuid4().hex)
        self.created = int(time.time())
        self.writer = ItemWriter(req.tools, req.encrypted_reasoning, req.summary)
        self.frontend = request.app[FRONTEND]

    def object(self, status: str, usage: Usage | None = None, error: dict | None = None,
               incomplete: str | None = None) -> dict:
        """The response object in a given state (in_progress shows no output yet)."""
        return {"id": self.id, "object": "response", "created_at": self.created,
                "status": status, "error": error, "model": self.model,
                "incomplete_details": {"reason": incomplete} if incomplete else None,
                "output": [] if status == "in_progress" else
                [_copy(i) for i in self.writer.items],
                "previous_response_id": self.previous,
                "usage": self.usage(usage) if usage else None, **self.req.echo}

    def usage(self, u: Usage) -> dict:
        """Responses' usage; reasoning tokens are its text re-tokenized (markers aside)."""
        reasoning = "".join(i["content"][0]["text"] for i in self.writer.items
                            if i["type"] == "reasoning")
        r_tokens = len(self.frontend.encode(reasoning, add_special_tokens=False)) \
            if reasoning else 0
        return {"input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.cached_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": min(r_tokens,
                                                                  u.completion_tokens)},
                "total_tokens": u.prompt_tokens + u.completion_tokens}

    def final(self, finish: str | None, usage: Usage) -> tuple[str, dict]:
        """The closing event's type and response: completed, or incomplete at the limit."""
        if finish == "length":
            if self.req.echo["max_output_tokens"] is None:  # Codex sends none
                log.warning("response %s stopped at the server's default max tokens (%d); "
                            "agents that send no max_output_tokens need a larger "
                            "--max-tokens", self.id, self.req.gen.sampling.max_tokens)
            return "response.incomplete", self.object("incomplete", usage,
                                                      incomplete="max_output_tokens")
        return "response.completed", self.object("completed", usage)

    def keep(self, response: dict) -> None:
        """Store a finished response (unless store=false) for GET and continuations."""
        if self.req.store and response["status"] in ("completed", "incomplete"):
            self.request.app[STORE].put(self.request.get(TENANT), response,
                                        self.req.items + self.writer.stored_items())

    def event(self, event: dict) -> Event:
        """An event as sent: named by its type, numbered in sequence."""
        event = {**event, "sequence_number": self.seq}
        self.seq += 1
        return event["type"], event

    def start(self) -> list[Event]:
        return [self.event({"type": kind, "response": self.object("in_progress")})
                for kind in ("response.created", "response.in_progress")]

    def keepalive(self) -> Event:
        """A long prefill: tell the client we are still here."""
        return self.event({"type": "response.in_progress",
                           "response": self.object("in_progress")})

    def step(self, run: Run, step: Step) -> list[Event]:
        out = step.out
        if out.finish_reason in ("error", "abort"):
            self.ended = True
            message = out.error or ("the server is shutting down" if out.finish_reason ==
                                    "abort" else "generation failed")
            return [self.event(ev) for ev in self.writer.close("incomplete")] + [
                self.event({"type": "response.failed", "response": self.object(
                    "failed", out.usage, error={"code": "server_error",
                                                "message": message})})]
        events = [self.event(ev) for d in step.deltas for ev in self.writer.feed(d)]
        if out.finish_reason is not None:
            status = "incomplete" if out.finish_reason == "length" else "completed"
            events += [self.event(ev) for ev in self.writer.close(status)]
            kind, self.response = self.final(out.finish_reason, out.usage)
            self.keep(self.response)
            events.append(self.event({"type": kind, "response": self.response}))
        return events

    def body(self) -> dict:
        return self.response


def previous_response(body: dict, *_: Any) -> str | None:
    """``previous_response_id``, checked."""
    previous = take(body, "previous_response_id", {"type": ["string", "null"]})
    if previous is not None and not isinstance(previous, str):
        raise invalid("'previous_response_id' must be a string", param="previous_response_id")
    return previous


def _history(request: web.Request, body: dict) -> tuple[str | None, list[dict] | None]:
    """``previous_response_id`` and its stored items (the tenant's own, or a 404)."""
    previous = previous_response(body)
    if previous is None:
        return None, None
    stored = request.app[STORE].get(request.get(TENANT), previous)
    if stored is None:
        raise ApiError(404, f"no response with id {previous!r}: it is unknown, expired from "
                            "this server's memory, or was made with store=false",
                       param="previous_response_id", code="previous_response_not_found")
    return previous, stored.items


async def _read(request: web.Request) -> tuple[ResponsesRequest, str, str | None]:
    """The request, read off the loop with the history it continues: (request, the
    model name to answer with, ``previous_response_id``)."""
    body = await read_json(request)
    frontend = request.app[FRONTEND]
    check_model(body, frontend)
    previous, history = _history(request, body)
    req = await offload(request, parse_request, body, frontend, request.app[BOUNDS], history)
    return req, body.get("model") or frontend.model_id, previous


async def create(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``."""
    req, model, previous = await _read(request)
    try:
        run = Run(request, req.gen)
    except PromptTooLongError as e:  # the field is 'input' here
        if not req.gen.stream:
            raise ApiError(400, str(e), param="input", code="context_length_exceeded")
        return await _failed(request, ResponsesEncoder(request, req, model, previous), e)
    encoder = ResponsesEncoder(request, req, model, previous, run.id)
    return await respond(request, [run], encoder, req.gen.stream)


async def _failed(request: web.Request, encoder: ResponsesEncoder,
                  e: Exception) -> web.StreamResponse:
    """A prompt over the context, streamed: in-stream, as OpenAI does (Codex reads the
    code)."""
    resp = await sse(request)
    for name, data in [encoder.event({"type": "response.created",
                                      "response": encoder.object("in_progress")}),
                       encoder.event({"type": "response.failed", "response": encoder.object(
                           "failed", error={"code": "context_length_exceeded",
                                            "message": str(e)})})]:
        await send(resp, data, name)
    await resp.write_eof()
    return resp


def _stored(request: web.Request) -> tuple[str, Any]:
    rid = request.match_info["response_id"]
    stored = request.app[STORE].get(request.get(TENANT), rid)
    if stored is None:
        raise ApiError(404, f"no response with id {rid!r}: it is unknown, expired from this "
                            "server's memory, or was made with store=false",
                       code="not_found")
    return rid, stored


async def input_tokens(request: web.Request) -> web.Response:
    """The prompt's token count, rendered as ``POST /v1/responses`` would."""
    req, _, _ = await _read(request)
    return web.json_response({"object": "response.input_tokens",
                              "input_tokens": len(req.gen.prompt)})


async def retrieve(request: web.Request) -> web.Response:
    """``GET /v1/responses/{id}``."""
    _, stored = _stored(request)
    return web.json_response(stored.response)


async def delete(request: web.Request) -> web.Response:
    """``DELETE /v1/responses/{id}``."""
    rid, _ = _stored(request)
    request.app[STORE].delete(request.get(TENANT), rid)
    return web.json_response({"id": rid, "object": "response.deleted", "deleted": True})
