"""The load generator's client: concurrent streaming chat requests against any
OpenAI-compatible server, closed-loop or Poisson arrivals, one ``Record`` per request.

    blockserve bench --url http://127.0.0.1:8000 --model demo:bench --workload agent
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

from blockserve.bench.workloads import Session, Workload


@dataclass
class Record:
    session: int
    turn: int
    start: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    messages: list[dict] = field(default_factory=list)
    tools: list[dict] | None = None
    prompt_ids: list[int] = field(default_factory=list)  # rendered after the run
    error: str | None = None
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)


# Content chunks arriving within this of the previous arrival are the same arrival: a
# draft's tokens sent as several chunks in one write, or read in one go, are ONE gap.
BURST_S = 0.001


def record_stream(rec: Record, t0: float, events: list[tuple[float, dict]]) -> None:
    """Fill ``rec`` from (arrival time, parsed chunk) pairs of one chat stream.

    ``itl`` holds the gaps between arrivals of content: several tokens in one chunk (a
    speculative draft) are one arrival, and so are chunks that arrive together (the same
    network read, or within ``BURST_S``): no zero-length gaps are recorded."""
    last = None
    text = []
    for t, chunk in events:
        if chunk.get("usage"):
            u = chunk["usage"]
            rec.prompt_tokens = u.get("prompt_tokens", 0)
            rec.completion_tokens = u.get("completion_tokens", 0)
            rec.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                if last is None:
                    rec.ttft = t - t0
                elif t - last >= BURST_S:
                    rec.itl.append(t - last)
                last = t
                text.append(content)
    rec.text = "".join(text)
    if events:
        rec.e2e = events[-1][0] - t0


@dataclass
class Target:
    url: str
    model: str
    api_key: str | None = None  # sent as Authorization: Bearer
    # Prompt token ids of a request's messages, for the prefix trie. Called after the
    # run, on a worker thread, so that it may ask the server itself and costs no TTFT.
    render: Callable[[list[dict], list[dict] | None], list[int]] | None = None


async def _one(http: aiohttp.ClientSession, target: Target, session: Session, s_idx: int,
               turn: int, records: list[Record]) -> None:
    msgs = session.messages_for(turn)
    rec = Record(s_idx, turn, messages=msgs, tools=session.tools)
    body = {"model": target.model, "messages": msgs, "stream": True,
            "temperature": session.turns[turn].temperature,
            "max_tokens": session.turns[turn].max_tokens,
            "stream_options": {"include_usage": True}}
    if session.tools:
        body["tools"] = session.tools
    rec.start = time.perf_counter()
    events: list[tuple[float, dict]] = []
    try:
        async with http.post(target.url + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                rec.error = f"HTTP {r.status}: {(await r.text())[:200]}"
            else:
                # one arrival time per network read: its events arrived together
                buf = b""
                async for data in r.content.iter_any():
                    now = time.perf_counter()
                    buf += data
                    *lines, buf = buf.split(b"\n")
                    for raw in lines:
                        line = raw.decode().strip()
                        if line.startswith("data:") and line[5:].strip() != "[DONE]":
                            events.append((now, json.loads(line[5:])))
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    record_stream(rec, rec.start, events)
    if not events and rec.error is None:
        rec.error = "empty stream"
    records.append(rec)
    session.record_reply(turn, rec.text)


async def run_workload(target: Target, workload: Workload, concurrency: int | None = 8,
                       rate: float | None = None, max_seconds: float = 600,
                       seed: int = 0, progress: bool = True) -> tuple[list[Record], float]:
    """Run every session (turns in order) with at most ``concurrency`` sessions at once
    (closed loop), or starting sessions as a Poisson process of ``rate`` per second
    (open loop). Stops starting new work after ``max_seconds``."""
    records: list[Record] = []
    rng = random.Random(seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=workload.num_requests, desc=workload.name, unit="req", leave=False)
    deadline = time.perf_counter() + max_seconds
    timeout = aiohttp.ClientTimeout(total=max_seconds)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:

        async def run_session(i: int, s: Session) -> None:
            for turn in range(len(s.turns)):
                if time.perf_counter() > deadline:
                    return
                await _one(http, target, s, i, turn, records)
                if bar:
                    bar.update(1)

        t0 = time.perf_counter()
        if rate is None:
            todo = list(enumerate(workload.sessions))
            todo.reverse()

            async def client() -> None:
                while todo and time.perf_counter() < deadline:
                    await run_session(*todo.pop())

            await asyncio.gather(*(client() for _ in range(concurrency or 1)))
        else:
            tasks = []
            for i, s in enumerate(workload.sessions):
                if i:  # no wait after the last arrival: it is not part of the run
                    await asyncio.sleep(rng.expovariate(rate))
                if time.perf_counter() > deadline:
                    break
                tasks.append(asyncio.create_task(run_session(i, s)))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    if bar:
        bar.close()
    if target.render:
        for rec in records:
            rec.prompt_ids = await asyncio.to_thread(target.render, rec.messages, rec.tools)
    return records, wall


async def scrape(url: str) -> dict[str, float]:
    """The target's Prometheus metrics ({} if it has none)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(url + "/metrics") as r:
                if r.status != 200:
                    return {}
                text = await r.text()
    except aiohttp.ClientError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


