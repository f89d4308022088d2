"""What both APIs share when they read a request: field validators, sampling, the chat
prompt, and the internal shape every request becomes (``Generation``).

The policy, as vLLM's: a field we don't know is ignored, with a warning in the log that
names it; a field we know but can't honour in a way that would silently change the
result is refused (400, naming it); a malformed value of a known field is a 400. Every
value is checked against the model (token ids within its vocabulary) and bounded
(``limits.Limits``) before anything is queued: nothing a client sends reaches MLX
unchecked.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from blockserve.engine.text.frontend import TokenizerFrontend
from blockserve.engine.text.output import ReplySpec
from blockserve.engine.text.structured import ChoiceFormat, Format, JsonFormat, ToolCallFormat
from blockserve.scheduler import SamplingParams
from blockserve.server.errors import invalid
from blockserve.server.limits import Limits, bounded, json_size, over

log = logging.getLogger("blockserve.server")

# What a text-only model reads in place of an image or document of an earlier turn.
MEDIA_PLACEHOLDER = "[{kind} omitted: this model reads text only]"


@dataclass(frozen=True)
class Bounds:
    """What a request is checked against: the model's vocabulary, the server's limits,
    and the max_tokens it gets when it names none."""

    vocab_size: int
    limits: Limits = field(default_factory=Limits)
    default_max_tokens: int | None = None  # None: as many as the context allows
    max_tokens_cap: int | None = None  # --max-tokens: the most any request gets

    def max_tokens(self, requested: int | None) -> int:
        """A request's max_tokens: what it asked, or the default, within the cap. With
        neither, the scheduler clamps ``MAX_INT`` to what the context leaves (as vLLM
        and OpenAI do), so a reply is never cut short by a default of ours."""
        n = self.default_max_tokens if requested is None else requested
        n = MAX_INT if n is None else n
        return n if self.max_tokens_cap is None else min(n, self.max_tokens_cap)


@dataclass(frozen=True)
class Generation:
    """One validated request, whichever API it came from: the rendered prompt, how to
    sample, how to parse the reply, and how to send it."""

    prompt: list[int]
    checkpoints: list[tuple[int, int]]  # (token offset, tier) the cache keeps longest
    sampling: SamplingParams
    reply: ReplySpec = ReplySpec()
    stream: bool = False
    include_usage: bool = False  # a usage chunk at the end of a stream
    cache_salt: str | None = None
    n: int = 1  # choices, sharing the prompt's blocks
    format: str | None = None  # the structured-output format's kind, for metrics


@dataclass(frozen=True)
class FormatRequest:
    """A structured-output format a request asks for, and ``param``, the field that asked
    (named in a 400 if it can't be enforced)."""

    format: Format
    param: str


def constrain(frontend: TokenizerFrontend, gen: Generation, fmt: FormatRequest | None,
              limits: Limits, thinking: bool = False) -> Generation:
    """``gen`` with its format's grammar; a format that can't be enforced, or whose
    source is over the size limit, is a 400. ``thinking``: the request asked the model
    to think, which it may do before the constrained answer."""
    if fmt is None:
        return gen
    source = fmt.format.source
    if isinstance(fmt.format, ChoiceFormat):
        bounded(source, limits.max_choice_options, f"'{fmt.param}' options", fmt.param)
    size = json_size(source)
    if size > limits.max_grammar_bytes:
        raise over(f"'{fmt.param}' size in bytes", size, limits.max_grammar_bytes, fmt.param)
    try:
        c = frontend.constrain(fmt.format, gen.reply.reasoning_open, thinking)
    except ValueError as e:
        raise invalid(f"'{fmt.param}' can't be enforced: {e}", param=fmt.param)
    return replace(gen, sampling=replace(gen.sampling, constraint=c),
                   reply=replace(gen.reply, bare_tool_call=c.bare_tool_call),
                   format=fmt.format.kind)


def json_format(fmt: Any, schema_of: Any, param: str) -> FormatRequest | None:
    """OpenAI's shape of a JSON format, ``{"type": text | json_object | json_schema}``
    (Chat's ``response_format``, Responses' ``text.format``): ``schema_of`` is where the
    schema sits (a dict holding ``schema``), read only for json_schema. Always enforced,
    ``strict`` or not: a schema that can't be enforced is a 400, never a hope."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return FormatRequest(JsonFormat(), param)
    if kind == "json_schema":
        if not isinstance(schema_of, dict):
            raise invalid(f"'{param}' needs its schema in an object", param=param)
        schema = schema_of.get("schema")
        return FormatRequest(JsonFormat(None if schema is None else
                                        schema_object(schema, f"{param}.schema")), param)
    raise invalid(f"'{param}.type' must be text, json_object or json_schema", param=param)


def one_format(*formats: FormatRequest | None) -> FormatRequest | None:
    """At most one format per request (a schema and a forced tool call can't both hold)."""
    given = [f for f in formats if f is not None]
    if len(given) > 1:
        raise invalid(f"'{given[0].param}' and '{given[1].param}' can't be combined",
                      param=given[1].param)
    return given[0] if given else None


def schema_object(v: Any, param: str) -> dict:
    """A JSON schema given as an object, or as a JSON string (vLLM's guided_json)."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise invalid(f"'{param}' is not valid JSON: {e}", param=param)
    if not isinstance(v, dict):
        raise invalid(f"'{param}' must be a JSON schema object", param=param)
    return v


def content_text(content: Any, where: str, answering: bool, text_types: tuple[str, ...],
                 media: dict[str, str]) -> str:
    """A message's content as text: a string, or a list of parts (OpenAI) or blocks
    (Anthropic) of ``text_types``. Media (``media``: type -> what to call it) in an
    earlier turn becomes a placeholder; in the turn being answered it is a 400. Other
    parts are ignored, with a warning."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}: content must be a string or a list of parts",
                      param="messages")
    out = []
    for part in content:
        kind = name_of_type(part)
        if kind in text_types and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind in media:
            if answering:
                raise invalid(f"{where}: this model reads text only; a part of type "
                              f"{kind!r} can't be answered", param="messages")
            out.append(MEDIA_PLACEHOLDER.format(kind=media[kind]))
        else:
            log.warning("%s: ignoring a content part of type %r", where, kind)
    return "".join(out)


def name_of_type(obj: Any, key: str = "type", default: str | None = None) -> str | None:
    """``obj[key]`` where ``obj`` is an object and that is a string (a part's or an
    item's type, a role), ``default`` where it is absent, else None: never a value that
    can't be looked up in a set (a client's ``{"type": {}}``)."""
    if not isinstance(obj, dict):
        return None
    v = obj.get(key, default)
    return v if isinstance(v, str) else None


def ignore_unknown(body: dict, known: set[str], where: str) -> None:
    """Unknown fields of a nested object are ignored, and named in the log."""
    unknown = sorted(set(body) - known)
    if unknown:
        log.warning("%s: ignoring unknown field(s): %s", where, ", ".join(unknown))


class Body(dict):
    """A request body that notes which fields its parser reads, so that the fields an
    API knows are derived from its parser rather than kept in a list beside it, and
    ``shapes``, what the readers of typed fields (``integer``, ``number``, ``take``...)
    say each one is: a JSON schema per field, from which ``/openapi.json`` is built."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.read: set[str] = set()
        self.shapes: dict[str, dict] = {}
        self.required: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(key)
        return super().__contains__(key)


class Renamed(dict):
    """Fields of ``parent`` under the names a shared reader expects (Anthropic's
    ``stop_sequences`` read as ``stop``): what the reader says of a field is said of
    the parent's."""

    def __init__(self, parent: dict, names: dict[str, str]):
        super().__init__({inner: parent.get(outer) for inner, outer in names.items()})
        self.parent, self.names = parent, names


def describe(body: dict, name: str, shape: dict) -> None:
    """Say what field ``name`` of ``body`` is (a JSON schema): kept when ``body`` is a
    ``Body`` (the first reader's word stands), for ``/openapi.json``."""
    if isinstance(body, Renamed):
        describe(body.parent, body.names.get(name, name), shape)
    elif isinstance(body, Body):
        body.shapes.setdefault(name, shape)


def take(body: dict, name: str, shape: dict | None, required: bool = False) -> Any:
    """``body[name]`` (None if absent), a field whose shape is ``shape`` (None: a
    typed reader says); ``required``: the parser refuses a body without it."""
    if shape is not None:
        describe(body, name, shape)
    if required and isinstance(body, Body):
        body.required.add(name)
    return body.get(name)


def reads_fields(inert: set[str], where: str) -> Callable:
    """A body parser's decorator: the parser reads a ``Body``, and whatever it never
    read (and is not ``inert``) is logged as ignored once it has parsed the body. A
    ``Body`` given is read as it is (``openapi`` reads what was noted in it); the
    parser's ``inert`` fields are its attribute ``inert``."""
    def wrap(parse: Callable) -> Callable:
        @functools.wraps(parse)
        def parsed(body: dict, *args: Any, **kwargs: Any) -> Any:
            body = body if isinstance(body, Body) else Body(body)
            result = parse(body, *args, **kwargs)
            warn_unread(body, inert, where)
            return result

        parsed.inert = frozenset(inert)
        return parsed

    return wrap


def warn_unread(body: Body, inert: set[str], where: str) -> None:
    """After parsing: a field the parser never read (and that is not ``inert``, known to
    change nothing) was ignored, and is named in the log, as vLLM does."""
    unread = sorted(set(body) - body.read - inert)
    if unread:
        log.warning("%s: ignoring field(s) with no effect here: %s", where,
                    ", ".join(unread))


def refuse(body: dict, name: str, ok: Any, why: str, shape: dict | None = None) -> None:
    """A 400 naming ``name`` unless its value is absent or ``ok(value)`` (``shape``:
    what an accepted value is)."""
    describe(body, name, {"description": f"refused unless accepted: {why}",
                          **(shape or {})})
    v = body.get(name)
    if v is not None and not ok(v):
        raise invalid(f"'{name}' {why}", param=name)


def number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    describe(body, name, {"type": ["number", "null"], "minimum": lo, "maximum": hi})
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise invalid(f"'{name}' must be a number", param=name)
    if not lo <= v <= hi:
        raise invalid(f"'{name}' must be between {lo} and {hi}, got {v}", param=name)
    return float(v)


MAX_INT = 2**31 - 1  # the sane size of a count a client sends (max_tokens, top_k)


def integer(body: dict, name: str, lo: int, default: int | None, hi: int = MAX_INT
            ) -> int | None:
    describe(body, name, {"type": ["integer", "null"], "minimum": lo, "maximum": hi})
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # 16.0: JSON doesn't tell integers from floats
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(f"'{name}' must be an integer", param=name)
    if not lo <= v <= hi:
        raise invalid(f"'{name}' must be between {lo} and {hi}", param=name)
    return v


def boolean(body: dict, name: str, default: bool = False) -> bool:
    describe(body, name, {"type": ["boolean", "null"]})
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(f"'{name}' must be a boolean", param=name)
    return v


def _stops(v: Any, name: str, limits: Limits) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise invalid(f"'{name}' must be a string or a list of strings", param=name)
    bounded(v, limits.max_stop, f"'{name}' entries", name)
    longest = max((len(s) for s in v), default=0)
    if longest > limits.max_stop_chars:
        raise over(f"'{name}' characters in one entry", longest, limits.max_stop_chars, name)
    return tuple(s for s in v if s)


def token_id(v: Any, vocab_size: int, param: str) -> int:
    """One token id of this model's vocabulary, or a 400 naming ``param``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(f"'{param}' must hold integer token ids", param=param)
    if not 0 <= v < vocab_size:
        raise invalid(f"'{param}' has token id {v}, outside this model's vocabulary "
                      f"[0, {vocab_size})", param=param)
    return v


def token_ids(v: Any, vocab_size: int, param: str, limit: int | None = None) -> list[int]:
    """A list of this model's token ids (at most ``limit``), or a 400 naming ``param``."""
    if not isinstance(v, list):
        raise invalid(f"'{param}' must be a list of token ids", param=param)
    if limit is not None:
        bounded(v, limit, f"'{param}' entries", param)
    return [token_id(t, vocab_size, param) for t in v]


def _logit_bias(v: Any, bounds: Bounds) -> tuple[tuple[int, float], ...]:
    if not v:
        return ()
    if not isinstance(v, dict):
        raise invalid("'logit_bias' must map token ids to numbers", param="logit_bias")
    bounded(v, bounds.limits.max_logit_bias, "'logit_bias' entries", "logit_bias")
    out = []
    for k, b in v.items():
        try:
            tok = int(k)
        except ValueError:
            raise invalid(f"'logit_bias' key {k[:32]!r} is not a token id",
                          param="logit_bias")
        token_id(tok, bounds.vocab_size, "logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise invalid("'logit_bias' values must be numbers between -100 and 100",
                          param="logit_bias")
        out.append((tok, float(b)))
    return tuple(out)


# Shapes of fields read here, for ``/openapi.json`` (what the checks below accept).
TOKEN_IDS = {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}}
STOPS = {"type": ["string", "array", "null"], "items": {"type": "string"}}
LOGIT_BIAS = {"type": ["object", "null"], "additionalProperties": {
    "type": "number", "minimum": -100, "maximum": 100}}


def sampling_params(body: dict, bounds: Bounds, logprobs: bool = False,
                    top_logprobs: int = 0) -> SamplingParams:
    limits = bounds.limits
    max_tokens = integer(body, "max_completion_tokens", 1, None)
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens", 1, None)
    max_tokens = bounds.max_tokens(max_tokens)
    top_k = integer(body, "top_k", -1, 0)
    if top_k >= bounds.vocab_size:
        top_k = 0  # every token is in the top k: the same as off
    stop_ids = token_ids(take(body, "stop_token_ids", TOKEN_IDS) or [], bounds.vocab_size,
                         "stop_token_ids", limits.max_stop_token_ids)
    seed = integer(body, "seed", 0, None, hi=2**64 - 1)  # a PRNG key takes 64 bits
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=number(body, "top_p", 1e-9, 1.0, 1.0),
        top_k=max(top_k, 0),
        min_p=number(body, "min_p", 0.0, 1.0, 0.0),
        seed=seed,
        stop=_stops(take(body, "stop", STOPS), "stop", limits),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=boolean(body, "ignore_eos"),
        presence_penalty=number(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        repetition_penalty=number(body, "repetition_penalty", 1e-3, 10.0, 1.0),
        logit_bias=_logit_bias(take(body, "logit_bias", LOGIT_BIAS), bounds),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        skip_special_tokens=boolean(body, "skip_special_tokens", True),
    )


MAX_SALT_CHARS = 1024


def cache_salt(body: dict) -> str | None:
    salt = take(body, "cache_salt", {"type": ["string", "null"],
                                     "maxLength": MAX_SALT_CHARS})
    if salt is not None and not isinstance(salt, str):
        raise invalid("'cache_salt' must be a string", param="cache_salt")
    if salt is not None and len(salt) > MAX_SALT_CHARS:
        raise over("'cache_salt' characters", len(salt), MAX_SALT_CHARS, "cache_salt")
    return salt


@dataclass(frozen=True)
class ToolChoice:
    parse: bool  # parse tool calls out of the text
    forced: FormatRequest | None = None  # the reply must be a call (of one named tool)


def tool_choice(kind: str | None, name: Any, tools: list[dict] | None, parallel: bool,
                param: str = "tool_choice") -> ToolChoice:
    """The one ``tool_choice`` policy of both APIs, given the choice's kind: 'auto' (the
    default) parses calls when there are tools, 'none' doesn't; 'required' or 'any'
    forces a call of one of the tools, 'function' or 'tool' a call of the named one."""
    if kind in (None, "auto"):
        return ToolChoice(bool(tools))
    if kind == "none":
        return ToolChoice(False)
    if kind not in ("required", "any", "function", "tool"):
        raise invalid(f"'{param}' must be auto, none, required/any or a named tool",
                      param=param)
    if not tools:
        raise invalid(f"'{param}' forces a tool call, but no 'tools' were given",
                      param=param)
    if kind in ("function", "tool"):
        if not isinstance(name, str):  # whether it is in 'tools': the grammar checks
            raise invalid(f"'{param}' must name a tool", param=param)
        return ToolChoice(True, FormatRequest(ToolCallFormat(tuple(tools), name), param))
    return ToolChoice(True, FormatRequest(ToolCallFormat(tuple(tools), None, parallel), param))


# Arguments of the tokenizer's ``apply_chat_template`` and of tokenizing: they would
# replace the template (code) or change the prompt's tokens, so they are not variables.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template",
    "add_generation_prompt", "continue_final_message", "tokenize", "sanitize_control_tokens",
    "padding", "truncation", "max_length", "pad_to_multiple_of", "padding_side",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    "add_special_tokens", "processor_kwargs", "stride", "verbose", "split_special_tokens"})


def _plain_tree(v: Any, limits: Limits) -> None:
    """Template variables are plain JSON values, in a small tree."""
    stack, nodes, chars = [v], 0, 0
    while stack:
        item = stack.pop()
        nodes += 1
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, dict):
            chars += sum(len(k) for k in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        if nodes > limits.max_template_kwargs_nodes or chars > limits.max_template_kwargs_chars:
            raise invalid("'chat_template_kwargs' is too large for template variables (at "
                          f"most {limits.max_template_kwargs_nodes} values and "
                          f"{limits.max_template_kwargs_chars} characters)",
                          param="chat_template_kwargs")


def template_kwargs(body: dict, enable_thinking: bool | None,
                    limits: Limits = Limits()) -> dict:
    """``chat_template_kwargs``, with the API's thinking switch unless it sets its own.
    They reach the template as plain variables only: never a template of the client's
    (a template is code) nor the tokenizer's arguments."""
    kwargs = take(body, "chat_template_kwargs", {"type": ["object", "null"]})
    if kwargs is not None and not isinstance(kwargs, dict):
        raise invalid("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    reserved = sorted(k for k in kwargs or {} if k in RESERVED_TEMPLATE_KWARGS
                      or k.startswith("return_"))
    if reserved:
        raise invalid(f"'chat_template_kwargs' may not set {', '.join(reserved)}: only "
                      "variables for the server's template", param="chat_template_kwargs")
    _plain_tree(kwargs or {}, limits)
    kwargs = dict(kwargs or {})
    if enable_thinking is not None:
        kwargs.setdefault("enable_thinking", enable_thinking)
    return kwargs


def check_tools(tools: Any, limits: Limits) -> list[dict] | None:
    """A request's ``tools``: a bounded list of objects."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise invalid("'tools' must be a list of objects", param="tools")
    bounded(tools, limits.max_tools, "'tools' entries", "tools")
    return tools


def check_messages(messages: Any, limits: Limits, param: str = "messages") -> list:
    """A non-empty list of messages, bounded in count and in content parts."""
    if not isinstance(messages, list) or not messages:
        raise invalid(f"'{param}' must be a non-empty list", param=param)
    if len(messages) > limits.max_messages:
        raise over(f"'{param}' entries", len(messages), limits.max_messages, param,
                   "--max-messages")
    parts = sum(len(m["content"]) for m in messages
                if isinstance(m, dict) and isinstance(m.get("content"), list))
    if parts > limits.max_content_parts:
        raise over("content parts", parts, limits.max_content_parts, param)
    return messages


def render(frontend: TokenizerFrontend, msgs: list[dict], tools: list[dict] | None,
           kwargs: dict | None, continue_final: bool = False) -> Any:
    """The chat template's prompt; a template that rejects the conversation is a 400."""
    if tools is not None and (not isinstance(tools, list)
                              or not all(isinstance(t, dict) for t in tools)):
        raise invalid("'tools' must be a list of objects", param="tools")
    try:
        return frontend.render_chat(msgs, tools or None, kwargs or None, continue_final)
    except Exception as e:  # e.g. a role order the template refuses
        merged = merge_system_messages(msgs)
        if merged != msgs:  # a template that takes system messages only first
            return render(frontend, merged, tools, kwargs, continue_final)
        raise invalid(f"the chat template rejected the messages: {e}", param="messages")


def merge_system_messages(msgs: list[dict]) -> list[dict]:
    """System messages after the first turn folded into the user message next to them
    (clients such as Claude Code send reminders that way)."""
    out: list[dict] = []
    pending: list[str] = []
    conversation_started = False
    for m in msgs:
        system = m["role"] in ("system", "developer")
        if system and conversation_started:
            pending.append(m.get("content") or "")
        elif pending and m["role"] == "user":
            out.append({**m, "content": "\n\n".join(pending + [m.get("content") or ""])})
            pending = []
        else:
            out.append(m)
        conversation_started = conversation_started or not system
    if pending:
        users = [j for j, m in enumerate(out) if m["role"] == "user"]
        if users:
            j = users[-1]
            out[j] = {**out[j], "content": "\n\n".join([out[j].get("content") or ""]
                                                        + pending)}
        else:
            out.append({"role": "user", "content": "\n\n".join(pending)})
    return out
