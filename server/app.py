"""The aiohttp application: OpenAI and Anthropic endpoints, SSE, health, metrics,
cache administration. Thin: every bit of state lives in the scheduler."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import AsyncIterator, Callable

from aiohttp import web

from blockserve.scheduler import Request, RequestOutput, Scheduler, SchedulerError, Usage
from blockserve.server.errors import ApiError, from_scheduler, invalid
from blockserve.server.metrics import Metrics
from blockserve.server.schemas import (
    Frontend,
    Generation,
    check_model,
    parse_chat,
    parse_completion,
    parse_messages,
    tokenize_body,
)

log = logging.getLogger("blockserve.server")

@dataclass
class ServerConfig:
    default_max_tokens: int = 512
    api_key: str | None = None


SCHEDULER = web.AppKey("scheduler", Scheduler)
FRONTEND = web.AppKey("frontend", Frontend)
CONFIG = web.AppKey("config", ServerConfig)
METRICS = web.AppKey("metrics", Metrics)

_OPEN_PATHS = {"/health", "/metrics"}


def create_app(scheduler: Scheduler, frontend: Frontend, config: ServerConfig) -> web.Application:
    app = web.Application(middlewares=[_errors, _auth], client_max_size=64 << 20)
    app[SCHEDULER] = scheduler
    app[FRONTEND] = frontend
    app[CONFIG] = config
    app[METRICS] = Metrics(scheduler)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, server_info)
    for path in ("/model_info", "/get_model_info"):
        app.router.add_get(path, model_info)
    app.router.add_get("/get_load", get_load)
    app.router.add_get("/v1/cache/stats", cache_stats)
    app.router.add_post("/v1/cache/reset", cache_reset)
    app.router.add_post("/reset_prefix_cache", cache_reset)  # vLLM's name for the same

    async def start(app: web.Application) -> None:
        app[SCHEDULER].start()

    async def stop(app: web.Application) -> None:
        app[SCHEDULER].shutdown()  # in-flight streams end with finish_reason "abort"

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return app


def _is_anthropic(request: web.Request) -> bool:
    return request.path.startswith("/v1/messages")


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        return e.response(_is_anthropic(request))
    except SchedulerError as e:
        return from_scheduler(e).response(_is_anthropic(request))
    except web.HTTPException as e:
        if e.status >= 400:
            return ApiError(e.status, e.reason).response(_is_anthropic(request))
        raise
    except Exception as e:
        log.exception("unhandled error in %s", request.path)
        return ApiError(500, f"internal error: {e}").response(_is_anthropic(request))


@web.middleware
async def _auth(request: web.Request, handler):
    key = request.app[CONFIG].api_key
    if key and request.path not in _OPEN_PATHS:
        bearer = request.headers.get("Authorization", "")
        given = bearer[7:] if bearer.startswith("Bearer ") else request.headers.get("x-api-key")
        if given != key:
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY "
                                "or x-api-key: KEY)", code="invalid_api_key")
    return await handler(request)


async def _json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"the body is not valid JSON: {e}")
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


# ---- running a generation ------------------------------------------------------


class _Run:
    """One request in flight: submits it, times it, and aborts it if the client goes."""

    def __init__(self, request: web.Request, gen: Generation):
        self.app = request.app
        self.t0 = time.perf_counter()
        self.first: float | None = None
        req = Request(gen.prompt, gen.sampling, gen.checkpoints, gen.cache_salt)
        self.stream = self.app[SCHEDULER].submit(req)  # SchedulerError -> HTTP error
        self.id = self.stream.request_id
        self.created = int(time.time())

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self.stream:
                if self.first is None and (out.text or out.token_ids):
                    self.first = time.perf_counter() - self.t0
                    self.app[METRICS].ttft.observe(self.first)
                if out.finish_reason is not None:
                    self.app[METRICS].e2e.observe(time.perf_counter() - self.t0)
                yield out
        finally:
            self.stream.cancel()  # no-op once finished; frees everything on disconnect

    async def collect(self) -> tuple[str, RequestOutput]:
        text, last = [], None
        async for out in self.outputs():
            text.append(out.text)
            last = out
        if last.finish_reason == "error":
            raise ApiError(500, last.error or "generation failed")
        if last.finish_reason == "abort":
            raise ApiError(503, "the request was aborted: the server is shutting down")
        return "".join(text), last


def _openai_usage(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


async def _sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


async def _send(resp: web.StreamResponse, data: dict | str, event: str | None = None) -> None:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    await resp.write(f"{head}data: {payload}\n\n".encode())


# ---- OpenAI ------------------------------------------------------------------------


async def _openai(request: web.Request, parse: Callable, kind: str) -> web.StreamResponse:
    body = await _json(request)
    frontend = request.app[FRONTEND]
    check_model(body, frontend)
    gen = parse(body, frontend, request.app[CONFIG].default_max_tokens)
    run = _Run(request, gen)
    chat = kind == "chat"
    rid = ("chatcmpl-" if chat else "cmpl-") + run.id
    obj = "chat.completion" if chat else "text_completion"
    base = {"id": rid, "created": run.created, "model": frontend.model_id}
    if not gen.stream:
        text, last = await run.collect()
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "logprobs": None, "finish_reason": last.finish_reason} if chat else
                  {"index": 0, "text": text, "logprobs": None,
                   "finish_reason": last.finish_reason})
        return web.json_response({**base, "object": obj, "choices": [choice],
                                  "usage": _openai_usage(last.usage)})

    resp = await _sse(request)
    chunk = {**base, "object": "chat.completion.chunk" if chat else obj}
    usage_field = {"usage": None} if gen.include_usage else {}

    def piece(text: str | None, finish: str | None, first: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else \
                ({"content": text} if text else {})
            c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**chunk, "choices": [c], **usage_field}

    if chat:
        await _send(resp, piece(None, None, first=True))
    async for out in run.outputs():
        if out.finish_reason == "error":
            await _send(resp, ApiError(500, out.error or "generation failed").openai_body())
            break
        if out.text or out.finish_reason:
            await _send(resp, piece(out.text, out.finish_reason))
        if out.finish_reason and gen.include_usage:
            await _send(resp, {**chunk, "choices": [], "usage": _openai_usage(out.usage)})
    await _send(resp, "[DONE]")
    await resp.write_eof()
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, parse_chat, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, parse_completion, "completion")


# ---- Anthropic ---------------------------------------------------------------------

_STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}


def _stop_reason(out: RequestOutput) -> str:
    return "stop_sequence" if out.stop_string else _STOP_REASONS.get(out.finish_reason,
                                                                     "end_turn")


def _anthropic_usage(u: Usage) -> dict:
    return {"input_tokens": u.prompt_tokens - u.cached_tokens,
            "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens,
            "cache_creation_input_tokens": 0}


async def messages(request: web.Request) -> web.StreamResponse:
    body = await _json(request)
    frontend = request.app[FRONTEND]
    check_model(body, frontend)
    gen = parse_messages(body, frontend)
    run = _Run(request, gen)
    message = {"id": "msg_" + run.id, "type": "message", "role": "assistant",
               "model": frontend.model_id}
    if not gen.stream:
        text, last = await run.collect()
        return web.json_response({**message, "content": [{"type": "text", "text": text}],
                                  "stop_reason": _stop_reason(last),
                                  "stop_sequence": last.stop_string,
                                  "usage": _anthropic_usage(last.usage)})
    resp = await _sse(request)
    started = False
    async for out in run.outputs():
        if not started:
            usage = _anthropic_usage(out.usage) if out.usage else _anthropic_usage(
                Usage(len(gen.prompt)))
            await _send(resp, {"type": "message_start", "message": {
                **message, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {**usage, "output_tokens": 0}}}, "message_start")
            await _send(resp, {"type": "content_block_start", "index": 0,
                               "content_block": {"type": "text", "text": ""}},
                        "content_block_start")
            started = True
        if out.finish_reason == "error":
            await _send(resp, ApiError(500, out.error or "generation failed")
                        .anthropic_body(), "error")
            break
        if out.text:
            await _send(resp, {"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": out.text}},
                        "content_block_delta")
        if out.finish_reason:
            await _send(resp, {"type": "content_block_stop", "index": 0},
                        "content_block_stop")
            await _send(resp, {"type": "message_delta",
                               "delta": {"stop_reason": _stop_reason(out),
                                         "stop_sequence": out.stop_string},
                               "usage": {"output_tokens": out.usage.completion_tokens}},
                        "message_delta")
            await _send(resp, {"type": "message_stop"}, "message_stop")
    await resp.write_eof()
    return resp


# ---- tokenizer and server facts (vLLM's and SGLang's shapes, for routers and tools) -----


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's ``/tokenize``: a text prompt, or chat messages rendered by the template."""
    body = await _json(request)
    frontend = request.app[FRONTEND]
    check_model(body, frontend)
    tokens = tokenize_body(body, frontend)
    return web.json_response({"count": len(tokens), "tokens": tokens, "token_strs": None,
                              "max_model_len": request.app[SCHEDULER].max_prompt_tokens})


async def detokenize(request: web.Request) -> web.Response:
    body = await _json(request)
    frontend = request.app[FRONTEND]
    check_model(body, frontend)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise invalid("'tokens' must be a list of token ids", param="tokens")
    return web.json_response({"prompt": frontend.decode(tokens)})


async def server_info(request: web.Request) -> web.Response:
    f, sched = request.app[FRONTEND], request.app[SCHEDULER]
    return web.json_response({
        "model_path": f.model_path, "served_model_names": f.model_names,
        "tokenizer_path": f.model_path, "max_model_len": sched.max_prompt_tokens,
        "block_size": sched.pool.block_size, "max_num_seqs": sched.config.max_running,
        "version": "blockserve"})


async def model_info(request: web.Request) -> web.Response:
    f = request.app[FRONTEND]
    return web.json_response({"model_path": f.model_path, "tokenizer_path": f.model_path,
                              "is_generation": True, "served_model_names": f.model_names})


async def get_load(request: web.Request) -> web.Response:
    sched = request.app[SCHEDULER]
    return web.json_response({"num_running_reqs": sched.num_running,
                              "num_waiting_reqs": sched.num_waiting,
                              "load": sched.num_running + sched.num_waiting})


# ---- models, health, metrics, cache ------------------------------------------------


async def models(request: web.Request) -> web.Response:
    f = request.app[FRONTEND]
    return web.json_response({"object": "list", "data": [{
        "id": f.model_id, "object": "model", "created": 0, "owned_by": "blockserve",
        "max_model_len": request.app[SCHEDULER].max_prompt_tokens}]})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def cache_stats(request: web.Request) -> web.Response:
    sched = request.app[SCHEDULER]
    pool = sched.pool.stats()
    s = sched.stats
    return web.json_response({
        "pool": {**asdict(pool), "evictions": {str(k): v for k, v in pool.evictions.items()},
                 "blocks_stored": pool.blocks_stored, "bytes_stored": pool.bytes_stored,
                 "hit_rate": pool.hit_rate},
        "scheduler": {"running": sched.num_running, "waiting": sched.num_waiting,
                      "submitted": s.submitted, "prompt_tokens": s.prompt_tokens,
                      "cached_tokens": s.cached_tokens, "prefill_tokens": s.prefill_tokens,
                      "inflight_shares": s.inflight_shares, "finished": dict(s.finished)},
    })


async def cache_reset(request: web.Request) -> web.Response:
    if not request.app[SCHEDULER].reset_cache():
        pinned = request.app[SCHEDULER].pool.stats().blocks_pinned
        raise ApiError(409, f"the cache was not flushed: {pinned} blocks are in use by "
                            "running requests; retry when they finish", code="cache_in_use")
    return web.json_response({"reset": True})
