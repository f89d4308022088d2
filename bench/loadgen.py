"""A load generator for any OpenAI-compatible server: concurrent streaming clients,
closed-loop or Poisson arrivals, vLLM ``bench serve`` metric definitions.

    blockserve bench --url http://127.0.0.1:8000 --model demo:bench --workload agent

TTFT is the time to the first content chunk; ITL the gaps between content chunks;
TPOT (e2e - TTFT) / (output tokens - 1); prefill efficiency the distinct prefix tokens
of the workload (a token trie of the rendered prompts, client-side) over the prompt
tokens the server actually computed (from its /metrics when it exposes blockserve's,
else prompt - cached tokens from ``usage``).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import aiohttp

from bench.workloads import Session, Workload


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
    prompt_ids: list[int] = field(default_factory=list)
    error: str | None = None
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)


def record_stream(rec: Record, t0: float, events: list[tuple[float, dict]]) -> None:
    """Fill ``rec`` from (arrival time, parsed chunk) pairs of one chat stream."""
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
                else:
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
    render: Callable[[list[dict]], list[int]] | None = None  # prompt token ids, for tries


async def _one(http: aiohttp.ClientSession, target: Target, session: Session, s_idx: int,
               turn: int, records: list[Record]) -> None:
    msgs = session.messages_for(turn)
    rec = Record(s_idx, turn)
    if target.render:
        rec.prompt_ids = target.render(msgs)
    body = {"model": target.model, "messages": msgs, "stream": True, "temperature": 0,
            "max_tokens": session.turns[turn].max_tokens,
            "stream_options": {"include_usage": True}}
    rec.start = time.perf_counter()
    events: list[tuple[float, dict]] = []
    try:
        async with http.post(target.url + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                rec.error = f"HTTP {r.status}: {(await r.text())[:200]}"
            else:
                async for raw in r.content:
                    line = raw.decode().strip()
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        events.append((time.perf_counter(), json.loads(line[5:])))
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
    async with aiohttp.ClientSession(timeout=timeout) as http:

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
                if time.perf_counter() > deadline:
                    break
                tasks.append(asyncio.create_task(run_session(i, s)))
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    if bar:
        bar.close()
    return records, wall


def distinct_prefix_tokens(prompts: list[list[int]]) -> int:
    """Nodes of the token trie of all prompts: what an ideal prefix cache prefills."""
    root: dict = {}
    count = 0
    for p in prompts:
        node = root
        for t in p:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                count += 1
            node = nxt
    return count


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


def latency_stats(xs: list[float]) -> dict[str, float | None]:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}

    def q(p: float) -> float:
        k = (len(xs) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"mean": sum(xs) / len(xs), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


COMPUTED_METRIC = "blockserve_prompt_tokens_computed_total"


def summarize(records: list[Record], wall: float, before: dict | None = None,
              after: dict | None = None) -> dict:
    ok = [r for r in records if r.error is None]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    computed = prompt - cached
    source = "usage"
    if before is not None and after is not None and COMPUTED_METRIC in after:
        computed = int(after[COMPUTED_METRIC] - before.get(COMPUTED_METRIC, 0))
        source = "metrics"
    distinct = distinct_prefix_tokens([r.prompt_ids for r in ok]) if all(
        r.prompt_ids for r in ok) and ok else None
    return {
        "requests": len(records), "errors": len(records) - len(ok), "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "output_tokens_per_s": sum(r.completion_tokens for r in ok) / wall if wall else 0.0,
        "ttft_s": latency_stats([r.ttft for r in ok]),
        "tpot_s": latency_stats([r.tpot for r in ok]),
        "itl_s": latency_stats([x for r in ok for x in r.itl]),
        "e2e_s": latency_stats([r.e2e for r in ok]),
        "prompt_tokens": prompt, "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "prompt_tokens_computed": computed, "computed_from": source,
        "distinct_prefix_tokens": distinct,
        "prefill_efficiency": distinct / computed if distinct and computed > 0 else None,
    }


def records_json(records: list[Record]) -> list[dict]:
    out = []
    for r in records:
        d = asdict(r)
        d.pop("prompt_ids")
        d["tpot"] = r.tpot
        out.append(d)
    return out


def _axes(title: str, xlabel: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, ax, path: str) -> None:
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttft_cdf(series: dict[str, list[Record]], path: str) -> None:
    plt, fig, ax = _axes("Time to first token, CDF", "TTFT (s)", "fraction of requests")
    for label, recs in series.items():
        xs = sorted(r.ttft for r in recs if r.ttft is not None)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    _save(plt, fig, ax, path)


def plot_sweep(points: dict[str, list[tuple[int, float]]], path: str) -> None:
    plt, fig, ax = _axes("Throughput against concurrency", "concurrency", "output tokens / s")
    for label, pts in points.items():
        ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=label)
    _save(plt, fig, ax, path)
