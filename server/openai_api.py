"""OpenAI's API (and vLLM's extras): chat and text completions, streamed or not, with
reasoning, tool calls and logprobs, each a reply encoder; ``/tokenize``, ``/detokenize``
and the render endpoints. Requests are read by ``openai_input``."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from blockserve.engine.text.frontend import TokenizerFrontend
from blockserve.scheduler import Usage
from blockserve.server.errors import ApiError, invalid
from blockserve.server.fields import (
    Bounds,
    Generation,
    boolean,
    check_tools,
    render,
    take,
    template_kwargs,
    token_ids,
)
from blockserve.server.limits import offload
from blockserve.server.openai_input import (
    MESSAGES,
    TOOLS,
    chat_messages,
    parse_chat,
    parse_completion,
)
from blockserve.server.runtime import (
    BOUNDS,
    FRONTEND,
    SCHEDULER,
    Encoder,
    Event,
    Reply,
    Run,
    Step,
    check_model,
    read_json,
    respond,
    start_runs,
)


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


def _usage(*usages: Usage) -> dict:
    """Usage of one or several choices of one prompt: the prompt counts once."""
    first = usages[0]
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
            "total_tokens": first.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}


class _Choices(Encoder):
    """What chat and text completions share: choices (``n``), each streamed as chunks
    with a finish reason, usage once for the prompt, ``[DONE]`` at the end, and an error
    body if generation fails."""

    prefix = ""  # of the reply's id
    obj = ""  # the collected reply's ``object``
    chunk_obj = ""  # a chunk's ``object``

    def __init__(self, frontend: TokenizerFrontend, gen: Generation, runs: list[Run],
                 model: str):
        self.frontend = frontend
        self.gen = gen
        self.runs = runs
        self.base = {"id": self.prefix + runs[0].id, "created": runs[0].created,
                     "model": model}
        self.replies = {run.index: Reply() for run in runs}
        self.usages: dict[int, Usage] = {}

    def _chunk(self, index: int, choice: dict) -> Event:
        chunk = {**self.base, "object": self.chunk_obj,
                 "choices": [{"index": index, "logprobs": None, "finish_reason": None,
                              **choice}]}
        if self.gen.include_usage:
            chunk["usage"] = None
        return None, chunk

    def step(self, run: Run, step: Step) -> list[Event]:
        out = step.out
        if out.finish_reason == "error":
            self.ended = True
            return [(None, ApiError(500, out.error or "generation failed").openai_body())]
        reply = self.replies[run.index]
        offset = len(reply.text())
        reply.add(step)
        pieces = self._pieces(run, step.deltas)
        if self.gen.sampling.logprobs and out.logprobs:
            entries = [(t, *x) for t, x in zip(out.token_ids, out.logprobs)]
            if not pieces:
                pieces.append(self._empty())
            pieces[0]["logprobs"] = self._logprobs(entries, offset)
        if out.finish_reason is not None:
            pieces.append({**self._empty(), "finish_reason": _finish(out.finish_reason, run)})
            self.usages[run.index] = out.usage
        return [self._chunk(run.index, p) for p in pieces]

    def finish(self) -> list[Event]:
        events = []
        if self.gen.include_usage and not self.ended and len(self.usages) == len(self.runs):
            events.append((None, {**self.base, "object": self.chunk_obj, "choices": [],
                                  "usage": _usage(*self.usages.values())}))
        return events + [(None, "[DONE]")]

    def body(self) -> dict:
        return {**self.base, "object": self.obj,
                "choices": [self._choice(run, self.replies[run.index]) for run in self.runs],
                "usage": _usage(*(self.replies[r.index].last.usage for r in self.runs))}

    def _empty(self) -> dict:
        raise NotImplementedError

    def _pieces(self, run: Run, deltas: list[Any]) -> list[dict]:
        raise NotImplementedError

    def _logprobs(self, entries: list[tuple[int, float, Any]], offset: int) -> dict:
        raise NotImplementedError

    def _choice(self, run: Run, reply: Reply) -> dict:
        raise NotImplementedError


class ChatEncoder(_Choices):
    """Chat completions: messages with content, ``reasoning_content`` and
    ``tool_calls`` (streamed as id and name first, then the arguments)."""

    prefix, obj, chunk_obj = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = {run.index: 0 for run in self.runs}  # tool calls so far, per choice

    def start(self) -> list[Event]:
        return [self._chunk(run.index, {"delta": {"role": "assistant", "content": ""}})
                for run in self.runs]

    def _empty(self) -> dict:
        return {"delta": {}}

    def _pieces(self, run: Run, deltas: list[Any]) -> list[dict]:
        pieces = []
        for d in deltas:
            if d.kind == "content":
                pieces.append({"delta": {"content": d.text}})
            elif d.kind == "reasoning":
                pieces.append({"delta": {"reasoning_content": d.text}})
            else:  # a whole tool call: id and name first, then the arguments
                index = self.calls[run.index]
                call = _tool_call(d, index)
                args = call["function"].pop("arguments")
                call["function"]["arguments"] = ""
                pieces.append({"delta": {"tool_calls": [call]}})
                pieces.append({"delta": {"tool_calls": [
                    {"index": index, "function": {"arguments": args}}]}})
                self.calls[run.index] += 1
        return pieces

    def _logprobs(self, entries: list[tuple[int, float, Any]], offset: int) -> dict:
        return _chat_logprobs(self.frontend, entries)

    def _choice(self, run: Run, reply: Reply) -> dict:
        calls = [_tool_call(d) for d in reply.deltas if d.kind == "tool_call"]
        content = reply.text()
        message = {"role": "assistant", "content": content if content or not calls else None}
        if reply.text("reasoning"):
            message["reasoning_content"] = reply.text("reasoning")
        if calls:
            message["tool_calls"] = calls
        lp = _chat_logprobs(self.frontend, reply.logprobs) if self.gen.sampling.logprobs \
            else None
        return {"index": run.index, "message": message, "logprobs": lp,
                "finish_reason": _finish(reply.last.finish_reason, run)}


class CompletionEncoder(_Choices):
    """Text completions: choices of text, logprobs with text offsets."""

    prefix, obj, chunk_obj = "cmpl-", "text_completion", "text_completion"

    def _empty(self) -> dict:
        return {"text": ""}

    def _pieces(self, run: Run, deltas: list[Any]) -> list[dict]:
        return [{"text": d.text} for d in deltas]

    def _logprobs(self, entries: list[tuple[int, float, Any]], offset: int) -> dict:
        return _completion_logprobs(self.frontend, entries, offset)

    def _choice(self, run: Run, reply: Reply) -> dict:
        lp = _completion_logprobs(self.frontend, reply.logprobs) \
            if self.gen.sampling.logprobs else None
        return {"index": run.index, "text": reply.text(), "logprobs": lp,
                "finish_reason": _finish(reply.last.finish_reason, run)}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_chat, ChatEncoder)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_completion, CompletionEncoder)


async def _serve(request: web.Request, parse, encoder: type[_Choices]) -> web.StreamResponse:
    body = await read_json(request)
    frontend = request.app[FRONTEND]
    check_model(body, frontend)
    gen = await offload(request, parse, body, frontend, request.app[BOUNDS])
    runs = start_runs(request, gen)
    model = body.get("model") or frontend.model_id
    return await respond(request, runs, encoder(frontend, gen, runs, model), gen.stream)


# ---- /tokenize and /detokenize (vLLM's shapes) -----------------------------------------


def tokenize_body(body: dict, frontend: TokenizerFrontend, bounds: Bounds) -> list[int]:
    """The token ids of a ``/tokenize`` body: ``prompt`` text, or chat ``messages``."""
    if "messages" in body:
        rendered = render(frontend, chat_messages(take(body, "messages", MESSAGES), bounds),
                          check_tools(take(body, "tools", TOOLS), bounds.limits),
                          template_kwargs(body, None, bounds.limits))
        return rendered.tokens
    prompt = take(body, "prompt", {"type": "string"})
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
    tokens = detokenize_body(body, frontend, request.app[BOUNDS])
    return web.json_response({"prompt": await offload(request, frontend.decode, tokens)})


def detokenize_body(body: dict, frontend: TokenizerFrontend, bounds: Bounds) -> list[int]:
    """The token ids of a ``/detokenize`` body."""
    return token_ids(take(body, "tokens", {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": frontend.vocab_size - 1}},
        required=True), frontend.vocab_size, "tokens")


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
