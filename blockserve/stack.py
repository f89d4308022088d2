"""The composition root: one config in; engine, pool, scheduler, frontend and app out.

The command line, the test harnesses and the in-process benchmark all build here, so
the sizes the parts share (block size, running sequences, context limit) are set once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import blockserve.engine.runtime  # noqa: F401  (first: the BLAS preload before mlx)
from aiohttp import web

from blockserve.engine.text.frontend import TokenizerFrontend
from blockserve.engine.runtime import memory
from blockserve.engine.runtime.worker import EngineWorker
from blockserve.kvpool import BlockPool, DiskTier, PrefixCache
from blockserve.scheduler import MemoryBudget, Scheduler, SchedulerConfig
from blockserve.server.app import ServerConfig, create_app
from blockserve.server.limits import Limits


@dataclass
class StackConfig:
    """Everything ``blockserve serve`` can be told; names follow its flags."""

    model: str | None = None  # None: the built-in default model
    revision: str | None = None
    block_size: int = 16
    # The one limit on what the process holds (weights, runtime, activations, K/V);
    # None: ``engine.runtime.memory.default_memory_limit()``.
    memory_limit: int | None = None
    kv_cache_memory_bytes: int | None = None  # a cap on the prefix cache, inside the limit
    active_kv_memory_bytes: int | None = None  # a cap on running requests' K/V, likewise
    max_num_seqs: int = 16
    max_queue: int = 256
    max_model_len: int | None = None  # None: the model's own context length
    prefill_step_size: int = 256
    prompt_concurrency: int | None = None  # None: by device (engine.worker)
    token_budget: int = 64  # tokens a step while streams decode (engine.runner)
    runner: str = "auto"  # "ragged" | "batch" | "auto" (engine.worker)
    speculative_lookup: bool = True  # prompt-lookup drafts (engine.lookup, ragged runner)
    default_max_tokens: int | None = None  # None: what the context allows
    max_tokens_cap: int | None = None  # --max-tokens
    api_keys: list[str] = field(default_factory=list)  # each one a tenant
    admin_key: str | None = None  # flushes and sees the whole cache
    share_inflight: bool = True
    schedule_order: str = "finish"  # which waiting request goes first (scheduler.ORDERS)
    served_model_names: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    stalled_stream_timeout: float = 60.0
    disk_cache_dir: str | None = None  # None: no disk tier
    disk_cache_bytes: int | None = None  # None: min(10% of the free space, 32 GiB)


def start_worker(config: StackConfig) -> EngineWorker:
    """Load the model on its engine thread, sized by ``config``."""
    return EngineWorker(config.model, block_size=config.block_size,
                        max_running=config.max_num_seqs,
                        prefill_batch_size=config.prompt_concurrency,
                        prefill_step_size=config.prefill_step_size, revision=config.revision,
                        runner=config.runner, token_budget=config.token_budget,
                        speculative=config.speculative_lookup)


@dataclass
class Stack:
    config: StackConfig
    worker: EngineWorker
    pool: BlockPool
    prefix: PrefixCache
    scheduler: Scheduler
    frontend: TokenizerFrontend

    def close_cache(self) -> None:
        """Stop the prefix cache's threads; with a disk tier, first write the RAM
        blocks that are not on disk yet, so a restart finds the whole cache."""
        self.prefix.close(spill=True)

    def app(self) -> web.Application:
        c = self.config
        return create_app(self.scheduler, self.frontend, ServerConfig(
            c.default_max_tokens, c.api_keys, c.admin_key, c.limits,
            c.stalled_stream_timeout, max_tokens_cap=c.max_tokens_cap))


def memory_budget(config: StackConfig, worker: EngineWorker, max_context: int
                  ) -> MemoryBudget:
    """Split the limit with what the engine measured; refuse one that leaves no K/V."""
    m = worker.memory
    # What the process holds besides the weights now that everything is loaded (the
    # tokenizer's grammar tables too), not only what the engine saw after its load.
    baseline = max(memory.resident_bytes() - m.weights_bytes, m.baseline_bytes)
    activations = worker.activation_reserve(max_context)
    # Freed buffers MLX keeps serve the next step's activations: as many as one step.
    memory.set_buffer_cache_limit(activations)
    budget = MemoryBudget(
        limit_bytes=config.memory_limit or memory.default_memory_limit(),
        weights_bytes=m.weights_bytes, baseline_bytes=baseline,
        activation_bytes=activations, buffer_cache_bytes=activations,
        kv_bytes_per_token=worker.kv_bytes_per_token, step_tokens=worker.step_tokens,
        cache_cap_bytes=config.kv_cache_memory_bytes,
        running_cap_bytes=config.active_kv_memory_bytes)
    if budget.running_limit_bytes < budget.sequence_bytes(0):
        fixed = budget.limit_bytes - budget.kv_bytes + budget.margin_bytes
        raise ValueError(
            f"--memory-limit {budget.limit_bytes} bytes leaves no room for K/V: the "
            f"weights, runtime, a step's activations and one step's K/V take {fixed} "
            f"bytes ({budget.describe()})")
    return budget


def build_stack(config: StackConfig, worker: EngineWorker | None = None) -> Stack:
    """Wire the parts. ``worker`` reuses a loaded engine (tests share one between
    servers); it must match the config's block size and hold its running sequences."""
    if worker is None:
        worker = start_worker(config)
    if worker.block_size != config.block_size:
        raise ValueError(f"the engine uses block size {worker.block_size}, the config "
                         f"{config.block_size}")
    if worker.max_running < config.max_num_seqs:
        raise ValueError(f"the engine runs at most {worker.max_running} sequences, the "
                         f"config asks for {config.max_num_seqs}")
    max_prompt = min(config.max_model_len or worker.max_context, worker.max_context)
    budget = memory_budget(config, worker, max_prompt)
    pool = BlockPool(config.block_size, budget.cache_budget(0))
    disk = None
    if config.disk_cache_dir is not None:
        disk = DiskTier(config.disk_cache_dir, worker.block_codec(), config.block_size,
                        config.disk_cache_bytes)
    prefix = PrefixCache(pool, disk, share_inflight=config.share_inflight)
    scheduler = Scheduler(worker, prefix, SchedulerConfig(
        max_running=config.max_num_seqs, max_queue=config.max_queue,
        max_prompt_tokens=config.max_model_len,
        memory=budget, footprint=memory.resident_bytes,
        share_inflight=config.share_inflight, order=config.schedule_order,
        # Several tenants: one slot no tenant can take, so another's request starts at once.
        tenant_headroom=1 if len(config.api_keys) > 1 else 0))
    names = config.served_model_names or [worker.loaded.model_id]
    frontend = TokenizerFrontend(names, worker.tokenizer, worker.loaded.model_path,
                                 worker.grammars, worker.vocab_size)
    return Stack(config, worker, pool, prefix, scheduler, frontend)
