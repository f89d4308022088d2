"""Request bodies of the OpenAI and Anthropic APIs, validated into one internal shape.

Every field is either supported, accepted because it cannot change the output (e.g.
``user``), or refused with a 400 that names it: nothing is silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from blockserve.scheduler import SamplingParams
from blockserve.server.errors import ApiError, invalid

ANTHROPIC_BILLING_PREFIX = "x-anthropic-billing-header"


class Frontend(Protocol):
    """The model's tokenizer side (``engine.frontend.TokenizerFrontend``)."""

    model_id: str
    model_names: list[str]
    model_path: str

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> Any: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, tokens: list[int]) -> str: ...


@dataclass
class Generation:
    """One validated request, whichever API it came from."""

    prompt: list[int]
    sampling: SamplingParams
    checkpoints: list[tuple[int, int]] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    cache_salt: str | None = None


# Fields accepted with no effect on the output (bookkeeping on the client's side).
_INERT = {"user", "store", "metadata", "service_tier", "parallel_tool_calls"}
_SAMPLING = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
             "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "cache_salt"}
_CHAT = {"model", "messages", "stream", "stream_options", "n", "tools", "tool_choice",
         "frequency_penalty", "presence_penalty", "logit_bias", "logprobs",
         "response_format", "chat_template_kwargs"} | _SAMPLING | _INERT
_COMPLETION = {"model", "prompt", "stream", "stream_options", "n", "best_of", "echo",
               "suffix", "logprobs", "frequency_penalty", "presence_penalty",
               "logit_bias"} | _SAMPLING | _INERT
_MESSAGES = {"model", "messages", "system", "max_tokens", "stop_sequences", "temperature",
             "top_p", "top_k", "stream", "tools", "tool_choice", "thinking",
             # hints and bookkeeping: prompt caching is automatic here, routing is moot
             "metadata", "service_tier", "cache_control", "inference_geo", "speed",
             "diagnostics", "user_profile_id", "workspace_id"}


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(f"unsupported field(s): {', '.join(unknown)}", param=unknown[0])


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise invalid(f"'{name}' must be a number", param=name)
    if not lo <= v <= hi:
        raise invalid(f"'{name}' must be between {lo} and {hi}, got {v}", param=name)
    return float(v)


def _int(body: dict, name: str, lo: int, default: int | None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(f"'{name}' must be an integer", param=name)
    if v < lo:
        raise invalid(f"'{name}' must be >= {lo}, got {v}", param=name)
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise invalid(f"'{name}' must be a boolean", param=name)
    return v


def _zero_only(body: dict, name: str) -> None:
    v = body.get(name)
    if v not in (None, 0, 0.0, {}, False):
        raise invalid(f"'{name}' is not supported by this server", param=name)


def _stops(v: Any, name: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise invalid(f"'{name}' must be a string or a list of strings", param=name)
    return tuple(s for s in v if s)


def sampling_params(body: dict, default_max_tokens: int) -> SamplingParams:
    max_tokens = _int(body, "max_completion_tokens", 1, None)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, default_max_tokens)
    top_k = _int(body, "top_k", -1, 0)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise invalid("'stop_token_ids' must be a list of integers", param="stop_token_ids")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise invalid("'seed' must be an integer", param="seed")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 1e-9, 1.0, 1.0),
        top_k=max(top_k, 0),
        min_p=_number(body, "min_p", 0.0, 1.0, 0.0),
        seed=seed,
        stop=_stops(body.get("stop"), "stop"),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=_bool(body, "ignore_eos"),
    )


def _common(body: dict, allowed: set[str]) -> None:
    _check_fields(body, allowed)
    if _int(body, "n", 1, 1) != 1:
        raise invalid("only n=1 is supported", param="n")
    for name in ("frequency_penalty", "presence_penalty", "logit_bias", "logprobs"):
        _zero_only(body, name)


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}:
        raise invalid("'stream_options' supports only include_usage", param="stream_options")
    if opts and not stream:
        raise invalid("'stream_options' is only allowed with stream=true",
                      param="stream_options")
    return stream, bool(opts.get("include_usage"))


def _salt(body: dict) -> str | None:
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise invalid("'cache_salt' must be a string", param="cache_salt")
    return salt


def _text_content(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"{where}: content part of type {kind!r} is not supported "
                              "(text only)", param="messages")
            out.append(part["text"])
        return "".join(out)
    raise invalid(f"{where}: content must be a string or a list of parts", param="messages")


def _render(frontend: Frontend, msgs: list[dict], tools: list[dict] | None,
            template_kwargs: dict | None) -> Any:
    try:
        return frontend.render_chat(msgs, tools or None, template_kwargs)
    except Exception as e:  # a template can reject a conversation (e.g. role order)
        raise invalid(f"the chat template rejected the messages: {e}", param="messages")


_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _chat_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", param="messages")
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise invalid(f"messages[{i}]: 'role' must be one of {sorted(_ROLES)}",
                          param="messages")
        msg = {"role": m["role"], "content": _text_content(m.get("content"), f"messages[{i}]")}
        for extra in ("name", "tool_calls", "tool_call_id"):
            if m.get(extra) is not None:
                msg[extra] = m[extra]
        msgs.append(msg)
    return msgs


def parse_chat(body: dict, frontend: Frontend, default_max_tokens: int) -> Generation:
    _common(body, _CHAT)
    msgs = _chat_messages(body.get("messages"))
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise invalid("'tools' must be a list", param="tools")
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise invalid("'tool_choice' supports only 'auto' and 'none'", param="tool_choice")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise invalid("'response_format' supports only {'type': 'text'}",
                      param="response_format")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise invalid("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    stream, include_usage = _stream_flags(body)
    sampling = sampling_params(body, default_max_tokens)
    rendered = _render(frontend, msgs, tools, kwargs)
    return Generation(rendered.tokens, sampling, rendered.checkpoints, stream, include_usage,
                      _salt(body))


def parse_completion(body: dict, frontend: Frontend, default_max_tokens: int) -> Generation:
    _common(body, _COMPLETION)
    if _int(body, "best_of", 1, 1) != 1:
        raise invalid("only best_of=1 is supported", param="best_of")
    if _bool(body, "echo"):
        raise invalid("'echo' is not supported", param="echo")
    if body.get("suffix"):
        raise invalid("'suffix' is not supported", param="suffix")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        tokens = frontend.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        tokens = list(prompt)
    else:
        raise invalid("'prompt' must be a string, one string in a list, or a list of token "
                      "ids (batches are not supported)", param="prompt")
    if not tokens:
        raise invalid("'prompt' is empty", param="prompt")
    stream, include_usage = _stream_flags(body)
    return Generation(tokens, sampling_params(body, default_max_tokens), [], stream,
                      include_usage, _salt(body))


def _anthropic_blocks(content: Any, where: str) -> tuple[str, list[dict]]:
    """(text of the message, tool results carried in it as separate tool messages)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise invalid(f"{where}: content must be a string or a list of blocks",
                      param="messages")
    text, tools = [], []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif kind == "tool_use":
            text.append(json.dumps({"tool_use": block.get("name"),
                                    "input": block.get("input")}, sort_keys=True))
        elif kind == "tool_result":
            tools.append({"role": "tool",
                          "content": _anthropic_blocks(block.get("content") or "",
                                                       where)[0]})
        else:
            raise invalid(f"{where}: content block of type {kind!r} is not supported",
                          param="messages")
    return "".join(text), tools


def parse_messages(body: dict, frontend: Frontend) -> Generation:
    _check_fields(body, _MESSAGES)
    if body.get("max_tokens") is None:
        raise invalid("'max_tokens' is required", param="max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", param="messages")
    msgs: list[dict] = []
    system = body.get("system")
    if isinstance(system, list):
        # Claude Code puts a per-request hash in a billing block: drop it, or no two
        # requests would ever share the system prompt's blocks.
        kept = [b for b in system if not (isinstance(b, dict) and isinstance(b.get("text"), str)
                                          and b["text"].startswith(ANTHROPIC_BILLING_PREFIX))]
        system, _ = _anthropic_blocks(kept, "system")
    elif system is not None and not isinstance(system, str):
        raise invalid("'system' must be a string or a list of text blocks", param="system")
    if system:
        msgs.append({"role": "system", "content": system})
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise invalid(f"messages[{i}]: 'role' must be 'user' or 'assistant'",
                          param="messages")
        text, tool_msgs = _anthropic_blocks(m.get("content"), f"messages[{i}]")
        msgs.extend(tool_msgs)
        if text or not tool_msgs:
            msgs.append({"role": m["role"], "content": text})
    if body.get("thinking") not in (None, {"type": "disabled"}):
        raise invalid("'thinking' is not supported by this server", param="thinking")
    tools = body.get("tools")
    sampling = sampling_params(
        {"max_tokens": body.get("max_tokens"), "temperature": body.get("temperature"),
         "top_p": body.get("top_p"), "top_k": body.get("top_k"),
         "stop": body.get("stop_sequences")}, 0)
    stream = _bool(body, "stream")
    rendered = _render(frontend, msgs, tools, None)
    return Generation(rendered.tokens, sampling, rendered.checkpoints, stream, False)


def tokenize_body(body: dict, frontend: Frontend) -> list[int]:
    """The token ids of a ``/tokenize`` body: ``prompt`` text, or chat ``messages``."""
    if "messages" in body:
        msgs = _chat_messages(body.get("messages"))
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise invalid("'chat_template_kwargs' must be an object",
                          param="chat_template_kwargs")
        rendered = _render(frontend, msgs, body.get("tools"), kwargs)
        return rendered.tokens
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise invalid("give 'prompt' (a string) or 'messages'", param="prompt")
    return frontend.encode(prompt, add_special_tokens=bool(body.get("add_special_tokens",
                                                                    True)))


def check_model(body: dict, frontend: Frontend) -> None:
    model = body.get("model")
    if model is None:
        return  # optional here; the served model is used
    if not isinstance(model, str):
        raise invalid("'model' must be a string", param="model")
    if model not in frontend.model_names:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                            f"'{frontend.model_id}'", param="model", code="model_not_found")
