"""Keepalive for streams: a long prefill sends nothing for minutes, and clients (and
proxies) give up on a silent connection."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, TypeVar

T = TypeVar("T")

# Seconds of silence before a stream sends a keepalive (Responses: response.in_progress,
# Anthropic: a ping event, OpenAI chat: an SSE comment). Read at each request.
INTERVAL_S = 10.0


async def with_idle_ticks(source: AsyncIterator[T], interval: float
                          ) -> AsyncIterator[T | None]:
    """``source``'s items, and a ``None`` after each ``interval`` seconds without one.
    The source is never cancelled by a tick (only when the consumer stops)."""
    it = source.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending  # let the source unwind (its finally frees the request)
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(RuntimeError):
                await aclose()
