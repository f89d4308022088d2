"""Reading an OpenAI Responses request (``POST /v1/responses``): input items and
options, checked field by field (tools: ``responses_tools``), into the chat messages the template renders and the
``Generation`` every API becomes. The reply side is ``responses_api``.

Input items become template messages as the model produced them: reasoning, assistant
text and calls of one turn are one assistant message, so the next turn re-renders the
tokens of the last one and hits the cache through them.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from blockserve.engine.text.frontend import TokenizerFrontend
from blockserve.engine.text.output import ReplySpec
from blockserve.server.errors import invalid
from blockserve.server.fields import (
    Bounds,
    FormatRequest,
    Generation,
    boolean,
    check_messages,
    constrain,
    content_text,
    ignore_unknown,
    name_of_type,
    reads_fields,
    Renamed,
    take,
    json_format,
    integer,
    log,
    one_format,
    refuse,
    render,
    sampling_params,
    template_kwargs,
)
from blockserve.server.responses_tools import Tools, name_of, parse_tool_choice, parse_tools

MAX_METADATA = 16  # pairs, as OpenAI: keys up to 64 characters, values up to 512
ENCRYPTED_PREFIX = "bs1."  # our reasoning round trip: the exact text, base64url

# Hints and bookkeeping, known to change nothing here (prompt caching is automatic;
# ``previous_response_id`` is read before the body is parsed). Any other field
# ``parse_request`` doesn't read is logged as ignored.
_INERT = {"model", "previous_response_id", "prompt_cache_key", "prompt_cache_retention",
          "safety_identifier", "service_tier", "client_metadata", "max_tool_calls",
          "context_management", "stream_options", "truncation"}
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
_MEDIA = {"input_image": "image", "input_file": "file", "input_audio": "audio"}
_SKIPPED_ITEMS = {"web_search_call", "file_search_call", "image_generation_call",
                  "computer_call", "computer_call_output", "local_shell_call",
                  "local_shell_call_output", "mcp_call", "mcp_list_tools", "compaction",
                  "tool_search_call", "tool_search_output", "additional_tools"}
_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


@dataclass
class ResponsesRequest:
    """A validated Responses request: what generates, and what the reply echoes."""

    gen: Generation
    tools: Tools
    items: list[dict]  # the input items, with the history (what a stored reply keeps)
    echo: dict  # request fields the response object repeats
    encrypted_reasoning: bool = False  # include: reasoning.encrypted_content
    store: bool = True
    summary: bool = False  # reasoning.summary asked for


def encode_reasoning(text: str) -> str:
    """``encrypted_content`` of a reasoning item: opaque to clients, and exactly the text
    the model wrote, so the next turn renders the same tokens (and hits the cache)."""
    return ENCRYPTED_PREFIX + base64.urlsafe_b64encode(text.encode()).decode()


def decode_reasoning(blob: str) -> str | None:
    if not blob.startswith(ENCRYPTED_PREFIX):
        return None  # another server's (OpenAI's): nothing a local model can read
    try:
        return base64.urlsafe_b64decode(blob[len(ENCRYPTED_PREFIX):]).decode()
    except (binascii.Error, ValueError):
        return None


def _text_format(body: dict) -> FormatRequest | None:
    """``text.format``: text, json_object, or json_schema (always enforced)."""
    text = take(body, "text", {"type": ["object", "null"], "properties": {
        "format": {"type": "object", "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]}}}}})
    if text is None:
        return None
    if not isinstance(text, dict):
        raise invalid("'text' must be an object", param="text")
    ignore_unknown(text, {"format", "verbosity"}, "responses text")
    fmt = text.get("format")
    return json_format(fmt, fmt, "text.format")  # its schema sits beside its type


def _thinking(body: dict) -> bool | None:
    """``reasoning.effort`` onto the template's thinking switch."""
    reasoning = take(body, "reasoning", {"type": ["object", "null"], "properties": {
        "effort": {"enum": [None, *_EFFORTS]},
        "summary": {"enum": [None, "auto", "concise", "detailed"]}}})
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict):
        raise invalid("'reasoning' must be an object", param="reasoning")
    ignore_unknown(reasoning, {"effort", "summary", "generate_summary"}, "responses reasoning")
    effort = reasoning.get("effort")
    if effort is None:
        return None
    if effort not in _EFFORTS:
        raise invalid(f"'reasoning.effort' must be one of {', '.join(_EFFORTS)}",
                      param="reasoning.effort")
    return effort not in ("none", "minimal")


def _summary(body: dict) -> bool:
    """Whether ``reasoning.summary`` asks for one (checked with ``reasoning``)."""
    summary = (body.get("reasoning") or {}).get("summary")
    if summary not in (None, "auto", "concise", "detailed"):
        raise invalid("'reasoning.summary' must be auto, concise or detailed",
                      param="reasoning.summary")
    return summary is not None


def _metadata(body: dict) -> dict | None:
    meta = take(body, "metadata", {"type": ["object", "null"],
                                   "maxProperties": MAX_METADATA,
                                   "additionalProperties": {"type": "string",
                                                            "maxLength": 512}})
    if meta is None:
        return None
    if not isinstance(meta, dict) or len(meta) > MAX_METADATA or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in meta.items()):
        raise invalid(f"'metadata' must map at most {MAX_METADATA} keys (up to 64 "
                      "characters) to strings (up to 512)", param="metadata")
    return meta


def _include(body: dict) -> set[str]:
    include = take(body, "include", {"type": ["array", "null"],
                                     "items": {"type": "string"}})
    if include is None:
        return set()
    if not isinstance(include, list) or not all(isinstance(s, str) for s in include):
        raise invalid("'include' must be a list of strings", param="include")
    return set(include)


def _refusals(body: dict) -> None:
    """Known fields whose effect this server can't give: a 400, not a silent change."""
    refuse(body, "background", lambda v: v is False, "is not supported (no background "
                                                     "responses here)")
    for name in ("conversation", "prompt"):
        refuse(body, name, lambda v: False, "is not supported by this server")
    refuse(body, "top_logprobs", lambda v: v == 0, "is not supported")


INPUT = {"type": ["string", "array"], "items": {"type": "object"},
         "description": "required unless previous_response_id is given"}


def _items(body: dict, history: list[dict] | None, bounds: Bounds) -> list[dict]:
    """``input`` as a bounded list of item objects, after the stored history."""
    given = take(body, "input", INPUT)
    if isinstance(given, str):
        given = [{"type": "message", "role": "user", "content": given}]
    if given is None and history:
        given = []
    if not isinstance(given, list):
        raise invalid("'input' must be a string or a list of items", param="input")
    items = check_messages((history or []) + given, bounds.limits, "input")
    if not all(isinstance(it, dict) for it in items):
        raise invalid("each input item must be an object", param="input")
    return items


@reads_fields(_INERT, "responses")
def parse_request(body: dict, frontend: TokenizerFrontend, bounds: Bounds,
                  history: list[dict] | None = None) -> ResponsesRequest:
    """Validate a body (``history``: the items of ``previous_response_id``)."""
    _refusals(body)
    items = _items(body, history, bounds)
    instructions = take(body, "instructions", {"type": ["string", "null"]})
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("'instructions' must be a string", param="instructions")
    tools = parse_tools(take(body, "tools", {"type": ["array", "null"],
                                             "items": {"type": "object"}}), bounds.limits)
    choice = parse_tool_choice(body, tools)
    fmt = one_format(_text_format(body), choice.forced)
    max_out = integer(body, "max_output_tokens", 1, None)
    view = Renamed(body, {"temperature": "temperature", "top_p": "top_p"})
    view["max_tokens"] = max_out
    sampling = sampling_params(view, bounds)
    thinking = _thinking(body)
    msgs = Conversation(tools).build(items, instructions)
    rendered = render(frontend, msgs, tools.template or None, template_kwargs({}, thinking,
                                                                     bounds.limits))
    gen = Generation(rendered.tokens, rendered.checkpoints, sampling,
                     ReplySpec(tools.template or None, choice.parse, rendered.reasoning_open),
                     boolean(body, "stream"))
    user = take(body, "user", {"type": ["string", "null"], "maxLength": 512})
    if user is not None and (not isinstance(user, str) or len(user) > 512):
        raise invalid("'user' must be a string of at most 512 characters", param="user")
    echo = {"instructions": instructions, "max_output_tokens": body.get("max_output_tokens"),
            "metadata": _metadata(body) or {}, "parallel_tool_calls":
            boolean(body, "parallel_tool_calls", True), "temperature": sampling.temperature,
            "top_p": sampling.top_p, "tool_choice": body.get("tool_choice") or "auto",
            "tools": body.get("tools") or [], "user": user,
            "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
            "text": body.get("text") or {"format": {"type": "text"}},
            "truncation": "disabled", "store": boolean(body, "store", True)}
    return ResponsesRequest(constrain(frontend, gen, fmt, bounds.limits,
                                      thinking=thinking is True), tools, items, echo,
                            "reasoning.encrypted_content" in _include(body),
                            echo["store"], _summary(body))


class Conversation:
    """Input items into template messages: leading system and developer messages (and
    ``instructions``) merged into one system message, each assistant turn (reasoning,
    text, calls) one message, call outputs tool messages."""

    def __init__(self, tools: Tools):
        self.tools = tools
        self.msgs: list[dict] = []
        self.system: list[str] = []
        self.turn: dict | None = None  # the assistant message being gathered

    def build(self, items: list[dict], instructions: str | None) -> list[dict]:
        """The template's messages for ``items`` (after ``instructions``)."""
        if instructions:
            self.system.append(instructions)
        last_assistant = max((i for i, it in enumerate(items) if self._is_assistant(it)),
                             default=-1)
        for i, item in enumerate(items):
            self._item(item, f"input[{i}]", answering=i > last_assistant)
        self._close_turn()
        if self.system:  # system parts only: still a system message, first
            self.msgs.insert(0, {"role": "system", "content": "\n\n".join(self.system)})
            self.system = []
        return self.msgs

    @staticmethod
    def _is_assistant(item: dict) -> bool:
        kind = item.get("type", "message")
        return kind in ("function_call", "custom_tool_call", "reasoning") or (
            kind == "message" and item.get("role") == "assistant")

    def _item(self, item: dict, where: str, answering: bool) -> None:
        kind = name_of_type(item, "type", "message")
        if kind == "message":
            self._message(item, where, answering)
        elif kind == "reasoning":
            self._reasoning(item)
        elif kind in ("function_call", "custom_tool_call"):
            self._call(item, kind, where)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            self._close_turn()
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise invalid(f"{where}: 'call_id' must be a string", param="input")
            output = item.get("output")
            text = content_text(output, f"{where}.output", False, _TEXT_PARTS, _MEDIA)
            self._append({"role": "tool", "content": text, "tool_call_id": call_id})
        elif kind in _SKIPPED_ITEMS:
            log.warning("%s: ignoring an item of type %r (not a client tool's)", where, kind)
        else:
            raise invalid(f"{where}: items of type {kind!r} are not supported",
                          param="input")

    def _message(self, item: dict, where: str, answering: bool) -> None:
        """A message: system parts gathered, assistant text into the open turn."""
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise invalid(f"{where}: 'role' must be user, assistant, system or developer",
                          param="input")
        text = content_text(item.get("content"), where, answering and role == "user",
                            _TEXT_PARTS, _MEDIA)
        if role == "assistant":
            turn = self._open_turn()
            if turn.get("tool_calls"):  # text after a call: a new message
                turn = self._open_turn(new=True)
            turn["content"] += text
            return
        self._close_turn()
        if role in ("system", "developer"):
            if any(m["role"] != "system" for m in self.msgs):
                self._append({"role": "system", "content": text})  # mid-conversation
            else:
                self.system.append(text)
            return
        self._append({"role": "user", "content": text})

    def _reasoning(self, item: dict) -> None:
        """Reasoning re-rendered exactly: our encrypted_content, else its text."""
        text = None
        if isinstance(item.get("encrypted_content"), str):
            text = decode_reasoning(item["encrypted_content"])
        if text is None and isinstance(item.get("content"), list):
            text = "".join(p.get("text", "") for p in item["content"]
                           if isinstance(p, dict) and isinstance(p.get("text"), str))
        turn = self._open_turn()
        if turn["content"] or turn.get("tool_calls"):  # reasoning opens a new message
            turn = self._open_turn(new=True)
        if text:
            turn["reasoning_content"] = turn.get("reasoning_content", "") + text

    def _call(self, item: dict, kind: str, where: str) -> None:
        """A function or custom tool call, into the open assistant turn."""
        name = name_of(item.get("name"), where, "input")
        call_id = item.get("call_id")
        if not isinstance(call_id, str):
            raise invalid(f"{where}: 'call_id' must be a string", param="input")
        if kind == "custom_tool_call":
            if not isinstance(item.get("input"), str):
                raise invalid(f"{where}: 'input' must be a string", param="input")
            args: Any = {"input": item["input"]}
        else:
            args = item.get("arguments")
            if not isinstance(args, str):
                raise invalid(f"{where}: 'arguments' must be a JSON string", param="input")
            try:  # an object, as templates render the call the model wrote
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass  # rendered as given
        ns = item.get("namespace") if isinstance(item.get("namespace"), str) else None
        turn = self._open_turn()
        turn.setdefault("tool_calls", []).append({
            "id": call_id, "type": "function",
            "function": {"name": self.tools.called(name, ns), "arguments": args}})

    def _open_turn(self, new: bool = False) -> dict:
        if new:
            self._close_turn()
        if self.turn is None:
            self.turn = {"role": "assistant", "content": ""}
        return self.turn

    def _close_turn(self) -> None:
        if self.turn is not None:
            self._append(self.turn)
            self.turn = None

    def _append(self, msg: dict) -> None:
        if self.system:  # the leading system part ends here
            self.msgs.insert(0, {"role": "system", "content": "\n\n".join(self.system)})
            self.system = []
        self.msgs.append(msg)
