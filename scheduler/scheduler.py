"""The asyncio scheduler: waiting queue, admission under one memory limit, cache-aware
order, in-flight prefix sharing, preemption, per-request output streams and aborts.

It owns the prefix cache and runs entirely on one event loop; the generator's events
arrive from its thread through ``loop.call_soon_threadsafe``.

It speaks to the prefix cache (``kvpool.PrefixCache``) only in request-level verbs:
``prompt``, ``cached``, ``acquire``, ``publish``, ``release``. In-flight sharing and the
disk tier live under them.

Pins: a running request keeps its prefix hit pinned until it ends. Its blocks are in
use for its whole life, and the finish-time insert resumes the chain from them without
hashing or verifying it again.

Memory (``scheduler.memory``): running sequences take K/V as they grow; the prefix
cache's budget is what they leave. When they would pass the limit even with the cache
emptied of unpinned blocks, the most recently admitted sequence is **preempted**: the
engine publishes its computed blocks into the prefix cache and parks it, and it waits at
the head of the queue to resume by a cache hit on its prompt and the tokens it has
generated (vLLM recomputes instead). Its stream just pauses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

from blockserve.kvpool import (
    TIER_GENERATED,
    BlockPool,
    Chain,
    Namespace,
    PrefixCache,
    ScopeFn,
)
from blockserve.scheduler.memory import MemoryBudget
from blockserve.scheduler.protocol import (
    BlocksEvent,
    EngineFailedEvent,
    Checkpoint,
    EngineEvent,
    ErrorEvent,
    FinishEvent,
    Generator,
    PreemptedEvent,
    SamplingParams,
    SequenceSpec,
    TokenEvent,
)


class SchedulerError(Exception):
    """Base of the scheduler's typed errors; ``str(e)`` is a message for the client."""


class QueueFullError(SchedulerError):
    """Too many requests are waiting; retry later (HTTP 429)."""


class PromptTooLongError(SchedulerError):
    """The prompt does not fit the context limit (HTTP 400)."""


class RequestTooLargeError(SchedulerError):
    """The prompt alone needs more K/V than the memory limit leaves (HTTP 400)."""


class MemoryPressureError(SchedulerError):
    """The process is over its memory limit (another process, a leak): new requests wait
    outside, running ones finish (HTTP 503 with Retry-After)."""


class SchedulerClosedError(SchedulerError):
    """The server is shutting down (HTTP 503)."""


class TenantShareError(QueueFullError):
    """One tenant holds its share of the queue while others wait (HTTP 429)."""


log = logging.getLogger(__name__)

ORDERS = ("finish", "prefix")  # SchedulerConfig.order

# What a request hears when the engine stopped under it: never another request's error.
ENGINE_STOPPED = "the engine stopped; the server is restarting, retry shortly"


@dataclass
class Request:
    prompt: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # (token offset, tier) of prompt checkpoints, e.g. from ``engine.chat``; unaligned.
    checkpoints: list[tuple[int, int]] = field(default_factory=list)
    cache_salt: str | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Siblings with the same prompt follow (n > 1): publish the prompt's last full block
    # as soon as it is computed, so they wait for it and prefill only the tail.
    share_prompt: bool = False
    # Who sent it (a digest of the API key), for fair shares; None: an open server.
    tenant: str | None = None


@dataclass
class Usage:
    prompt_tokens: int
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class RequestOutput:
    """One step of a request's stream. The last one has ``finish_reason`` set; ``usage``
    is a snapshot, present once the request has been admitted."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    usage: Usage | None = None
    error: str | None = None
    stop_string: str | None = None  # which stop string ended the request
    # per token, when the request asked for logprobs: (logprob, [(token, logprob)] or None)
    logprobs: list[tuple[float, list[tuple[int, float]] | None]] | None = None


@dataclass
class SchedulerConfig:
    max_running: int = 16
    max_queue: int = 256
    max_prompt_tokens: int | None = None  # default: the generator's context limit
    memory: MemoryBudget | None = None  # None: no limit (fake generators, tools)
    # The process's resident bytes, read when a request arrives: over the limit, 503.
    footprint: Callable[[], int] | None = None
    aging_limit: int = 8  # a waiting request is overtaken at most this many times
    # Which waiting request goes first, within a tenant's fair share and aging:
    # "finish": what finishes soonest, the least prefill left after its cache hit, then
    # the fewest tokens to generate; "prefix": the longest cached prefix (SGLang's LPM).
    order: str = "finish"
    share_inflight: bool = True
    # Several tenants: running slots no single tenant may take, so that another
    # tenant's request starts within a step even while one tenant fills the rest.
    tenant_headroom: int = 0


@dataclass
class SchedulerStats:
    submitted: int = 0
    prefill_tokens: int = 0  # prompt tokens actually computed
    prompt_tokens: int = 0
    cached_tokens: int = 0
    inflight_shares: int = 0  # requests that waited for a running request's blocks
    preemptions: int = 0  # sequences parked to keep the memory limit
    resumed_cached_tokens: int = 0  # positions resumed preempted sequences hit
    pressure_refusals: int = 0  # requests refused (503) while over the memory limit
    finished: Counter = field(default_factory=Counter)  # by finish_reason


@dataclass(eq=False)
class _State:
    req: Request
    chain: Chain  # the prompt as the prefix cache sees it, and what the request holds
    arrival: int
    outputs: asyncio.Queue
    overtaken: int = 0
    usage: Usage | None = None
    done: bool = False
    admitted: int = -1  # admission order: the most recent is preempted first
    kv_tokens: int = 0  # positions its K/V holds while running
    preempting: bool = False  # asked to park; its K/V counts until the engine says so
    resume: list[int] | None = None  # preempted: prompt + generated, to resume from


class RequestStream:
    """Async iterator over one request's outputs. Closing it early aborts the request."""

    def __init__(self, scheduler: Scheduler, state: _State):
        self._scheduler = scheduler
        self._state = state
        self.request_id = state.req.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._state.done and self._state.outputs.empty():
            raise StopAsyncIteration
        return await self._state.outputs.get()

    def cancel(self) -> None:
        """Abort the request if it has not finished (a client went away)."""
        self._scheduler.abort(self.request_id)


class Scheduler:
    def __init__(self, generator: Generator, cache: PrefixCache | BlockPool,
                 config: SchedulerConfig):
        if config.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}")
        if isinstance(cache, BlockPool):
            cache = PrefixCache(cache, share_inflight=config.share_inflight)
        if cache.block_size != generator.block_size:
            raise ValueError("the pool and the generator must use one block size")
        self.generator = generator
        self.prefix = cache
        self.pool = cache.pool  # for stats
        self.config = config
        self.stats = SchedulerStats()
        self._waiting: dict[str, _State] = {}  # insertion order = arrival order
        self._running: dict[str, _State] = {}
        self._arrivals = itertools.count()
        self._admissions = itertools.count()
        self._longest = 0  # the most positions a running sequence holds
        self._closed = False
        self.draining = False  # refuse new requests, let running ones finish
        self.failed: str | None = None  # the engine died: everything is refused
        self.stopped = asyncio.Event()  # set when the engine died (the CLI exits non-zero)

    # ---- public API (event loop) --------------------------------------------

    def start(self) -> None:
        """Bind to the running loop and start the generator."""
        loop = asyncio.get_running_loop()
        self.prefix.start(loop.call_soon_threadsafe, self._schedule)
        self.generator.start(lambda e: loop.call_soon_threadsafe(self._on_event, e))

    @property
    def max_prompt_tokens(self) -> int:
        return self.config.max_prompt_tokens or self.generator.max_context

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def num_running_of(self, tenant: str | None) -> int:
        return sum(s.req.tenant == tenant for s in self._running.values())

    def num_waiting_of(self, tenant: str | None) -> int:
        return sum(s.req.tenant == tenant for s in self._waiting.values())

    def namespace(self, cache_salt: str | None) -> Namespace:
        return Namespace(self.generator.namespace.model, cache_salt)

    def submit(self, req: Request) -> RequestStream:
        """Queue a request; raises a ``SchedulerError`` if it can't be accepted."""
        if self.failed is not None:
            raise SchedulerClosedError(ENGINE_STOPPED)
        if self._closed or self.draining:
            raise SchedulerClosedError("the server is shutting down: retry on another "
                                       "replica, or here after a restart")
        if not req.prompt:
            raise SchedulerError("the prompt is empty: at least one token is required")
        limit = self.max_prompt_tokens
        if len(req.prompt) >= limit:
            raise PromptTooLongError(
                f"the prompt has {len(req.prompt)} tokens; this server's context limit is "
                f"{limit} tokens, including at least one generated token"
            )
        if req.request_id in self._waiting or req.request_id in self._running:
            raise SchedulerError(f"request id {req.request_id!r} is already in use")
        max_tokens = min(req.sampling.max_tokens, limit - len(req.prompt))
        if max_tokens != req.sampling.max_tokens:
            req.sampling = replace(req.sampling, max_tokens=max_tokens)
        mem = self.config.memory
        if mem is not None:
            need = mem.sequence_bytes(len(req.prompt))
            if need > mem.running_limit_bytes:
                raise RequestTooLargeError(
                    f"the prompt's {len(req.prompt)} tokens need {need} bytes of KV "
                    f"({mem.kv_bytes_per_token} a token); this server's memory limit "
                    f"leaves {mem.running_limit_bytes} bytes for running requests "
                    "(--memory-limit)")
            reason = self.memory_pressure()
            if reason is not None:
                self.stats.pressure_refusals += 1
                raise MemoryPressureError(reason + "; retry shortly")
        self._check_queue_share(req.tenant)
        chain = self.prefix.prompt(self.namespace(req.cache_salt), req.prompt)
        state = _State(req, chain, next(self._arrivals), asyncio.Queue())
        self._waiting[req.request_id] = state
        self.stats.submitted += 1
        self._schedule()
        return RequestStream(self, state)

    def abort(self, request_id: str) -> bool:
        """Stop a request at any stage and free all it holds. False if unknown/ended."""
        state = self._waiting.pop(request_id, None)
        if state is not None and state.resume is not None:
            self.generator.abort(request_id)  # the engine holds it parked
        if state is None:
            state = self._running.get(request_id)
            if state is None:
                return False
            self.generator.abort(request_id)
        self._end(state, RequestOutput(request_id, finish_reason="abort",
                                       usage=state.usage))
        return True

    def reset_cache(self, scope: ScopeFn | None = None) -> bool:
        """Flush the cache, RAM and disk, or the namespaces in ``scope`` (a tenant's);
        refused (False) while any of those blocks is pinned."""
        return self.prefix.reset(scope)

    def drain(self) -> None:
        """Stop admitting new requests; the queued and running ones carry on."""
        self.draining = True

    @property
    def idle(self) -> bool:
        return not self._running and not self._waiting

    @property
    def running_kv_bytes(self) -> int:
        """Running sequences' K/V as counted (``MemoryBudget.running_bytes``);
        ``/metrics`` shows what the engine measured beside it."""
        mem = self.config.memory
        return 0 if mem is None else mem.running_bytes(len(self._running), self._longest)

    def memory_report(self) -> dict[str, int] | None:
        """The limit and each part's bytes, for ``/metrics`` and ``/v1/cache/stats``."""
        mem = self.config.memory
        if mem is None:
            return None
        measured = getattr(self.generator, "memory", None)
        return {
            "limit": mem.limit_bytes, "weights": mem.weights_bytes,
            "runtime": mem.baseline_bytes, "activation_reserve": mem.activation_bytes,
            "buffer_cache_limit": mem.buffer_cache_bytes,
            "activation_peak": getattr(measured, "step_peak_bytes", 0),
            "kv": mem.kv_bytes, "kv_per_token": mem.kv_bytes_per_token,
            "running_kv": self.running_kv_bytes,
            "running_kv_measured": getattr(measured, "kv_bytes", 0),
            "running_kv_limit": mem.running_limit_bytes, "cache": self.pool.nbytes,
            "cache_budget": self.pool.budget_bytes,
            "resident": self.config.footprint() if self.config.footprint else 0,
            "mlx_active": getattr(measured, "mlx_active", 0),
            "mlx_cache": getattr(measured, "mlx_cache", 0),
            "mlx_peak": getattr(measured, "mlx_peak", 0),
        }

    def memory_pressure(self) -> str | None:
        """Why new requests are refused (the process is over its limit), or None."""
        mem, probe = self.config.memory, self.config.footprint
        return None if mem is None or probe is None else mem.pressure(probe())

    def shutdown(self) -> None:
        """Refuse new requests and abort what is left. The generator stays open: its
        owner closes it (a test may share one between schedulers)."""
        self._closed = True
        for rid in list(self._waiting) + list(self._running):
            self.abort(rid)

    # ---- admission ------------------------------------------------------------

    def _check_queue_share(self, tenant: str | None) -> None:
        """The queue is shared fairly: a tenant may fill it alone, but once others have
        work, it may hold only its share (``max_queue`` over the active tenants), and a
        tenant under its share is queued even when the queue is full."""
        waiting = Counter(s.req.tenant for s in self._waiting.values())
        active = {s.req.tenant for s in self._waiting.values()}
        active |= {s.req.tenant for s in self._running.values()}
        active.add(tenant)
        share = max(1, self.config.max_queue // len(active))
        if waiting[tenant] < share and (len(active) > 1 or
                                        len(self._waiting) < self.config.max_queue):
            return
        if len(active) > 1:
            raise TenantShareError(
                f"this key holds its share of the queue ({waiting[tenant]} of "
                f"{self.config.max_queue} requests waiting, shared by {len(active)} "
                "active keys); retry later")
        raise QueueFullError(
            f"the queue is full ({self.config.max_queue} requests waiting); retry later")

    def _schedule(self) -> None:
        if self.failed is not None:
            return
        while self._waiting and len(self._running) < self.config.max_running:
            picked = self._pick()
            if picked is None:
                return
            state, n_hit = picked
            if not self._fits(state, n_hit):
                return  # wait for memory; running requests will free it
            self._admit(state)

    def _fits(self, state: _State, n_hit: int) -> bool:
        """Whether the request's K/V, and the blocks its hit will pin, fit beside the
        running ones. Alone it always fits (``submit`` refused what never can)."""
        mem = self.config.memory
        if mem is None or not self._running:
            return True
        longest = max(self._longest, len(state.resume or state.req.prompt))
        hit = n_hit * self.prefix.block_size * mem.kv_bytes_per_token
        return mem.admits(mem.running_bytes(len(self._running) + 1, longest),
                          self.pool.pinned_bytes + hit)

    def _pick(self) -> tuple[_State, int] | None:
        """A preempted request first (it waits at the head of the queue, in the order
        they were preempted); then fair across tenants, then by ``config.order``.

        Among the tenants with a request ready, the one with the fewest running goes
        first (a round robin as slots free), and no tenant takes the last
        ``tenant_headroom`` slots. Within a tenant, the order's first, but a request
        overtaken ``aging_limit`` times (by its own tenant's) goes next, so none waits
        forever. Returns the request and its cached blocks now."""
        for state in self._waiting.values():
            if state.resume is None:
                break  # the preempted ones are at the head
            n_hit = self.prefix.cached(state.chain)
            return None if n_hit is None else (state, n_hit)
        running = Counter(s.req.tenant for s in self._running.values())
        cap = self.config.max_running - self.config.tenant_headroom
        eligible: list[tuple[_State, int]] = []
        for state in self._waiting.values():
            if running[state.req.tenant] >= cap:
                continue  # its tenant has all it may hold
            n_hit = self.prefix.cached(state.chain)
            if n_hit is None:
                continue  # its next blocks are being loaded or computed: wait for them
            eligible.append((state, n_hit))
        if not eligible:
            return None
        fewest = min(running[s.req.tenant] for s, _ in eligible)
        eligible = [(s, n) for s, n in eligible if running[s.req.tenant] == fewest]
        aged = [s for s, _ in eligible if s.overtaken >= self.config.aging_limit]
        if aged:
            chosen = next(e for e in eligible if e[0] is aged[0])  # the oldest aged
        elif self.config.order == "prefix":
            chosen = max(eligible, key=lambda e: (e[1], -e[0].arrival))
        else:
            bs = self.prefix.block_size
            chosen = min(eligible, key=lambda e: (len(e[0].req.prompt) - e[1] * bs,
                                                  e[0].req.sampling.max_tokens,
                                                  e[0].arrival))
        for state, _ in eligible:
            if state.arrival < chosen[0].arrival and state.req.tenant == chosen[0].req.tenant:
                state.overtaken += 1
        return chosen

    def _admit(self, state: _State) -> None:
        req = state.req
        del self._waiting[req.request_id]
        resume, state.resume = state.resume, None
        prompt = resume or req.prompt
        marks = [] if resume else list(req.checkpoints)
        if self.generator.needs_snapshots or req.share_prompt:
            # A checkpoint at the prompt's last full block lets the same prompt (a
            # sibling choice), or its next turn, resume there; for state layers also
            # because the finish can't snapshot an unaligned end.
            marks.append((len(prompt) - 1, TIER_GENERATED))
        checkpoints = [Checkpoint(t, tier)
                       for t, tier in self.prefix.acquire(state.chain, marks)]
        hit = state.chain.hit
        self._running[req.request_id] = state
        state.admitted = next(self._admissions)
        self.stats.prefill_tokens += len(prompt) - hit.num_tokens
        sampling = req.sampling
        if resume:
            self.stats.resumed_cached_tokens += hit.num_tokens
            sampling = replace(sampling,
                               max_tokens=sampling.max_tokens - (len(resume) - len(req.prompt)))
        else:
            state.usage = Usage(len(req.prompt), hit.num_tokens, 0)
            self.stats.prompt_tokens += len(req.prompt)
            self.stats.cached_tokens += hit.num_tokens
            if state.chain.shared:
                self.stats.inflight_shares += 1
        self.generator.insert(SequenceSpec(
            req.request_id, prompt, hit.num_tokens, hit.payloads, checkpoints, sampling,
            resume=resume is not None,
        ))
        self._grow(state, len(prompt))
        self._rebalance()  # one more row

    # ---- memory -----------------------------------------------------------------

    def _grow(self, state: _State, kv_tokens: int) -> None:
        """A running sequence's K/V now holds ``kv_tokens`` positions."""
        state.kv_tokens = kv_tokens
        mem = self.config.memory
        if mem is None or kv_tokens <= self._longest:
            return
        grew = mem.sequence_bytes(kv_tokens) != mem.sequence_bytes(self._longest)
        self._longest = kv_tokens
        if grew:
            self._rebalance()

    def _left(self, state: _State) -> None:
        """``state`` no longer runs: its K/V is gone."""
        del self._running[state.req.request_id]
        if state.kv_tokens >= self._longest:
            self._longest = max((s.kv_tokens for s in self._running.values()), default=0)
        state.kv_tokens = 0

    def _rebalance(self) -> None:
        """Give the prefix cache what the running sequences leave (it evicts down to it,
        to the disk tier if there is one); if they would pass the limit even so,
        preempt the most recently admitted one."""
        mem = self.config.memory
        if mem is None:
            return
        running = self.running_kv_bytes
        budget = mem.cache_budget(running)
        if budget != self.pool.budget_bytes:
            self.pool.set_budget(budget)
        if mem.over(running, self.pool.nbytes):
            self._preempt()

    def _preempt(self) -> None:
        if not self._running or any(s.preempting for s in self._running.values()):
            return  # one at a time: its K/V is freed when the engine has parked it
        if len(self._running) == 1:
            if self.running_kv_bytes <= self.config.memory.running_limit_bytes:
                return  # over only by the cache blocks it pins itself, until it ends
            # Alone and still too big: the limit is the most this reply can grow.
            (state,) = self._running.values()
            log.warning("request %s reached the memory limit at %d positions: ended",
                        state.req.request_id, state.kv_tokens)
            self.generator.abort(state.req.request_id)
            self._end(state, RequestOutput(state.req.request_id, finish_reason="length",
                                           usage=state.usage))
            return
        victim = max(self._running.values(), key=lambda s: s.admitted)
        victim.preempting = True
        self.generator.preempt(victim.req.request_id)

    def _preempted(self, state: _State, event: PreemptedEvent) -> None:
        """The engine parked ``state``: its blocks go into the prefix cache, and it
        waits at the head of the queue to resume from them."""
        req = state.req
        self._left(state)
        state.preempting = False
        self.stats.preemptions += 1
        self._rebalance()  # the cache's budget grows by what the sequence held
        self.prefix.publish(state.chain, event.tokens, event.first_block, event.payloads,
                            TIER_GENERATED)
        self.prefix.release(state.chain)
        state.chain = self.prefix.prompt(self.namespace(req.cache_salt), event.resume)
        state.resume = list(event.resume)
        preempted = [s for s in self._waiting.values() if s.resume is not None]
        rest = [s for s in self._waiting.values() if s.resume is None]
        self._waiting = {s.req.request_id: s for s in [*preempted, state, *rest]}
        log.info("preempted %s at %d tokens to keep the memory limit", req.request_id,
                 len(event.resume))

    # ---- generator events ----------------------------------------------------

    def _on_event(self, event: EngineEvent | list[EngineEvent]) -> None:
        if isinstance(event, list):  # one engine step's events, in order
            self._on_step_events(event)
            return
        if isinstance(event, EngineFailedEvent):
            self._engine_failed(event.message)
            return
        state = self._running.get(event.seq_id)
        if state is None:
            return  # an aborted request: its late events (and KV) are dropped
        if isinstance(event, TokenEvent):
            state.usage.completion_tokens += 1
            logprobs = (None if event.logprob is None
                        else [(event.logprob, event.top_logprobs)])
            state.outputs.put_nowait(RequestOutput(event.seq_id, event.text, [event.token],
                                                   usage=replace(state.usage),
                                                   logprobs=logprobs))
            self._grow(state, state.kv_tokens + 1)
        elif isinstance(event, BlocksEvent):
            if self.prefix.publish(state.chain, event.tokens, event.first_block,
                                   event.payloads, event.tier):
                self._schedule()  # requests deferred on these blocks can now hit
        elif isinstance(event, FinishEvent):
            state.usage.completion_tokens = event.completion_tokens
            self._end(state, RequestOutput(event.seq_id, event.text,
                                           finish_reason=event.finish_reason,
                                           usage=state.usage, stop_string=event.stop_string))
        elif isinstance(event, ErrorEvent):
            self._end(state, RequestOutput(event.seq_id, finish_reason="error",
                                           usage=state.usage, error=event.message))
        elif isinstance(event, PreemptedEvent):
            self._preempted(state, event)
            self._schedule()

    def _on_step_events(self, events: list[EngineEvent]) -> None:
        """A step's events: a request's tokens in it become one output (one SSE chunk
        per stream per step, however many tokens a verify accepted)."""
        run: list[TokenEvent] = []
        for event in events + [None]:
            if (run and isinstance(event, TokenEvent) and event.seq_id == run[0].seq_id):
                run.append(event)
                continue
            if len(run) == 1:
                self._on_event(run[0])
            elif run:
                self._on_tokens(run)
            run = []
            if isinstance(event, TokenEvent):
                run.append(event)
            elif event is not None:
                self._on_event(event)

    def _on_tokens(self, events: list[TokenEvent]) -> None:
        """Several tokens of one request in a row, as one output."""
        state = self._running.get(events[0].seq_id)
        if state is None:
            return
        state.usage.completion_tokens += len(events)
        logprobs = None if events[0].logprob is None else [
            (e.logprob, e.top_logprobs) for e in events]
        state.outputs.put_nowait(RequestOutput(
            events[0].seq_id, "".join(e.text for e in events), [e.token for e in events],
            usage=replace(state.usage), logprobs=logprobs))
        self._grow(state, state.kv_tokens + len(events))

    def _engine_failed(self, message: str) -> None:
        """The engine thread died: every request ends with an error that names no other
        request, and nothing more is accepted (health says 503; the CLI exits)."""
        log.error("the engine stopped: %s", message)
        self.failed = message
        self._closed = True
        for rid in list(self._waiting) + list(self._running):
            state = self._waiting.pop(rid, None) or self._running[rid]
            self._end(state, RequestOutput(rid, finish_reason="error", usage=state.usage,
                                           error=ENGINE_STOPPED))
        self.stopped.set()

    def _end(self, state: _State, final: RequestOutput) -> None:
        """Release everything a request holds and close its stream."""
        rid = state.req.request_id
        if rid in self._running:
            self._left(state)
        self.prefix.release(state.chain)
        state.done = True
        state.outputs.put_nowait(final)
        self.stats.finished[final.finish_reason] += 1
        self._rebalance()
        self._schedule()
