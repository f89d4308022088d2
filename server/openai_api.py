"""OpenAI's API (and vLLM's extras): chat and text completions, streamed or not, with
reasoning, tool calls and logprobs; ``/tokenize`` and ``/detokenize``."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from aiohttp import web

from blockserve.engine.text.frontend import TokenizerFrontend
from blockserve.engine.text.structured import ChoiceFormat, JsonFormat, RegexFormat
from blockserve.scheduler import Usage
from blockserve.server import keepalive
from blockserve.server.runtime import (
    BOUNDS,
    FRONTEND,
    SCHEDULER,
    Reply,
    Run,
    check_model,
    merged_steps,
    read_json,
    send,
    send_comment,
    sse,
    start_runs,
)
from blockserve.server.errors import ApiError, invalid
from blockserve.server.fields import (
    SAMPLING_FIELDS,
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
    one_format,
    refuse,
    render,
    sampling_params,
    schema_object,
    template_kwargs,
    token_ids,
    tool_choice,
)
from blockserve.server.limits import offload

# Known fields that change nothing in the output (client bookkeeping, hints).
_INERT = {"model", "user", "store", "metadata", "service_tier", "prompt_cache_key", "verbosity", "safety_identifier", "prediction", "modalities",
          "stream_reasoning", "separate_reasoning", "no_stop_trim", "return_hidden_states",
          "request_id", "priority", "add_special_tokens", "documents"}
_CHAT = {"messages", "stream", "stream_options", "n", "tools", "tool_choice", "logprobs",
         "top_logprobs", "response_format", "chat_template_kwargs", "reasoning_effort",
         "parallel_tool_calls", "structured_outputs", "guided_json", "guided_regex",
         "guided_choice", "include_reasoning", "continue_final_message", "add_generation_prompt",
         "functions", "function_call"} | SAMPLING_FIELDS | _INERT
_COMPLETION = {"prompt", "stream", "stream_options", "n", "best_of", "echo", "suffix",
               "logprobs", "response_format", "structured_outputs", "guided_json",
               "guided_regex", "guided_choice"} | SAMPLING_FIELDS | _INERT
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
_MEDIA_PARTS = {"image_url": "image", "input_image": "image", "input_audio": "audio",
                "file": "file", "input_file": "file", "video_url": "video"}


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
    """OpenAI's ``response_format``: text, json_object or json_schema (always enforced,
    ``strict`` or not: a schema that can't be enforced is a 400, never a hope)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return FormatRequest(JsonFormat(), "response_format")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid("'response_format.json_schema' must be an object",
                          param="response_format")
        schema = spec.get("schema")
        return FormatRequest(JsonFormat(None if schema is None else
                                        schema_object(schema, "response_format")),
                             "response_format")
    raise invalid("'response_format.type' must be text, json_object or json_schema",
                  param="response_format")


def _guided(body: dict) -> FormatRequest | None:
    """vLLM's structured outputs: ``structured_outputs`` {json, regex, choice,
    json_object}, or the older ``guided_json``/``guided_regex``/``guided_choice``."""
    so = body.get("structured_outputs")
    if so is not None and not isinstance(so, dict):
        raise invalid("'structured_outputs' must be an object", param="structured_outputs")
    given = [(k, body[f"guided_{k}"], f"guided_{k}") for k in ("json", "regex", "choice")
             if body.get(f"guided_{k}") is not None]
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
    opts = body.get("stream_options")
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
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"{where}: each tool call needs function.name", param="messages")
        args = fn.get("arguments")
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
        role = m.get("role")
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
    choice = body.get("tool_choice", body.get("function_call"))
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
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    if effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
        raise invalid("'reasoning_effort' must be one of none, minimal, low, medium, high, "
                      "xhigh", param="reasoning_effort")
    return effort not in ("none", "minimal")


def parse_chat(body: dict, frontend: TokenizerFrontend, bounds: Bounds) -> Generation:
    ignore_unknown(body, _CHAT, "chat completion")
    _refusals(body)
    msgs = chat_messages(body.get("messages"), bounds)
    tools = check_tools(body.get("tools"), bounds.limits)
    if tools is None and body.get("functions"):  # the legacy shape
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
    gen = Generation(rendered.tokens, sampling, rendered.checkpoints, stream, include_usage,
                     cache_salt(body), tools, choice.parse, rendered.reasoning_open,
                     boolean(body, "include_reasoning", True), n=_n(body),
                     thinking=kwargs.get("enable_thinking") is True)
    return constrain(frontend, gen, fmt, bounds.limits)


def parse_completion(body: dict, frontend: TokenizerFrontend, bounds: Bounds) -> Generation:
    ignore_unknown(body, _COMPLETION, "completion")
    _refusals(body)
    refuse(body, "echo", lambda v: v is False, "is not supported")
    refuse(body, "suffix", lambda v: v == "", "is not supported")
    prompt = body.get("prompt")
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
    gen = Generation(tokens, sampling_params(body, bounds, top is not None, top or 0),
                     [], stream, include_usage, cache_salt(body), structured=False,
                     n=_n(body))
    return constrain(frontend, gen, fmt, bounds.limits)


# ---- responses -----------------------------------------------------------------------


def _finish(reason: str | None, run: Run) -> str | None:
    return "tool_calls" if reason == "stop" and run.called_tools else reason


def _tool_call(d: Any, index: int | None = None) -> dict:
    call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": d.name, "arguments": d.arguments}}
    return call if index is None else {"index": index, **call}


def _chat_logprobs(frontend: TokenizerFrontend, entries: list[tuple[int, float, Any]]) -> dict:
    def one(tok: int, lp: float) -> dict:
        s = frontend.decode([tok])
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, b) for a, b in top or ()]}
                        for t, lp, top in entries]}


def _completion_logprobs(frontend: TokenizerFrontend, entries: list[tuple[int, float, Any]],
                         offset: int = 0) -> dict:
    tokens = [frontend.decode([t]) for t, _, _ in entries]
    offsets, pos = [], offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{frontend.decode([a]): b for a, b in top or ()}
                             for _, _, top in entries],
            "text_offset": offsets}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_chat, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_completion, chat=False)


async def _serve(request: web.Request, parse, chat: bool) -> web.StreamResponse:
    body = await read_json(request)
    frontend = request.app[FRONTEND]
    check_model(body, frontend)
    gen = await offload(request, parse, body, frontend, request.app[BOUNDS])
    runs = start_runs(request, gen)
    base = {"id": ("chatcmpl-" if chat else "cmpl-") + runs[0].id,
            "created": runs[0].created, "model": body.get("model") or frontend.model_id}
    if not gen.stream:
        replies = await asyncio.gather(*(run.collect() for run in runs))
        return web.json_response({
            **base, "object": "chat.completion" if chat else "text_completion",
            "choices": [_choice(frontend, gen, run, reply, chat)
                        for run, reply in zip(runs, replies)],
            "usage": _usage(*(reply.last.usage for reply in replies))})
    return await _stream(request, frontend, gen, runs, base, chat)


def _usage(*usages: Usage) -> dict:
    """Usage of one or several choices of one prompt: the prompt counts once."""
    first = usages[0]
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
            "total_tokens": first.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}


def _choice(frontend: TokenizerFrontend, gen: Generation, run: Run, reply: Reply, chat: bool) -> dict:
    finish = _finish(reply.last.finish_reason, run)
    lp = None
    if chat:
        calls = [_tool_call(d) for d in reply.deltas if d.kind == "tool_call"]
        content = reply.text()
        message = {"role": "assistant", "content": content if content or not calls else None}
        if reply.text("reasoning"):
            message["reasoning_content"] = reply.text("reasoning")
        if calls:
            message["tool_calls"] = calls
        if gen.sampling.logprobs:
            lp = _chat_logprobs(frontend, reply.logprobs)
        return {"index": run.index, "message": message, "logprobs": lp,
                "finish_reason": finish}
    if gen.sampling.logprobs:
        lp = _completion_logprobs(frontend, reply.logprobs)
    return {"index": run.index, "text": reply.text(), "logprobs": lp, "finish_reason": finish}


async def _stream(request: web.Request, frontend: TokenizerFrontend, gen: Generation, runs: list[Run],
                  base: dict, chat: bool) -> web.StreamResponse:
    resp = await sse(request)
    chunk = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}
    usage_field = {"usage": None} if gen.include_usage else {}
    calls = [0] * len(runs)  # tool calls so far, per choice
    text_offset = [0] * len(runs)
    usages: list[Usage | None] = [None] * len(runs)

    async def emit(index: int, choice: dict) -> None:
        await send(resp, {**chunk, "choices": [{"index": index, "logprobs": None,
                                                "finish_reason": None, **choice}],
                          **usage_field})

    if chat:
        for run in runs:
            await emit(run.index, {"delta": {"role": "assistant", "content": ""}})
    async for item in keepalive.with_idle_ticks(merged_steps(runs), keepalive.INTERVAL_S):
        if item is None:  # a long prefill: a comment keeps clients and proxies waiting
            await send_comment(resp, "keepalive")
            continue
        run, step = item
        i, out = run.index, step.out
        if out.finish_reason == "error":
            await send(resp, ApiError(500, out.error or "generation failed").openai_body())
            break
        lp = None
        if gen.sampling.logprobs and out.logprobs:
            entries = [(t, *x) for t, x in zip(out.token_ids, out.logprobs)]
            lp = (_chat_logprobs(frontend, entries) if chat
                  else _completion_logprobs(frontend, entries, text_offset[i]))
        pieces: list[dict] = []
        for d in step.deltas:
            if not chat:
                pieces.append({"text": d.text})
            elif d.kind == "content":
                pieces.append({"delta": {"content": d.text}})
            elif d.kind == "reasoning":
                pieces.append({"delta": {"reasoning_content": d.text}})
            else:  # a whole tool call: id and name first, then the arguments
                call = _tool_call(d, calls[i])
                args = call["function"].pop("arguments")
                call["function"]["arguments"] = ""
                pieces.append({"delta": {"tool_calls": [call]}})
                pieces.append({"delta": {"tool_calls": [
                    {"index": calls[i], "function": {"arguments": args}}]}})
                calls[i] += 1
        if lp is not None:
            if not pieces:
                pieces.append({"delta": {}} if chat else {"text": ""})
            pieces[0]["logprobs"] = lp
        if out.finish_reason is not None:
            finish = {"finish_reason": _finish(out.finish_reason, run)}
            pieces.append({"delta": {}, **finish} if chat else {"text": "", **finish})
            usages[i] = out.usage
        for p in pieces:
            text_offset[i] += len(p.get("text", ""))
            await emit(i, p)
    if gen.include_usage and all(usages):
        await send(resp, {**chunk, "choices": [], "usage": _usage(*usages)})
    await send(resp, "[DONE]")
    await resp.write_eof()
    return resp


# ---- /tokenize and /detokenize (vLLM's shapes) -----------------------------------------


def tokenize_body(body: dict, frontend: TokenizerFrontend, bounds: Bounds) -> list[int]:
    """The token ids of a ``/tokenize`` body: ``prompt`` text, or chat ``messages``."""
    if "messages" in body:
        rendered = render(frontend, chat_messages(body["messages"], bounds),
                          check_tools(body.get("tools"), bounds.limits),
                          template_kwargs(body, None, bounds.limits))
        return rendered.tokens
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise invalid("give 'prompt' (a string) or 'messages'", param="prompt")
    return frontend.encode(prompt, add_special_tokens=boolean(body, "add_special_tokens",
                                                              True))


async def tokenize(request: web.Request) -> web.Response:
    body = await read_json(request)
    frontend = request.app[FRONTEND]
    check_model(body, frontend)
    tokens = await offload(request, tokenize_body, body, frontend, request.app[BOUNDS])
    return web.json_response({"count": len(tokens), "tokens": tokens, "token_strs": None,
                              "max_model_len": request.app[SCHEDULER].max_prompt_tokens})


async def detokenize(request: web.Request) -> web.Response:
    body = await read_json(request)
    frontend = request.app[FRONTEND]
    check_model(body, frontend)
    tokens = token_ids(body.get("tokens"), frontend.vocab_size, "tokens")
    return web.json_response({"prompt": await offload(request, frontend.decode, tokens)})


async def render_chat(request: web.Request) -> web.Response:
    """vLLM's ``/v1/chat/completions/render``: the prompt's token ids, rendered exactly as
    the same request would be served, without generating (routers route on them)."""
    return await _render(request, parse_chat)


async def render_completion(request: web.Request) -> web.Response:
    """vLLM's ``/v1/completions/render``."""
    return await _render(request, parse_completion)


async def _render(request: web.Request, parse) -> web.Response:
    body = await read_json(request)
    frontend = request.app[FRONTEND]
    check_model(body, frontend)
    gen = await offload(request, parse, body, frontend, request.app[BOUNDS])
    return web.json_response({"model": body.get("model") or frontend.model_id,
                              "token_ids": gen.prompt, "features": None})
