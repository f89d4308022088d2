"""A request in flight, shared by every API: the app's keys and config, reading a body,
submitting a request (``Run``) and parsing its output, and writing SSE that gives up on a
client that stopped reading. Imports no API module: they import it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Optional

from aiohttp import web

from blockserve.engine.text.frontend import TokenizerFrontend
from blockserve.scheduler import Request, RequestOutput, Scheduler
from blockserve.server import keepalive
from blockserve.server.errors import ApiError, invalid
from blockserve.server.fields import Bounds, Generation, take
from blockserve.server.limits import Limits, decode_json, offload, read_body
from blockserve.server.metrics import Metrics

log = logging.getLogger("blockserve.server")


@dataclass
class ServerConfig:
    default_max_tokens: int | None = None  # None: what the context allows
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
    max_tokens_cap: int | None = None  # --max-tokens: the most any request gets


def cache_salt(tenant: str | None, salt: str | None) -> str | None:
    """The tenant's salt, with a request's own ``cache_salt`` nested inside it."""
    if tenant is None:
        return salt
    return f"tenant:{tenant}" if salt is None else f"tenant:{tenant}\0salt:{salt}"


SCHEDULER = web.AppKey("scheduler", Scheduler)


FRONTEND = web.AppKey("frontend", TokenizerFrontend)


CONFIG = web.AppKey("config", ServerConfig)


METRICS = web.AppKey("metrics", Metrics)


BOUNDS = web.AppKey("bounds", Bounds)


TENANT = web.RequestKey("tenant", str)  # the request's tenant, set by _auth


ADMIN = web.RequestKey("admin", bool)  # the request holds the admin key


class ClientStalled(Exception):
    """A streaming client read nothing for ``stalled_stream_timeout``."""

    def __init__(self) -> None:
        super().__init__("the client stopped reading its stream")


async def read_json(request: web.Request) -> dict:
    """The body as a JSON object, read within the body limits and parsed off the loop."""
    limits = request.app[CONFIG].limits
    raw = await read_body(request, limits)
    return await offload(request, decode_json, raw, request.charset, limits)


def check_model(body: dict, frontend: TokenizerFrontend) -> None:
    model = take(body, "model", {"enum": [*frontend.model_names, None],
                                 "description": "a served model name (optional)"})
    if model is None:
        return  # optional here; the served model is used
    if not isinstance(model, str):
        raise invalid("'model' must be a string", param="model")
    if model not in frontend.model_names:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                            f"{', '.join(repr(n) for n in frontend.model_names)}",
                       param="model", code="model_not_found")


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

    def add(self, step: Step) -> None:
        self.deltas += step.deltas
        self.last = step.out
        for tok, lp in zip(step.out.token_ids, step.out.logprobs or ()):
            self.logprobs.append((tok, *lp))


SEED_BITS = 64


def choice_seed(seed: int, index: int) -> int:
    """Choice ``index``'s seed: ``seed + index``, wrapped within 64 bits (the PRNG key's
    size), so the largest seed a client may send still gives ``n`` distinct streams."""
    return (seed + index) % 2**SEED_BITS


class Run:
    """One request in flight: submits it, parses its output, times it, and aborts it if
    the client goes."""

    def __init__(self, request: web.Request, gen: Generation, index: int = 0):
        self.app = request.app
        self.gen = gen
        self.index = index  # which choice, when a request asks for several
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.parser = self.app[FRONTEND].output_parser(gen.reply)
        if gen.format is not None:
            self.app[METRICS].structured.labels(gen.format).inc()
        sampling = gen.sampling
        if index and sampling.seed is not None:  # each choice its own, reproducible stream
            sampling = replace(sampling, seed=choice_seed(sampling.seed, index))
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
            if not self.gen.reply.include_reasoning:
                deltas = [d for d in deltas if d.kind != "reasoning"]
            yield Step(deltas, out)

    @property
    def called_tools(self) -> bool:
        return self.parser.calls > 0


def check_finished(out: RequestOutput) -> None:
    """A collected reply that failed or was aborted is an error response, not a body."""
    if out.finish_reason == "error":
        raise ApiError(500, out.error or "generation failed")
    if out.finish_reason == "abort":
        raise ApiError(503, "the request was aborted: the server is shutting down")


Event = tuple[Optional[str], Any]  # an SSE event: its name (or None), and its data


class Encoder:
    """One API's reply shape, fed the same steps whether the reply is streamed or
    collected: ``step`` gathers the reply and gives the events that stream it, ``body``
    is the collected reply. ``ended``: the stream has said its last word (an error)."""

    ended = False

    def start(self) -> list[Event]:
        """Events before the first step."""
        return []

    def step(self, run: Run, step: Step) -> list[Event]:
        raise NotImplementedError

    def keepalive(self) -> Event | None:
        """What a silent stream sends (a long prefill); None: an SSE comment."""
        return None

    def finish(self) -> list[Event]:
        """Events after the last step."""
        return []

    def body(self) -> dict:
        raise NotImplementedError


async def respond(request: web.Request, runs: list[Run], encoder: Encoder,
                  stream: bool) -> web.StreamResponse:
    """Drive ``runs`` through ``encoder``: SSE events as they come, or one JSON body."""
    if not stream:
        async for run, step in merged_steps(runs):
            check_finished(step.out)
            encoder.step(run, step)
        return web.json_response(encoder.body())
    resp = await sse(request)
    for name, data in encoder.start():
        await send(resp, data, name)
    ticking = keepalive.with_idle_ticks(merged_steps(runs), keepalive.INTERVAL_S)
    async with contextlib.aclosing(ticking) as items:  # closed at once: runs are freed
        async for item in items:
            if item is None:  # a long prefill: keep clients and proxies waiting
                tick = encoder.keepalive()
                await (send_comment(resp, "keepalive") if tick is None
                       else send(resp, tick[1], tick[0]))
                continue
            for name, data in encoder.step(*item):
                await send(resp, data, name)
            if encoder.ended:
                break
    for name, data in encoder.finish():
        await send(resp, data, name)
    await resp.write_eof()
    return resp


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
