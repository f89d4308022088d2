"""Run the real server on 127.0.0.1 (a free port) around a shared engine worker."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from aiohttp import web

from engine.frontend import TokenizerFrontend
from engine.worker import EngineWorker
from kvpool import BlockPool
from scheduler import Scheduler, SchedulerConfig
from server.app import ServerConfig, create_app


@dataclass
class Served:
    url: str
    scheduler: Scheduler
    frontend: TokenizerFrontend


@contextlib.asynccontextmanager
async def serve(worker: EngineWorker, api_key: str | None = None, max_model_len=None,
                **config):
    pool = BlockPool(worker.block_size, 256 << 20)
    sched = Scheduler(worker, pool, SchedulerConfig(max_prompt_tokens=max_model_len,
                                                    **config))
    frontend = TokenizerFrontend(worker.loaded.model_id, worker.tokenizer,
                                 max_model_len or worker.max_context)
    app = create_app(sched, frontend, ServerConfig(default_max_tokens=16, api_key=api_key))
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Served(f"http://127.0.0.1:{port}", sched, frontend)
    finally:
        await runner.cleanup()
