"""The aiohttp application: routes and middlewares (errors, keys). Thin: every bit of
state lives in the scheduler. The APIs are in ``openai_api``, ``anthropic_api`` and
``responses_api``, what they share in ``runtime``, the other endpoints in ``admin``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from blockserve.engine.text.frontend import TokenizerFrontend
from blockserve.scheduler import Scheduler, SchedulerError
from blockserve.server import admin, anthropic_api, openai_api, openapi, responses_api
from blockserve.server.errors import ApiError, from_scheduler
from blockserve.server.fields import Bounds
from blockserve.server.limits import WORKERS
from blockserve.server.metrics import Metrics
from blockserve.server.runtime import (
    ADMIN,
    BOUNDS,
    CONFIG,
    FRONTEND,
    METRICS,
    SCHEDULER,
    TENANT,
    ClientStalled,
    ServerConfig,
    log,
)

__all__ = ["ServerConfig", "create_app", "tenant_of"]


def tenant_of(key: str) -> str:
    """A tenant's name in cache salts: a digest, so the key itself is kept nowhere."""
    return hashlib.sha256(b"blockserve-tenant\0" + key.encode()).hexdigest()[:32]


_OPEN_PATHS = {"/health", "/metrics", "/openapi.json"}


def create_app(scheduler: Scheduler, frontend: TokenizerFrontend, config: ServerConfig) -> web.Application:
    app = web.Application(middlewares=[_errors, _auth],
                          client_max_size=config.limits.max_body_bytes)
    app[SCHEDULER] = scheduler
    app[FRONTEND] = frontend
    app[CONFIG] = config
    app[METRICS] = Metrics(scheduler)
    app[BOUNDS] = Bounds(frontend.vocab_size, config.limits, config.default_max_tokens,
                         config.max_tokens_cap)
    app[WORKERS] = ThreadPoolExecutor(config.parse_workers,
                                      thread_name_prefix="blockserve-parse")
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_post("/v1/completions", openai_api.completions)
    app.router.add_post("/v1/chat/completions/render", openai_api.render_chat)
    app.router.add_post("/v1/completions/render", openai_api.render_completion)
    app.router.add_post("/v1/messages", anthropic_api.messages)
    app.router.add_post("/v1/messages/count_tokens", anthropic_api.count_tokens)
    responses_api.install(app)  # /v1/responses, and its store of recent responses
    app.router.add_get("/v1/models", admin.models)
    app.router.add_get("/health", admin.health)
    app.router.add_get("/metrics", admin.metrics)
    app.router.add_post("/tokenize", openai_api.tokenize)
    app.router.add_post("/detokenize", openai_api.detokenize)
    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, admin.server_info)
    for path in ("/model_info", "/get_model_info"):
        app.router.add_get(path, admin.model_info)
    app.router.add_get("/get_load", admin.get_load)
    app.router.add_get("/v1/cache/stats", admin.cache_stats)
    app.router.add_post("/v1/cache/reset", admin.cache_reset)
    app.router.add_post("/reset_prefix_cache", admin.cache_reset)  # vLLM's name for the same
    openapi.install(app)  # /openapi.json: every route above, read from its parsers

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


@web.middleware
async def _auth(request: web.Request, handler):
    config = request.app[CONFIG]
    keys, admin_key = config.api_keys, config.admin_key
    if (keys or admin_key) and request.path not in _OPEN_PATHS:
        bearer = request.headers.get("Authorization", "")
        given = bearer[7:] if bearer.startswith("Bearer ") else request.headers.get("x-api-key")
        given_bytes = (given or "").encode("utf-8", "replace")
        match = None
        for key in keys:  # every key is compared, in constant time: no early exit
            if hmac.compare_digest(given_bytes, key.encode()):
                match = key
        is_admin = admin_key is not None and hmac.compare_digest(given_bytes,
                                                                 admin_key.encode())
        if match is None and not is_admin and keys:
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY "
                                "or x-api-key: KEY)", code="invalid_api_key")
        request[ADMIN] = is_admin
        if match is not None or (is_admin and keys):
            request[TENANT] = tenant_of(match or admin_key)
    return await handler(request)
