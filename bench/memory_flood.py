"""A flood that needs several times the memory limit (issue 28): N clients at once, each
a distinct prompt and a long greedy reply, against ``blockserve serve`` twice in one
run: once with room to spare (the reference replies), once with ``--memory-limit`` at
the fixed part (weights, runtime, activations: read from the first server) plus a
K/V share that fits 1/``--pressure`` of the flood's K/V (and running K/V capped at it).

It reports every request's status (200, or a 503/429 refusal), the preemptions, the
server's peak resident set (``VmHWM``) and MLX's peak against the limit, and how many
replies equal the reference's. Runs ``python -m blockserve.bench.memory_flood``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from blockserve.bench.compare import _stop, _wait_ready
from blockserve.scheduler.memory import KV_ALLOC_STEP

WORDS = ("block cache token prefix memory limit engine stream batch request reply model "
         "layer head value key query budget evict resume preempt queue tenant").split()


@dataclass
class FloodResult:
    limit_bytes: int
    statuses: Counter = field(default_factory=Counter)
    texts: list[str | None] = field(default_factory=list)
    preemptions: int = 0
    peak_rss_bytes: int = 0
    mlx_peak_bytes: int = 0
    stats: dict = field(default_factory=dict)


def prompts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(words))
            for i in range(n)]


def peak_rss(pid: int) -> int:
    """The process's peak resident set (Linux ``VmHWM``), 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def _one(http, url: str, prompt: str, reply_tokens: int) -> tuple[int, str | None]:
    body = {"prompt": prompt, "max_tokens": reply_tokens, "temperature": 0,
            "ignore_eos": True}
    async with http.post(url + "/v1/completions", json=body) as r:
        data = await r.json()
        return r.status, (data["choices"][0]["text"] if r.status == 200 else None)


async def _stats(http, url: str) -> dict:
    async with http.get(url + "/v1/cache/stats") as r:
        return await r.json()


async def flood(args, limit: int | None, port: int,
                running_cap: int | None = None) -> FloodResult:
    cmd = [sys.executable, "-m", "blockserve.cli", "serve", "--model", args.model,
           "--port", str(port), "--max-num-seqs", str(args.clients), "--log-level",
           "WARNING", "--max-model-len", str(args.max_model_len)]
    if limit is not None:
        cmd += ["--memory-limit", str(limit)]
    if running_cap is not None:
        cmd += ["--active-kv-memory-bytes", str(running_cap)]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd)
    try:
        await _wait_ready(url, proc)
        timeout = aiohttp.ClientTimeout(total=args.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            stats = await _stats(http, url)
            out = await asyncio.gather(*(_one(http, url, p, args.reply_tokens)
                                         for p in prompts(args.clients, args.prompt_words)))
            stats = await _stats(http, url)
        if proc.poll() is not None:
            raise RuntimeError(f"the server died under the flood: exit {proc.returncode}")
        result = FloodResult(stats["memory"]["limit"])
        result.statuses = Counter(status for status, _ in out)
        result.texts = [text for _, text in out]
        result.preemptions = stats["scheduler"]["preemptions"]
        result.peak_rss_bytes = peak_rss(proc.pid)
        result.mlx_peak_bytes = stats["memory"]["mlx_peak"]
        result.stats = stats
        return result
    finally:
        _stop(proc)


async def run(args) -> tuple[FloodResult, FloodResult]:
    free = await flood(args, None, args.port)
    mem = free.stats["memory"]
    fixed = mem["limit"] - mem["kv"]
    positions = args.prompt_words * 2 + args.reply_tokens  # a word is ~1-2 tokens
    steps = -(-positions // KV_ALLOC_STEP)
    demand = args.clients * steps * KV_ALLOC_STEP * mem["kv_per_token"]
    share = int(demand // args.pressure)
    # The fixed part is measured again by the second server, a little differently (the
    # resident set moves by a few hundred KiB from one process to the next): the limit
    # leaves it 2% of slack, and caps running K/V at the share, so the premise holds.
    margin = mem["kv"] - mem["running_kv_limit"]
    limit = int(fixed * 1.02) + margin + share
    pressured = await flood(args, limit, args.port + 1, running_cap=share)
    return free, pressured


def report(free: FloodResult, pressured: FloodResult) -> dict:
    same = sum(a == b for a, b in zip(free.texts, pressured.texts) if b is not None)
    done = pressured.statuses.get(200, 0)
    return {
        "limit_bytes": pressured.limit_bytes,
        "statuses": dict(pressured.statuses),
        "preemptions": pressured.preemptions,
        "identical_replies": f"{same} of {done}",
        "peak_rss_over_limit": round(pressured.peak_rss_bytes / pressured.limit_bytes, 3),
        "mlx_peak_over_limit": round(pressured.mlx_peak_bytes / pressured.limit_bytes, 3),
        "free_run_peak_rss_bytes": free.peak_rss_bytes,
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo:tiny")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--prompt-words", type=int, default=400)
    p.add_argument("--reply-tokens", type=int, default=300)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--pressure", type=float, default=3.0,
                   help="the flood's K/V over the limit's K/V share")
    p.add_argument("--port", type=int, default=8750)
    p.add_argument("--timeout", type=float, default=3600)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(ap)
    args = ap.parse_args(argv)
    free, pressured = asyncio.run(run(args))
    print(json.dumps(report(free, pressured), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
