"""The endpoints that are not an API of a model: health, metrics, models, server and
model facts (SGLang's and vLLM's shapes, for routers), and the cache's administration,
scoped to the caller's tenant unless it holds the admin key."""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable

from aiohttp import web

from blockserve.kvpool import Namespace, Scope
from blockserve.server.errors import ApiError
from blockserve.server.runtime import ADMIN, CONFIG, FRONTEND, METRICS, SCHEDULER, TENANT


def is_admin(request: web.Request) -> bool:
    """The admin key, or an open server with no admin key (one tenant: its operator)."""
    config = request.app[CONFIG]
    return request.get(ADMIN, False) or (not config.api_keys and config.admin_key is None)


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


async def models(request: web.Request) -> web.Response:
    f = request.app[FRONTEND]
    max_len = request.app[SCHEDULER].max_prompt_tokens
    return web.json_response({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "blockserve",
         "root": f.model_id, "max_model_len": max_len} for name in f.model_names]})


async def health(request: web.Request) -> web.Response:
    """200 while serving; 503 while draining or over the memory limit (saying why), so
    that load balancers move away."""
    sched = request.app[SCHEDULER]
    if sched.failed is not None:
        return web.json_response({"status": "failed", "error": sched.failed}, status=503)
    if sched.draining:
        return web.json_response({"status": "draining"}, status=503,
                                 headers={"Retry-After": "5"})
    pressure = sched.memory_pressure()
    if pressure is not None:  # new requests are refused until memory comes back
        return web.json_response({"status": "memory_pressure", "reason": pressure},
                                 status=503, headers={"Retry-After": "2"})
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def tenant_scope(tenant: str) -> Scope:
    """The namespaces of one tenant: its salt, and the salts nested inside it."""
    return Scope(salt=f"tenant:{tenant}")


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
                                                "waiting": sched.num_waiting_of(tenant)},
                                  "disk": _disk_stats(sched, scope)})
    pool = sched.pool.stats()
    s = sched.stats
    return web.json_response({
        "pool": {**asdict(pool), "evictions": {str(k): v for k, v in pool.evictions.items()},
                 "blocks_stored": pool.blocks_stored, "bytes_stored": pool.bytes_stored,
                 "hit_rate": pool.hit_rate},
        "scheduler": {"running": sched.num_running, "waiting": sched.num_waiting,
                      "submitted": s.submitted, "prompt_tokens": s.prompt_tokens,
                      "cached_tokens": s.cached_tokens, "prefill_tokens": s.prefill_tokens,
                      "inflight_shares": s.inflight_shares, "finished": dict(s.finished),
                      "preemptions": s.preemptions,
                      "resumed_cached_tokens": s.resumed_cached_tokens,
                      "pressure_refusals": s.pressure_refusals},
        "memory": sched.memory_report(),
        "disk": _disk_stats(sched),
    })


def _disk_stats(sched, scope: Callable[[Namespace], bool] | None = None) -> dict | None:
    """The disk tier's counters and gauges, or None when it is off; a tenant's
    ``scope`` sees its own files and hits only."""
    d = sched.prefix.disk_stats(scope)
    if d is None:
        return None
    if scope is not None:
        return {"files": d.files, "bytes_used": d.bytes_used, "hit_tokens": d.hit_tokens,
                "miss_tokens": d.miss_tokens, "hit_rate": d.hit_rate}
    return {**asdict(d), "hit_rate": d.hit_rate}


async def cache_reset(request: web.Request) -> web.Response:
    """Flush the cache: all of it with the admin key, a tenant's own with its key."""
    scope = _scope(request)
    if not request.app[SCHEDULER].reset_cache(scope):
        raise ApiError(409, "the cache was not flushed: some of its blocks are in use by "
                            "running requests; retry when they finish", code="cache_in_use")
    return web.json_response({"reset": True, "scope": "all" if scope is None else "tenant"})
