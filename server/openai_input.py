"""Reading OpenAI's chat and text completion requests (and vLLM's extras) into a
``Generation``: messages, tools and tool choice, formats, sampling, the chat prompt."""

from __future__ import annotations

import json
from typing import Any

from blockserve.engine.text.frontend import TokenizerFrontend
from blockserve.engine.text.output import ReplySpec
from blockserve.engine.text.structured import ChoiceFormat, JsonFormat, RegexFormat
from blockserve.server.errors import invalid
from blockserve.server.fields import (
    Bounds,
    FormatRequest,
    Generation,
    ToolChoice,
    boolean,
    cache_salt,
    check_messages,
    check_tools,
    constrain,
    content_text,
    ignore_unknown,
    integer,
    json_format,
    name_of_type,
    one_format,
    reads_fields,
    refuse,
    take,
    render,
    sampling_params,
    schema_object,
    template_kwargs,
    token_ids,
    tool_choice,
)

# Known fields that change nothing in the output (client bookkeeping, hints). Every
# other field the parsers don't read is logged as ignored (``reads_fields``).
_INERT = {"model", "user", "store", "metadata", "service_tier", "prompt_cache_key",
          "verbosity", "safety_identifier", "prediction", "modalities", "stream_reasoning",
          "separate_reasoning", "no_stop_trim", "return_hidden_states", "request_id",
          "priority", "add_special_tokens", "documents"}
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
_MEDIA_PARTS = {"image_url": "image", "input_image": "image", "input_audio": "audio",
                "file": "file", "input_file": "file", "video_url": "video"}


# Shapes of the fields read here that no typed reader describes, for /openapi.json.
STRINGS = {"type": "array", "items": {"type": "string"}}
MESSAGES = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role"], "properties": {
        "role": {"enum": sorted(_ROLES)},
        "content": {"type": ["string", "array", "null"], "items": {"type": "object"}},
        "name": {"type": "string"}, "tool_call_id": {"type": "string"},
        "tool_calls": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string"}, "type": {"const": "function"},
            "function": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"},
                "arguments": {"type": ["string", "object"]}}}}}},
        "reasoning_content": {"type": ["string", "null"]}}}}
TOOLS = {"type": ["array", "null"], "items": {"type": "object"}}
TOOL_CHOICE = {"type": ["string", "object", "null"],
               "description": "auto, none, required, or {type: function, function: {name}}"}
RESPONSE_FORMAT = {"type": ["object", "null"], "properties": {
    "type": {"enum": ["text", "json_object", "json_schema"]},
    "json_schema": {"type": "object", "properties": {"schema": {"type": "object"}}}}}


def _prompt_shape(vocab_size: int) -> dict:
    return {"anyOf": [{"type": "string", "minLength": 1},
                      {"type": "array", "minItems": 1, "maxItems": 1,
                       "items": {"type": "string", "minLength": 1}},
                      {"type": "array", "minItems": 1, "items": {
                          "type": "integer", "minimum": 0, "maximum": vocab_size - 1}}]}


def _refusals(body: dict) -> None:
    """Known fields whose effect this server can't give: a 400 rather than a silent
    change of the result."""
    refuse(body, "best_of", lambda v: v in (1, body.get("n", 1)),
           "must equal n (choosing the best of several is not supported)")
    for name in ("guided_grammar", "guided_decoding_backend", "prompt_logprobs"):
        refuse(body, name, lambda v: False, "is not supported by this server")
    refuse(body, "use_beam_search", lambda v: v is False, "is not supported")
    refuse(body, "min_tokens", lambda v: v == 0, "is not supported")


MAX_CHOICES = 16


def _response_format(body: dict) -> FormatRequest | None:
    """OpenAI's ``response_format``; a json_schema's schema is in ``json_schema``."""
    rf = take(body, "response_format", RESPONSE_FORMAT)
    schema_of = rf.get("json_schema") if isinstance(rf, dict) else None
    return json_format(rf, schema_of, "response_format")


def _guided(body: dict) -> FormatRequest | None:
    """vLLM's structured outputs: ``structured_outputs`` {json, regex, choice,
    json_object}, or the older ``guided_json``/``guided_regex``/``guided_choice``."""
    so = take(body, "structured_outputs", {"type": ["object", "null"]})
    if so is not None and not isinstance(so, dict):
        raise invalid("'structured_outputs' must be an object", param="structured_outputs")
    shapes = {"json": {"type": ["object", "string", "null"]},
              "regex": {"type": ["string", "null"]}, "choice": {**STRINGS, "minItems": 1}}
    given = [(k, body[f"guided_{k}"], f"guided_{k}") for k in ("json", "regex", "choice")
             if take(body, f"guided_{k}", shapes[k]) is not None]
    for k, v in (so or {}).items():
        if k in ("grammar", "structural_tag") and v is not None:
            raise invalid(f"'structured_outputs.{k}' is not supported by this server",
                          param="structured_outputs")
        if k in ("json", "regex", "choice", "json_object") and v not in (None, False):
            given.append((k, v, f"structured_outputs.{k}"))
    formats = []
    for kind, v, param in given:
        if kind == "json":
            formats.append(FormatRequest(JsonFormat(schema_object(v, param)), param))
        elif kind == "json_object":
            formats.append(FormatRequest(JsonFormat(), param))
        elif kind == "regex":
            if not isinstance(v, str):
                raise invalid(f"'{param}' must be a string", param=param)
            formats.append(FormatRequest(RegexFormat(v), param))
        elif not isinstance(v, list) or not v or not all(isinstance(c, str) for c in v):
            raise invalid(f"'{param}' must be a non-empty list of strings", param=param)
        else:
            formats.append(FormatRequest(ChoiceFormat(tuple(v)), param))
    return one_format(*formats)


def _n(body: dict) -> int:
    """Choices of one prompt: they share its blocks, so it is prefilled once."""
    return integer(body, "n", 1, 1, hi=MAX_CHOICES)


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = boolean(body, "stream")
    opts = take(body, "stream_options", {"type": ["object", "null"], "properties": {
        "include_usage": {"type": "boolean"}}})
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise invalid("'stream_options' must be an object", param="stream_options")
    ignore_unknown(opts, {"include_usage", "continuous_usage_stats", "include_obfuscation"},
                   "stream_options")
    return stream, stream and bool(opts.get("include_usage"))


def _text(content: Any, where: str, answering: bool) -> str:
    return content_text(content, where, answering, ("text", "input_text", "output_text"),
                        _MEDIA_PARTS)


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """Assistant tool calls in the template's shape, arguments as an object where they
    are JSON (templates render an object as the model wrote it)."""
    if not isinstance(calls, list):
        raise invalid(f"{where}: 'tool_calls' must be a list", param="messages")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"{where}: each tool call needs function.name", param="messages")
        args = fn.get("arguments")
        if not isinstance(args, (str, dict)):  # the API's 400; an object, as vLLM takes
            raise invalid(f"{where}.tool_calls[{j}].function.arguments must be a string "
                          "of JSON (or an object)",
                          param=f"{where}.tool_calls[{j}].function.arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass  # rendered as given
        out.append({"id": c.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def chat_messages(messages: Any, bounds: Bounds) -> list[dict]:
    check_messages(messages, bounds.limits)
    if not all(isinstance(m, dict) for m in messages):
        raise invalid("each message must be an object", param="messages")
    last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"),
                         default=-1)
    msgs = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = name_of_type(m, "role")
        if role not in _ROLES:
            raise invalid(f"{where}: 'role' must be one of {sorted(_ROLES)}",
                          param="messages")
        role = "tool" if role == "function" else role
        answering = i > last_assistant and role == "user"
        msg = {"role": role, "content": _text(m.get("content"), where, answering)}
        for extra in ("name", "tool_call_id"):
            if m.get(extra) is not None:
                if not isinstance(m[extra], str):
                    raise invalid(f"{where}: '{extra}' must be a string", param="messages")
                msg[extra] = m[extra]
        if m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], where)
        reasoning = m.get("reasoning_content") or m.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            msg["reasoning_content"] = reasoning
        msgs.append(msg)
    return msgs


def _tool_choice(body: dict, tools: list[dict] | None) -> ToolChoice:
    choice = take(body, "tool_choice", TOOL_CHOICE)
    legacy = take(body, "function_call", {"type": ["string", "object", "null"]})
    choice = legacy if "tool_choice" not in body else choice
    parallel = boolean(body, "parallel_tool_calls", True)
    if isinstance(choice, dict):  # {"type": "function", "function": {"name": ...}}
        if choice.get("type", "function") != "function":
            raise invalid(f"'tool_choice' of type {choice.get('type')!r} is not supported",
                          param="tool_choice")
        fn = choice.get("function", choice)  # legacy function_call: {"name": ...}
        return tool_choice("function", fn.get("name") if isinstance(fn, dict) else None,
                           tools, parallel)
    if choice is not None and not isinstance(choice, str):
        raise invalid("'tool_choice' must be a string or an object", param="tool_choice")
    return tool_choice(choice, None, tools, parallel)


def _thinking(body: dict) -> bool | None:
    effort = take(body, "reasoning_effort", {"enum": [
        None, "none", "minimal", "low", "medium", "high", "xhigh"]})
    if effort is None:
        return None
    if effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
        raise invalid("'reasoning_effort' must be one of none, minimal, low, medium, high, "
                      "xhigh", param="reasoning_effort")
    return effort not in ("none", "minimal")


@reads_fields(_INERT, "chat completion")
def parse_chat(body: dict, frontend: TokenizerFrontend, bounds: Bounds) -> Generation:
    _refusals(body)
    msgs = chat_messages(take(body, "messages", MESSAGES, required=True), bounds)
    tools = check_tools(take(body, "tools", TOOLS), bounds.limits)
    if tools is None and take(body, "functions", TOOLS):  # the legacy shape
        functions = body["functions"]
        if not isinstance(functions, list) or not all(isinstance(f, dict)
                                                      for f in functions):
            raise invalid("'functions' must be a list of objects", param="functions")
        tools = check_tools([{"type": "function", "function": f} for f in functions],
                            bounds.limits)
    choice = _tool_choice(body, tools)
    fmt = one_format(_response_format(body), _guided(body), choice.forced)
    logprobs = boolean(body, "logprobs")
    top = integer(body, "top_logprobs", 0, 0, hi=20)
    if top and not logprobs:
        raise invalid("'top_logprobs' needs logprobs=true", param="top_logprobs")
    stream, include_usage = _stream_flags(body)
    sampling = sampling_params(body, bounds, logprobs, top)
    continue_final = boolean(body, "continue_final_message")
    kwargs = template_kwargs(body, _thinking(body), bounds.limits)
    rendered = render(frontend, msgs, tools, kwargs, continue_final)
    reply = ReplySpec(tools, choice.parse, rendered.reasoning_open,
                      include_reasoning=boolean(body, "include_reasoning", True))
    gen = Generation(rendered.tokens, rendered.checkpoints, sampling, reply, stream,
                     include_usage, cache_salt(body), n=_n(body))
    return constrain(frontend, gen, fmt, bounds.limits,
                     thinking=kwargs.get("enable_thinking") is True)


@reads_fields(_INERT, "completion")
def parse_completion(body: dict, frontend: TokenizerFrontend, bounds: Bounds) -> Generation:
    _refusals(body)
    refuse(body, "echo", lambda v: v is False, "is not supported")
    refuse(body, "suffix", lambda v: v == "", "is not supported")
    prompt = take(body, "prompt", _prompt_shape(bounds.vocab_size), required=True)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        tokens = frontend.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        tokens = token_ids(prompt, bounds.vocab_size, "prompt")
    else:
        raise invalid("'prompt' must be a string, one string in a list, or a list of token "
                      "ids (batches are not supported)", param="prompt")
    if not tokens:
        raise invalid("'prompt' is empty", param="prompt")
    top = integer(body, "logprobs", 0, None, hi=20)
    stream, include_usage = _stream_flags(body)
    fmt = one_format(_response_format(body), _guided(body))
    gen = Generation(tokens, [], sampling_params(body, bounds, top is not None, top or 0),
                     ReplySpec(structured=False), stream, include_usage, cache_salt(body),
                     n=_n(body))
    return constrain(frontend, gen, fmt, bounds.limits)
