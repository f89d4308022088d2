"""Run the real server on 127.0.0.1 (a free port) around a shared engine worker."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from blockserve.engine.text.frontend import TokenizerFrontend
from blockserve.engine.runtime.worker import EngineWorker
from blockserve.scheduler import Scheduler
from blockserve.stack import StackConfig, build_stack


@dataclass
class Served:
    url: str
    scheduler: Scheduler
    frontend: TokenizerFrontend


@contextlib.asynccontextmanager
async def serve(worker: EngineWorker, **config):
    """``config``: ``StackConfig`` fields; the default max_tokens is 16 here."""
    config = StackConfig(**{"block_size": worker.block_size,
                            "max_num_seqs": worker.max_running,
                            "kv_cache_memory_bytes": 256 << 20, "default_max_tokens": 16,
                            **config})
    stack = build_stack(config, worker)
    runner = web.AppRunner(stack.app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Served(f"http://127.0.0.1:{port}", stack.scheduler, stack.frontend)
    finally:
        await runner.cleanup()


async def metrics(url) -> dict[str, float]:
    """The server's Prometheus metrics, as {series: value}."""
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            text = await r.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@contextlib.asynccontextmanager
async def serve_scripted(tokenizer, model: str, scripts: list[str], *, max_context: int = 4096,
                         token_delay: float = 0.0, default_max_tokens: int = 64,
                         api_keys: tuple[str, ...] = (), **config):
    """The real app on a scripted generator (``tests.fakes.ScriptedGenerator``): replies
    are ``scripts`` in turn, tokenized by ``tokenizer``; ``config``: ``SchedulerConfig``
    fields. Yields (url, generator, scheduler, frontend); checks nothing stays pinned."""
    from blockserve.engine.models.loader import resolve
    from blockserve.kvpool import BlockPool
    from blockserve.scheduler import SchedulerConfig
    from blockserve.server.app import ServerConfig, create_app
    from tests.fakes import ScriptedGenerator

    gen = ScriptedGenerator(block_size=16, tokenizer=tokenizer, scripts=list(scripts),
                            token_delay=token_delay, max_context=max_context)
    sched = Scheduler(gen, BlockPool(16, 256 << 20), SchedulerConfig(**config))
    frontend = TokenizerFrontend([model], tokenizer, resolve(model)[1])
    app = create_app(sched, frontend, ServerConfig(default_max_tokens, list(api_keys)))
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", gen, sched, frontend
    finally:
        await runner.cleanup()
    assert sched.pool.stats().blocks_pinned == 0 and gen.active == 0
