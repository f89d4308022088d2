"""Anthropic's Messages API: ``/v1/messages`` streamed or not, with thinking and tool_use
blocks, and ``/v1/messages/count_tokens``. Accepts what Claude Code sends as it sends it."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import Any

from aiohttp import web

from blockserve.engine.text.frontend import TokenizerFrontend
from blockserve.engine.text.output import ReplySpec
from blockserve.engine.text.structured import JsonFormat
from blockserve.scheduler import RequestOutput, Usage
from blockserve.server.runtime import (
    BOUNDS,
    FRONTEND,
    Encoder,
    Event,
    Reply,
    Run,
    Step,
    check_model,
    read_json,
    respond,
)
from blockserve.server.errors import ApiError, invalid
from blockserve.server.fields import (
    Bounds,
    FormatRequest,
    Generation,
    ToolChoice,
    boolean,
    check_messages,
    check_tools,
    constrain,
    content_text,
    reads_fields,
    Renamed,
    log,
    take,
    one_format,
    render,
    sampling_params,
    schema_object,
    template_kwargs,
    tool_choice,
)
from blockserve.server.limits import offload

ANTHROPIC_BILLING_PREFIX = "x-anthropic-billing-header"

# Hints and bookkeeping, known to change nothing here: prompt caching is automatic,
# routing is moot. Any other field ``parse_messages`` doesn't read is logged as ignored.
_INERT = {"model", "metadata", "service_tier", "cache_control", "context_management",
          "container", "inference_geo", "speed", "diagnostics", "user_profile_id",
          "workspace_id", "betas"}
_MEDIA = {"image": "image", "document": "document", "search_result": "search result"}
_STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}


def _text_of(content: Any, where: str, answering: bool) -> str:
    return content_text(content, where, answering, ("text",), _MEDIA)


def _system(system: Any) -> str:
    if isinstance(system, list):
        # Claude Code puts a per-request hash in a billing block: drop it, or no two
        # requests would ever share the system prompt's blocks.
        system = [b for b in system if not (isinstance(b, dict)
                                            and isinstance(b.get("text"), str)
                                            and b["text"].startswith(ANTHROPIC_BILLING_PREFIX))]
    elif system is not None and not isinstance(system, str):
        raise invalid("'system' must be a string or a list of text blocks", param="system")
    return _text_of(system, "system", False)


def _assistant(content: Any, where: str) -> dict:
    if not isinstance(content, list):
        return {"role": "assistant", "content": _text_of(content, where, False)}
    text, reasoning, calls = [], [], []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text.append(_text_of([block], where, False))
        elif kind == "thinking":
            thought = block.get("thinking") or ""
            if not isinstance(thought, str):
                raise invalid(f"{where}: a thinking block's 'thinking' must be a string",
                              param="messages")
            reasoning.append(thought)
        elif kind == "tool_use":
            call_id = block.get("id")
            if not isinstance(call_id, str) or not call_id:  # required, as in the API
                raise invalid(f"{where}.content[{j}].id: a tool_use block needs an 'id' "
                              "(a non-empty string)", param=f"{where}.content[{j}].id")
            if not isinstance(block.get("name"), str):
                raise invalid(f"{where}: a tool_use block needs a name", param="messages")
            if not isinstance(block.get("input") or {}, dict):
                raise invalid(f"{where}: a tool_use block's 'input' must be an object",
                              param="messages")
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": block["name"],
                                       "arguments": block.get("input") or {}}})
        elif kind != "redacted_thinking":  # encrypted: nothing a local model can read
            log.warning("%s: ignoring an assistant block of type %r", where, kind)
    msg = {"role": "assistant", "content": "".join(text)}
    if reasoning:
        msg["reasoning_content"] = "\n".join(reasoning)
    if calls:
        msg["tool_calls"] = calls
    return msg


def _user(content: Any, where: str, answering: bool) -> list[dict]:
    """A user message: its tool results become tool messages (first, as the API orders
    them), the rest one user message."""
    if not isinstance(content, list):
        return [{"role": "user", "content": _text_of(content, where, answering)}]
    tools, rest = [], []
    for block in content:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            text = _text_of(block.get("content"), f"{where} tool_result", False)
            call_id = block.get("tool_use_id")
            if call_id is not None and not isinstance(call_id, str):
                raise invalid(f"{where}: 'tool_use_id' must be a string", param="messages")
            tools.append({"role": "tool", "content": text, "tool_call_id": call_id})
        else:
            rest.append(block)
    if rest or not tools:
        tools.append({"role": "user", "content": _text_of(rest, where, answering)})
    return tools


# Shapes of the fields read here that no typed reader describes, for /openapi.json.
MESSAGES = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["user", "assistant", "system"]},
        "content": {"type": ["string", "array"], "items": {
            "type": "object", "required": ["type"], "properties": {
                "type": {"type": "string"}, "text": {"type": "string"},
                "id": {"type": "string", "minLength": 1}, "name": {"type": "string"},
                "input": {"type": "object"}, "tool_use_id": {"type": "string"}}}}}}}
SYSTEM = {"type": ["string", "array", "null"], "items": {
    "type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}
TOOLS = {"type": ["array", "null"], "items": {
    "type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "description": {"type": "string"},
        "input_schema": {"type": "object"}}}}


def _messages(body: dict, bounds: Bounds) -> list[dict]:
    messages = check_messages(take(body, "messages", MESSAGES, required=True), bounds.limits)
    msgs: list[dict] = []
    system = _system(take(body, "system", SYSTEM))
    if system:
        msgs.append({"role": "system", "content": system})
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role == "assistant":
            msgs.append(_assistant(m.get("content"), where))
        elif role == "user":
            msgs.extend(_user(m.get("content"), where, answering=i == len(messages) - 1))
        elif role == "system":  # Claude Code sends these mid-conversation
            msgs.append({"role": "system", "content": _text_of(m.get("content"), where,
                                                               False)})
        else:
            raise invalid(f"{where}: 'role' must be 'user', 'assistant' or 'system'",
                          param="messages")
    return msgs


def _tools(tools: Any, bounds: Bounds) -> list[dict] | None:
    """Client tools in the template's (OpenAI) shape; server tools are not ours to run."""
    if check_tools(tools, bounds.limits) is None:
        return None
    out = []
    for t in tools:
        if not isinstance(t.get("name"), str):
            raise invalid("each tool needs a name", param="tools")
        if not isinstance(t.get("description", ""), str):
            raise invalid(f"tool {t['name']!r}: 'description' must be a string",
                          param="tools")
        if "input_schema" in t and not isinstance(t["input_schema"], dict):
            raise invalid(f"tool {t['name']!r}: 'input_schema' must be an object",
                          param="tools")
        if "input_schema" not in t:
            log.warning("ignoring tool %r of type %r: only client tools (with an "
                        "input_schema) run here", t["name"], t.get("type"))
            continue
        out.append({"type": "function", "function": {
            "name": t["name"], "description": t.get("description", ""),
            "parameters": t["input_schema"]}})
    return out or None


def _tool_choice(body: dict, tools: list[dict] | None) -> ToolChoice:
    choice = take(body, "tool_choice", {"type": ["object", "string", "null"], "properties": {
        "type": {"enum": ["auto", "any", "tool", "none"]}, "name": {"type": "string"},
        "disable_parallel_tool_use": {"type": "boolean"}}})
    if isinstance(choice, str):  # the API takes an object; a bare kind is clear enough
        choice = {"type": choice}
    if choice is not None and not isinstance(choice, dict):
        raise invalid("'tool_choice' must be an object", param="tool_choice")
    choice = choice or {}
    parallel = not boolean(choice, "disable_parallel_tool_use")
    return tool_choice(choice.get("type"), choice.get("name"), tools, parallel)


def _output_format(body: dict) -> FormatRequest | None:
    """``output_config.format`` (or the beta's ``output_format``): a JSON schema."""
    config = take(body, "output_config", {"type": ["object", "null"]})
    if config is not None and not isinstance(config, dict):
        raise invalid("'output_config' must be an object", param="output_config")
    fmt, param = (config or {}).get("format"), "output_config.format"
    if fmt is None:
        fmt, param = take(body, "output_format", {"type": ["object", "null"]}), \
            "output_format"
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise invalid(f"'{param}.type' must be 'json_schema'", param=param)
    return FormatRequest(JsonFormat(schema_object(fmt.get("schema"), f"{param}.schema")),
                         param)


def _thinking(body: dict) -> bool | None:
    thinking = take(body, "thinking", {"type": ["object", "null"], "properties": {
        "type": {"enum": ["enabled", "adaptive", "disabled"]},
        "budget_tokens": {"type": "integer"}}})
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "adaptive", "disabled"):
        raise invalid("'thinking.type' must be 'enabled', 'adaptive' or 'disabled'",
                      param="thinking")
    return kind != "disabled"


@reads_fields(_INERT, "messages")
def parse_messages(body: dict, frontend: TokenizerFrontend, bounds: Bounds,
                   count_only: bool = False) -> Generation:
    if not count_only and take(body, "max_tokens", None, required=True) is None:
        raise invalid("'max_tokens' is required", param="max_tokens")
    msgs = _messages(body, bounds)
    tools = _tools(take(body, "tools", TOOLS), bounds)
    choice = _tool_choice(body, tools)
    fmt = one_format(_output_format(body), choice.forced)
    sampling = sampling_params(Renamed(body, {
        "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
        "top_k": "top_k", "stop": "stop_sequences"}), bounds)
    thinking = _thinking(body)
    rendered = render(frontend, msgs, tools, template_kwargs({}, thinking, bounds.limits))
    gen = Generation(rendered.tokens, rendered.checkpoints, sampling,
                     ReplySpec(tools, choice.parse, rendered.reasoning_open),
                     boolean(body, "stream"))
    return gen if count_only else constrain(frontend, gen, fmt, bounds.limits,
                                            thinking=thinking is True)


# ---- responses -----------------------------------------------------------------------


def _stop_reason(out: RequestOutput, run: Run) -> str:
    if out.stop_string:
        return "stop_sequence"
    if out.finish_reason == "stop" and run.called_tools:
        return "tool_use"
    return _STOP_REASONS.get(out.finish_reason, "end_turn")


def _usage(u: Usage) -> dict:
    return {"input_tokens": u.prompt_tokens - u.cached_tokens,
            "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens,
            "cache_creation_input_tokens": 0}


def _block(d: Any) -> dict:
    """A whole content block for a delta (its start, when streaming, is this with the
    text emptied)."""
    if d.kind == "reasoning":
        return {"type": "thinking", "thinking": d.text, "signature": ""}
    if d.kind == "tool_call":
        return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": d.name,
                "input": json.loads(d.arguments)}
    return {"type": "text", "text": d.text}


def _blocks(deltas: list[Any]) -> list[dict]:
    blocks: list[dict] = []
    last_kind = None
    for d in deltas:
        if d.kind == last_kind and d.kind != "tool_call":
            key = "thinking" if d.kind == "reasoning" else "text"
            blocks[-1][key] += d.text
        else:
            blocks.append(_block(d))
        last_kind = d.kind
    return blocks or [{"type": "text", "text": ""}]


async def count_tokens(request: web.Request) -> web.Response:
    body = await read_json(request)
    frontend = request.app[FRONTEND]
    check_model(body, frontend)
    gen = await offload(request, parse_messages, body, frontend, request.app[BOUNDS], True)
    return web.json_response({"input_tokens": len(gen.prompt)})


class MessagesEncoder(Encoder):
    """Anthropic's message: content blocks (thinking, text, tool_use), streamed as
    ``message_start``, block start / delta / stop events, ``message_delta`` with the stop
    reason, and ``message_stop``; a reply cut short ends in an error event instead."""

    def __init__(self, gen: Generation, run: Run, model: str):
        self.gen = gen
        self.run = run
        self.message = {"id": "msg_" + run.id, "type": "message", "role": "assistant",
                        "model": model}
        self.reply = Reply()
        self.index = -1  # of the block being streamed
        self.open_kind: str | None = None
        self.started = False

    def keepalive(self) -> Event:
        return "ping", {"type": "ping"}  # Anthropic's own keepalive event

    def step(self, run: Run, step: Step) -> list[Event]:
        out = step.out
        self.reply.add(step)
        events = [] if self.started else [self._message_start(out)]
        self.started = True
        if out.finish_reason in ("error", "abort"):  # a cut reply never looks complete
            self.ended = True
            err = (ApiError(500, out.error or "generation failed") if out.finish_reason
                   == "error" else ApiError(503, "the server is shutting down; this reply "
                                                 "is incomplete: retry"))
            return events + self._stop_block() + [("error", err.anthropic_body())]
        for d in step.deltas:
            if self.open_kind is not None and (d.kind != self.open_kind
                                               or d.kind == "tool_call"):
                events += self._stop_block()
            if self.open_kind is None:
                events.append(self._start_block(d))
            events.append(self._delta(d))
        if out.finish_reason:
            if self.index < 0:  # an empty reply still has one (empty) text block
                events.append(self._start_block(SimpleNamespace(kind="content", text="")))
            events += self._stop_block()
            events.append(("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": _stop_reason(out, run),
                          "stop_sequence": out.stop_string},
                "usage": {"output_tokens": out.usage.completion_tokens,
                          "input_tokens": _usage(out.usage)["input_tokens"],
                          "cache_read_input_tokens": out.usage.cached_tokens}}))
            events.append(("message_stop", {"type": "message_stop"}))
        return events

    def body(self) -> dict:
        last = self.reply.last
        return {**self.message, "content": _blocks(self.reply.deltas),
                "stop_reason": _stop_reason(last, self.run),
                "stop_sequence": last.stop_string, "usage": _usage(last.usage)}

    def _message_start(self, out: RequestOutput) -> Event:
        usage = _usage(out.usage or Usage(len(self.gen.prompt)))
        return "message_start", {"type": "message_start", "message": {
            **self.message, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {**usage, "output_tokens": 0}}}

    def _start_block(self, d: Any) -> Event:
        self.index += 1
        self.open_kind = d.kind
        block = _block(d)
        if d.kind == "tool_call":
            block["input"] = {}
        else:
            block["thinking" if d.kind == "reasoning" else "text"] = ""
        return "content_block_start", {"type": "content_block_start", "index": self.index,
                                       "content_block": block}

    def _stop_block(self) -> list[Event]:
        if self.open_kind is None:
            return []
        events = []
        if self.open_kind == "reasoning":
            events.append(("content_block_delta", {
                "type": "content_block_delta", "index": self.index,
                "delta": {"type": "signature_delta", "signature": ""}}))
        events.append(("content_block_stop", {"type": "content_block_stop",
                                              "index": self.index}))
        self.open_kind = None
        return events

    def _delta(self, d: Any) -> Event:
        if d.kind == "tool_call":
            payload = {"type": "input_json_delta", "partial_json": d.arguments}
        elif d.kind == "reasoning":
            payload = {"type": "thinking_delta", "thinking": d.text}
        else:
            payload = {"type": "text_delta", "text": d.text}
        return "content_block_delta", {"type": "content_block_delta", "index": self.index,
                                       "delta": payload}


async def messages(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    frontend = request.app[FRONTEND]
    check_model(body, frontend)
    gen = await offload(request, parse_messages, body, frontend, request.app[BOUNDS])
    run = Run(request, gen)
    encoder = MessagesEncoder(gen, run, body.get("model") or frontend.model_id)
    return await respond(request, [run], encoder, gen.stream)
