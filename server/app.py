"""The aiohttp application: routes, middlewares, and what both APIs share (a request in
flight, SSE). Thin: every bit of state lives in the scheduler. The OpenAI and Anthropic
endpoints are in ``openai_api`` and ``anthropic_api``; tokenizer, server facts, health,
metrics and cache administration are here."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from blockserve.kvpool import Namespace
from blockserve.scheduler import Request, RequestOutput, Scheduler, SchedulerError
from blockserve.server.errors import ApiError, from_scheduler, invalid
from blockserve.server.fields import Bounds, Frontend, Generation
from blockserve.server.limits import WORKERS, Limits, decode_json, offload, read_body
from blockserve.server.metrics import Metrics

log = logging.getLogger("blockserve.server")


@dataclass
class ServerConfig:
    default_max_tokens: int = 512
    # Each key is a tenant: its requests' prefix cache is salted by it, so tenants never
    # share (or time) each other's blocks. No keys: an open server, one tenant.
    api_keys: list[str] = field(default_factory=list)
    # The admin key flushes and sees the whole cache; a tenant key only its own. With
    # tenant keys and no admin key, nobody can flush another's cache.
    admin_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    # A stream whose client reads nothing for this long is aborted and its blocks freed.
    stalled_stream_timeout: float = 60.0
    parse_workers: int = 4  # threads for templates, tokenizing and grammar compiles


def tenant_of(key: str) -> str:
    """A tenant's name in cache salts: a digest, so the key itself is kept nowhere."""
    return hashlib.sha256(b"blockserve-tenant\0" + key.encode()).hexdigest()[:32]


def cache_salt(tenant: str | None, salt: str | None) -> str | None:
    """The tenant's salt, with a request's own ``cache_salt`` nested inside it."""
    if tenant is None:
        return salt
    return f"tenant:{tenant}" if salt is None else f"tenant:{tenant}\0salt:{salt}"


SCHEDULER = web.AppKey("scheduler", Scheduler)
FRONTEND = web.AppKey("frontend", Frontend)
CONFIG = web.AppKey("config", ServerConfig)
METRICS = web.AppKey("metrics", Metrics)
BOUNDS = web.AppKey("bounds", Bounds)

_OPEN_PATHS = {"/health", "/metrics"}


def create_app(scheduler: Scheduler, frontend: Frontend, config: ServerConfig) -> web.Application:
    from blockserve.server import anthropic_api, openai_api, responses_api

    app = web.Application(middlewares=[_errors, _auth],
                          client_max_size=config.limits.max_body_bytes)
    app[SCHEDULER] = scheduler
    app[FRONTEND] = frontend
    app[CONFIG] = config
    app[METRICS] = Metrics(scheduler)
    app[BOUNDS] = Bounds(frontend.vocab_size, config.limits, config.default_max_tokens)
    app[WORKERS] = ThreadPoolExecutor(config.parse_workers,
                                      thread_name_prefix="blockserve-parse")
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_post("/v1/completions", openai_api.completions)
    app.router.add_post("/v1/chat/completions/render", openai_api.render_chat)
    app.router.add_post("/v1/completions/render", openai_api.render_completion)
    app.router.add_post("/v1/messages", anthropic_api.messages)
    app.router.add_post("/v1/messages/count_tokens", anthropic_api.count_tokens)
    responses_api.install(app)  # /v1/responses, and its store of recent responses
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/tokenize", openai_api.tokenize)
    app.router.add_post("/detokenize", openai_api.detokenize)
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

    async def cleanup(app: web.Application) -> None:
        app[WORKERS].shutdown(wait=False, cancel_futures=True)

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    app.on_cleanup.append(cleanup)
    return app


def _is_anthropic(request: web.Request) -> bool:
    return request.path.startswith("/v1/messages")


class ClientStalled(Exception):
    """A streaming client read nothing for ``stalled_stream_timeout``."""

    def __init__(self) -> None:
        super().__init__("the client stopped reading its stream")


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except (ClientStalled, ConnectionResetError) as e:  # the client is gone or stuck
        log.warning("%s %s: %s; the request is aborted", request.method, request.path,
                    e if isinstance(e, ClientStalled) else "the client went away")
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # as for a disconnect: nothing more to send
    except SchedulerError as e:
        err = from_scheduler(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        err = ApiError(e.status, e.reason)
    except ApiError as e:
        err = e
    except Exception as e:
        log.exception("unhandled error in %s", request.path)
        err = ApiError(500, f"internal error: {e}")
    if err.status < 500:
        log.warning("%s %s -> %d: %s", request.method, request.path, err.status, err.message)
    return err.response(_is_anthropic(request))


TENANT = web.RequestKey("tenant", str)  # the request's tenant, set by _auth
ADMIN = web.RequestKey("admin", bool)  # the request holds the admin key


@web.middleware
async def _auth(request: web.Request, handler):
    config = request.app[CONFIG]
    keys, admin = config.api_keys, config.admin_key
    if (keys or admin) and request.path not in _OPEN_PATHS:
        bearer = request.headers.get("Authorization", "")
        given = bearer[7:] if bearer.startswith("Bearer ") else request.headers.get("x-api-key")
        given_bytes = (given or "").encode("utf-8", "replace")
        match = None
        for key in keys:  # every key is compared, in constant time: no early exit
            if hmac.compare_digest(given_bytes, key.encode()):
                match = key
        is_admin = admin is not None and hmac.compare_digest(given_bytes, admin.encode())
        if match is None and not is_admin and keys:
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY "
                                "or x-api-key: KEY)", code="invalid_api_key")
        request[ADMIN] = is_admin
        if match is not None or (is_admin and keys):
            request[TENANT] = tenant_of(match or admin)
    return await handler(request)


def is_admin(request: web.Request) -> bool:
    """The admin key, or an open server with no admin key (one tenant: its operator)."""
    config = request.app[CONFIG]
    return request.get(ADMIN, False) or (not config.api_keys and config.admin_key is None)


async def read_json(request: web.Request) -> dict:
    """The body as a JSON object, read within the body limits and parsed off the loop."""
    limits = request.app[CONFIG].limits
    raw = await read_body(request, limits)
    return await offload(request, decode_json, raw, request.charset, limits)


def check_model(body: dict, frontend: Frontend) -> None:
    model = body.get("model")
    if model is None:
        return  # optional here; the served model is used
    if not isinstance(model, str):
        raise invalid("'model' must be a string", param="model")
    if model not in frontend.model_names:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                            f"{', '.join(repr(n) for n in frontend.model_names)}",
                       param="model", code="model_not_found")


# ---- a request in flight -----------------------------------------------------------


@dataclass
class Step:
    """One step of a request's parsed stream: typed deltas (content, reasoning,
    tool_call) and the raw output they came from (usage, finish, logprobs)."""

    deltas: list[Any]
    out: RequestOutput


@dataclass
class Reply:
    """A whole reply, gathered: what the non-streaming responses are made of."""

    deltas: list[Any] = field(default_factory=list)
    last: RequestOutput | None = None
    logprobs: list[tuple[int, float, Any]] = field(default_factory=list)  # token, lp, top

    def text(self, kind: str = "content") -> str:
        return "".join(d.text for d in self.deltas if d.kind == kind)


class Run:
    """One request in flight: submits it, parses its output, times it, and aborts it if
    the client goes."""

    def __init__(self, request: web.Request, gen: Generation, index: int = 0):
        self.app = request.app
        self.gen = gen
        self.index = index  # which choice, when a request asks for several
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.parser = self.app[FRONTEND].output_parser(gen.tools, gen.parse_tools,
                                                       gen.reasoning_open, gen.structured,
                                                       gen.bare_tool_call)
        if gen.format is not None:
            self.app[METRICS].structured.labels(gen.format).inc()
        sampling = gen.sampling
        if index and sampling.seed is not None:  # each choice its own, reproducible stream
            sampling = replace(sampling, seed=sampling.seed + index)
        req = Request(gen.prompt, sampling, gen.checkpoints,
                      cache_salt(request.get(TENANT), gen.cache_salt),
                      share_prompt=gen.n > 1, tenant=request.get(TENANT))
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

    async def steps(self) -> AsyncIterator[Step]:
        async for out in self.outputs():
            deltas = self.parser.feed(out.text) if out.text else []
            if out.finish_reason is not None:
                deltas += self.parser.finish(truncated=out.finish_reason == "length")
            if not self.gen.include_reasoning:
                deltas = [d for d in deltas if d.kind != "reasoning"]
            yield Step(deltas, out)

    @property
    def called_tools(self) -> bool:
        return self.parser.calls > 0

    async def collect(self) -> Reply:
        reply = Reply()
        async for step in self.steps():
            reply.deltas += step.deltas
            reply.last = step.out
            for tok, lp in zip(step.out.token_ids, step.out.logprobs or ()):
                reply.logprobs.append((tok, *lp))
        if reply.last.finish_reason == "error":
            raise ApiError(500, reply.last.error or "generation failed")
        if reply.last.finish_reason == "abort":
            raise ApiError(503, "the request was aborted: the server is shutting down")
        return reply


def start_runs(request: web.Request, gen: Generation) -> list[Run]:
    """One ``Run`` per choice; if one can't be submitted, the others are withdrawn."""
    runs: list[Run] = []
    try:
        for i in range(gen.n):
            runs.append(Run(request, gen, i))
    except BaseException:
        for run in runs:
            run.stream.cancel()
        raise
    return runs


async def merged_steps(runs: list[Run]) -> AsyncIterator[tuple[Run, Step]]:
    """The steps of several runs, interleaved as they come."""
    if len(runs) == 1:
        async for step in runs[0].steps():
            yield runs[0], step
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(run: Run) -> None:
        try:
            async for step in run.steps():
                await queue.put((run, step))
        finally:
            await queue.put((run, None))

    tasks = [asyncio.create_task(pump(run)) for run in runs]
    try:
        left = len(runs)
        while left:
            run, step = await queue.get()
            if step is None:
                left -= 1
            else:
                yield run, step
    finally:
        for task in tasks:
            task.cancel()  # a client gone, or an error: every choice is aborted


class EventStream(web.StreamResponse):
    """An SSE response whose writes give up on a client that stopped reading: each
    write waits for the socket's buffer to drain at most ``stall_timeout`` seconds."""

    stall_timeout: float = 60.0


async def sse(request: web.Request) -> EventStream:
    resp = EventStream(headers={"Content-Type": "text/event-stream",
                                "Cache-Control": "no-cache"})
    resp.stall_timeout = request.app[CONFIG].stalled_stream_timeout
    await resp.prepare(request)
    return resp


async def send(resp: EventStream, data: dict | str, event: str | None = None) -> None:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    await _write(resp, f"{head}data: {payload}\n\n")


async def send_comment(resp: EventStream, text: str) -> None:
    """An SSE comment, which clients skip: it keeps a silent stream alive."""
    await _write(resp, f": {text}\n\n")


async def _write(resp: EventStream, text: str) -> None:
    try:
        await asyncio.wait_for(resp.write(text.encode()), resp.stall_timeout)
    except asyncio.TimeoutError:
        raise ClientStalled() from None


# ---- tokenizer and server facts (vLLM's and SGLang's shapes, for routers and tools) -----


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
    max_len = request.app[SCHEDULER].max_prompt_tokens
    return web.json_response({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "blockserve",
         "root": f.model_id, "max_model_len": max_len} for name in f.model_names]})


async def health(request: web.Request) -> web.Response:
    """200 while serving; 503 while draining, so that load balancers move away."""
    sched = request.app[SCHEDULER]
    if sched.failed is not None:
        return web.json_response({"status": "failed", "error": sched.failed}, status=503)
    if sched.draining:
        return web.json_response({"status": "draining"}, status=503,
                                 headers={"Retry-After": "5"})
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def tenant_scope(tenant: str) -> Callable[[Namespace], bool]:
    """The namespaces of one tenant: its salt, and the salts nested inside it."""
    own = f"tenant:{tenant}"
    return lambda ns: ns.cache_salt == own or (ns.cache_salt or "").startswith(own + "\0")


def _scope(request: web.Request) -> Callable[[Namespace], bool] | None:
    """Whose cache a request may see and flush: all (None) for the admin, its own for a
    tenant; a key that is neither is refused."""
    if is_admin(request):
        return None
    tenant = request.get(TENANT)
    if tenant is None:
        raise ApiError(403, "the cache's administration needs the admin key "
                            "(--admin-key)", code="forbidden")
    return tenant_scope(tenant)


async def cache_stats(request: web.Request) -> web.Response:
    sched = request.app[SCHEDULER]
    scope = _scope(request)
    if scope is not None:  # a tenant sees its own blocks and requests, nobody else's
        blocks, nbytes = sched.pool.usage(scope)
        tenant = request[TENANT]
        return web.json_response({"pool": {"blocks_stored": blocks, "bytes_stored": nbytes},
                                  "scheduler": {"running": sched.num_running_of(tenant),
                                                "waiting": sched.num_waiting_of(tenant)}})
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
    """Flush the cache: all of it with the admin key, a tenant's own with its key."""
    scope = _scope(request)
    if not request.app[SCHEDULER].reset_cache(scope):
        raise ApiError(409, "the cache was not flushed: some of its blocks are in use by "
                            "running requests; retry when they finish", code="cache_in_use")
    return web.json_response({"reset": True, "scope": "all" if scope is None else "tenant"})
