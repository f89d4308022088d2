"""The asyncio scheduler: queue, admission under budgets, cache-aware order, streams,
aborts. No MLX: it drives a generator through ``scheduler.protocol``."""

from blockserve.scheduler.memory import MemoryBudget
from blockserve.scheduler.protocol import SamplingParams
from blockserve.scheduler.scheduler import (
    MemoryPressureError,
    PromptTooLongError,
    QueueFullError,
    Request,
    RequestOutput,
    RequestStream,
    RequestTooLargeError,
    Scheduler,
    SchedulerClosedError,
    SchedulerConfig,
    SchedulerError,
    SchedulerStats,
    Usage,
)

__all__ = [
    "MemoryBudget",
    "MemoryPressureError",
    "PromptTooLongError",
    "QueueFullError",
    "Request",
    "RequestOutput",
    "RequestStream",
    "RequestTooLargeError",
    "SamplingParams",
    "Scheduler",
    "SchedulerClosedError",
    "SchedulerConfig",
    "SchedulerError",
    "SchedulerStats",
    "Usage",
]
