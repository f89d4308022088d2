"""Reading an OpenAI Responses request (``POST /v1/responses``): input items, tools and
options, checked field by field, into the chat messages the template renders and the
``Generation`` every API becomes. The reply side is ``responses_api``.

Input items become template messages as the model produced them: reasoning, assistant
text and calls of one turn are one assistant message, so the next turn re-renders the
tokens of the last one and hits the cache through them.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from blockserve.server.errors import invalid
from blockserve.server.fields import (
    Format,
    Frontend,
    Generation,
    ToolChoice,
    boolean,
    constrain,
    content_text,
    ignore_unknown,
    integer,
    log,
    one_format,
    refuse,
    render,
    sampling_params,
    schema_object,
    template_kwargs,
    tool_choice,
)

MAX_ITEMS = 16384  # input items (with the stored history of previous_response_id)
MAX_TOOLS = 512  # function tools after namespaces are flattened
MAX_NAME = 128
MAX_METADATA = 16  # pairs, as OpenAI: keys up to 64 characters, values up to 512
NAMESPACE_SEP = "__"  # a namespace's function "fn" of "ns" reaches the model as "ns__fn"
ENCRYPTED_PREFIX = "bs1."  # our reasoning round trip: the exact text, base64url

_KNOWN = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
          "stream", "stream_options", "max_output_tokens", "temperature", "top_p", "text",
          "reasoning", "include", "store", "previous_response_id", "metadata", "user",
          "background", "conversation", "prompt", "top_logprobs", "truncation",
          # hints and bookkeeping: prompt caching is automatic here
          "prompt_cache_key", "prompt_cache_retention", "safety_identifier", "service_tier",
          "client_metadata", "max_tool_calls", "context_management"}
_HOSTED = {"web_search", "web_search_preview", "web_search_2025_08_26", "file_search",
           "code_interpreter", "image_generation", "computer_use_preview", "computer",
           "mcp", "local_shell", "shell", "apply_patch", "tool_search"}
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
_MEDIA = {"input_image": "image", "input_file": "file", "input_audio": "audio"}
_SKIPPED_ITEMS = {"web_search_call", "file_search_call", "image_generation_call",
                  "computer_call", "computer_call_output", "local_shell_call",
                  "local_shell_call_output", "mcp_call", "mcp_list_tools", "compaction",
                  "tool_search_call", "tool_search_output", "additional_tools"}
_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


@dataclass(frozen=True)
class ToolRef:
    """What the model's flat tool name stands for in the client's tool list."""

    kind: str  # "function" or "custom"
    name: str
    namespace: str | None = None


@dataclass
class Tools:
    """The request's client tools in the template's shape, and their names' meaning."""

    template: list[dict] = field(default_factory=list)
    refs: dict[str, ToolRef] = field(default_factory=dict)

    def flat(self, name: str, namespace: str | None) -> str:
        """The flat name the model knows a (namespace, name) tool by."""
        return f"{namespace}{NAMESPACE_SEP}{name}" if namespace else name

    def ref(self, flat: str) -> ToolRef:
        return self.refs.get(flat) or ToolRef("function", flat)

    def add(self, ref: ToolRef, description: Any, parameters: Any) -> None:
        flat = self.flat(ref.name, ref.namespace)
        if flat in self.refs:
            raise invalid(f"'tools': the name {flat!r} is given twice", param="tools")
        if len(self.refs) >= MAX_TOOLS:
            raise invalid(f"'tools': at most {MAX_TOOLS} tools", param="tools")
        self.refs[flat] = ref
        self.template.append({"type": "function", "function": {
            "name": flat, "description": description, "parameters": parameters}})


@dataclass
class ResponsesRequest:
    """A validated Responses request: what generates, and what the reply echoes."""

    gen: Generation
    tools: Tools
    items: list[dict]  # the input items, with the history (what a stored reply keeps)
    echo: dict  # request fields the response object repeats
    encrypted_reasoning: bool = False  # include: reasoning.encrypted_content
    store: bool = True


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


def _name(v: Any, where: str, param: str) -> str:
    if not isinstance(v, str) or not v or len(v) > MAX_NAME:
        raise invalid(f"{where}: 'name' must be a string of 1 to {MAX_NAME} characters",
                      param=param)
    return v


def _function_tool(t: dict, where: str) -> tuple[str, Any, Any]:
    name = _name(t.get("name"), where, "tools")
    desc = t.get("description")
    if desc is not None and not isinstance(desc, str):
        raise invalid(f"{where}: 'description' must be a string", param="tools")
    params = t.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise invalid(f"{where}: 'parameters' must be a JSON schema object", param="tools")
    return name, desc or "", params


def _custom_description(t: dict, where: str) -> str:
    """A freeform tool's description, with its grammar (the model writes to it)."""
    desc = t.get("description") or ""
    fmt = t.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return desc
    if not isinstance(fmt, dict) or fmt.get("type") != "grammar" or not isinstance(
            fmt.get("definition"), str) or not isinstance(desc, str):
        raise invalid(f"{where}: 'format' must be text or a grammar with a definition",
                      param="tools")
    syntax = fmt.get("syntax") if isinstance(fmt.get("syntax"), str) else "lark"
    return f"{desc}\n\nThe input must follow this {syntax} grammar:\n{fmt['definition']}"


def parse_tools(tools: Any) -> Tools:
    """Function tools as they are, namespaces flattened into their functions, custom
    tools as a function of one string ``input``; hosted tools are not ours to run."""
    out = Tools()
    if tools is None:
        return out
    if not isinstance(tools, list):
        raise invalid("'tools' must be a list", param="tools")
    hosted = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        kind = t.get("type") if isinstance(t, dict) else None
        if not isinstance(kind, str):
            raise invalid(f"{where}: each tool must be an object with a 'type'", param="tools")
        if kind == "function":
            name, desc, params = _function_tool(t, where)
            out.add(ToolRef("function", name), desc, params)
        elif kind == "namespace":
            ns = _name(t.get("name"), where, "tools")
            inner = t.get("tools")
            if not isinstance(inner, list):
                raise invalid(f"{where}: a namespace needs a list of 'tools'", param="tools")
            for j, f in enumerate(inner):
                if not isinstance(f, dict) or f.get("type") != "function":
                    raise invalid(f"{where}.tools[{j}]: a namespace holds function tools",
                                  param="tools")
                name, desc, params = _function_tool(f, f"{where}.tools[{j}]")
                out.add(ToolRef("function", name, ns), desc, params)
        elif kind == "custom":
            name = _name(t.get("name"), where, "tools")
            out.add(ToolRef("custom", name), _custom_description(t, where), {
                "type": "object", "properties": {"input": {"type": "string"}},
                "required": ["input"]})
        else:
            hosted.append(kind if kind in _HOSTED else f"{kind} (unknown)")
    if hosted:
        log.warning("responses: ignoring hosted tool(s) %s: only client tools run here",
                    ", ".join(hosted))
    return out


def _tool_choice(body: dict, tools: Tools) -> ToolChoice:
    choice = body.get("tool_choice")
    parallel = boolean(body, "parallel_tool_calls", True)
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind not in ("function", "custom"):
            raise invalid(f"'tool_choice' of type {kind!r} is not supported here (auto, "
                          "none, required, or a function or custom tool by name)",
                          param="tool_choice")
        name = choice.get("name")
        ns = choice.get("namespace")
        if isinstance(name, str) and isinstance(ns, str):
            name = tools.flat(name, ns)
        return tool_choice("function", name, tools.template or None, parallel)
    if choice is not None and not isinstance(choice, str):
        raise invalid("'tool_choice' must be a string or an object", param="tool_choice")
    return tool_choice(choice, None, tools.template or None, parallel)


def _text_format(body: dict) -> Format | None:
    """``text.format``: text, json_object, or json_schema (always enforced)."""
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise invalid("'text' must be an object", param="text")
    ignore_unknown(text, {"format", "verbosity"}, "responses text")
    fmt = text.get("format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return Format("json", None, "text.format")
    if kind == "json_schema":
        schema = fmt.get("schema")
        return Format("json", None if schema is None else
                      schema_object(schema, "text.format.schema"), "text.format")
    raise invalid("'text.format.type' must be text, json_object or json_schema",
                  param="text.format")


def _thinking(body: dict) -> bool | None:
    """``reasoning.effort`` onto the template's thinking switch."""
    reasoning = body.get("reasoning")
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


def _metadata(body: dict) -> dict | None:
    meta = body.get("metadata")
    if meta is None:
        return None
    if not isinstance(meta, dict) or len(meta) > MAX_METADATA or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in meta.items()):
        raise invalid(f"'metadata' must map at most {MAX_METADATA} keys (up to 64 "
                      "characters) to strings (up to 512)", param="metadata")
    return meta


def _include(body: dict) -> set[str]:
    include = body.get("include")
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


def _items(body: dict, history: list[dict] | None) -> list[dict]:
    given = body.get("input")
    if isinstance(given, str):
        given = [{"type": "message", "role": "user", "content": given}]
    if given is None and history:
        given = []
    if not isinstance(given, list):
        raise invalid("'input' must be a string or a list of items", param="input")
    items = (history or []) + given
    if not items:
        raise invalid("'input' is empty", param="input")
    if len(items) > MAX_ITEMS:
        raise invalid(f"'input' has {len(items)} items; at most {MAX_ITEMS}", param="input")
    if not all(isinstance(it, dict) for it in items):
        raise invalid("each input item must be an object", param="input")
    return items


def parse_request(body: dict, frontend: Frontend, default_max_tokens: int,
                  history: list[dict] | None = None) -> ResponsesRequest:
    """Validate a body (``history``: the items of ``previous_response_id``)."""
    ignore_unknown(body, _KNOWN, "responses")
    _refusals(body)
    items = _items(body, history)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("'instructions' must be a string", param="instructions")
    tools = parse_tools(body.get("tools"))
    choice = _tool_choice(body, tools)
    fmt = one_format(_text_format(body), choice.forced)
    max_out = integer(body, "max_output_tokens", 1, default_max_tokens)
    sampling = sampling_params({"max_tokens": max_out, "temperature": body.get("temperature"),
                                "top_p": body.get("top_p")}, default_max_tokens)
    thinking = _thinking(body)
    msgs = Conversation(tools).build(items, instructions)
    rendered = render(frontend, msgs, tools.template or None, template_kwargs({}, thinking))
    gen = Generation(rendered.tokens, sampling, rendered.checkpoints, boolean(body, "stream"),
                     tools=tools.template or None, parse_tools=choice.parse,
                     reasoning_open=rendered.reasoning_open, thinking=thinking is True)
    user = body.get("user")
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
    return ResponsesRequest(constrain(frontend, gen, fmt), tools, items, echo,
                            "reasoning.encrypted_content" in _include(body),
                            echo["store"])


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
        kind = item.get("type", "message")
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
        name = _name(item.get("name"), where, "input")
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
            "function": {"name": self.tools.flat(name, ns), "arguments": args}})

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
