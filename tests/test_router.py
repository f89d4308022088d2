"""Replicas behind an existing prefix-aware router: two blockserve processes on a tiny
demo model and vllm-router (a pip wheel) in front, as ``scripts/replicas.sh`` runs
them. cache_aware keeps each prefix group on one replica, so its later requests hit;
round_robin, in the same run, hits less. A killed replica doesn't fail the service, and
a replica draining on SIGTERM finishes the stream it is serving."""

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from blockserve.bench.router_bench import free_port, stop, wait_ready
from tests.server_harness import metrics

ROUTER = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
MODEL = "demo:tiny"
WORDS = "file code value list tool agent cache block model token reply read write".split()


@pytest.fixture(scope="module")
def replicas():
    procs, urls = [], []
    for _ in range(2):
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "blockserve.cli", "serve", "--model", MODEL, "--port",
             str(port), "--drain-timeout", "60", "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        urls.append(f"http://127.0.0.1:{port}")
    for proc, url in zip(procs, urls):
        wait_ready(url + "/health", proc)
    yield procs, urls
    stop(*procs)


def router(urls: list[str], policy: str) -> tuple[subprocess.Popen, str]:
    if not os.path.exists(ROUTER):
        pytest.skip("vllm-router is not installed (pip install vllm-router)")
    port = free_port()
    proc = subprocess.Popen([ROUTER, "--host", "127.0.0.1", "--port", str(port), "--policy",
                             policy, "--worker-urls", *urls, "--health-check-interval-secs",
                             "1", "--health-failure-threshold", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/v1/models", proc)
    return proc, url


def groups(seed: int, n_groups: int = 4, per_group: int = 4) -> list[tuple[int, list[dict]]]:
    """(group, messages) in a shuffled arrival order; each group shares a system prompt."""
    rng = random.Random(seed)
    systems = [" ".join(rng.choice(WORDS) for _ in range(160)) for _ in range(n_groups)]
    reqs = [(g, [{"role": "system", "content": f"Group {g}. {systems[g]}"},
                 {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(12))}])
            for g in range(n_groups) for _ in range(per_group)]
    first = [next(r for r in reqs if r[0] == g) for g in range(n_groups)]
    rest = [r for r in reqs if r not in first]
    rng.shuffle(rest)
    return first + rest  # each group's first request goes first, as a cold start


async def chat(http: aiohttp.ClientSession, url: str, messages: list[dict],
               max_tokens: int = 4) -> dict:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0}
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def run_groups(url: str, seed: int) -> tuple[dict[int, list[int]], float]:
    """Cached tokens of each group's requests (in order), and the overall hit rate."""
    reqs = groups(seed)
    cached: dict[int, list[int]] = {}
    prompt = hit = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        first = [await chat(http, url, m) for _, m in reqs[:4]]  # cold starts, one by one
        rest = []
        for i in range(4, len(reqs), 4):  # then four at a time, mixed groups
            rest += await asyncio.gather(*(chat(http, url, m) for _, m in reqs[i:i + 4]))
    for (g, _), r in zip(reqs, first + rest):
        u = r["usage"]
        cached.setdefault(g, []).append(u["prompt_tokens_details"]["cached_tokens"])
        prompt += u["prompt_tokens"]
        hit += u["prompt_tokens_details"]["cached_tokens"]
    return cached, hit / prompt


async def test_cache_aware_routing_keeps_groups_and_beats_round_robin(replicas):
    _, urls = replicas
    results = {}
    for policy, seed in (("cache_aware", 1), ("round_robin", 2)):
        proc, url = router(urls, policy)
        try:
            results[policy] = await run_groups(url, seed)
        finally:
            stop(proc)
    aware, aware_hit = results["cache_aware"]
    _, rr_hit = results["round_robin"]
    for g, values in aware.items():
        assert values[0] == 0, (g, values)  # a cold start
        assert all(v > 0 for v in values[1:]), (g, values)  # later requests hit
    assert aware_hit > rr_hit, (aware_hit, rr_hit)


async def until_unhealthy(http, router_url: str, worker: str, timeout: float = 60) -> None:
    """Until the router marks ``worker`` unhealthy (its ``/workers`` list)."""
    end = asyncio.get_running_loop().time() + timeout
    while True:
        async with http.get(router_url + "/workers") as r:
            workers = {w["url"]: w for w in (await r.json())["workers"]}
        if not workers[worker]["is_healthy"]:
            return
        assert asyncio.get_running_loop().time() < end, f"{worker} still looks healthy"
        await asyncio.sleep(0.1)


async def test_a_killed_replica_does_not_fail_the_service(tmp_path):
    procs, urls = [], []
    for _ in range(2):
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "blockserve.cli", "serve", "--model", MODEL, "--port",
             str(port), "--log-level", "WARNING"], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
        urls.append(f"http://127.0.0.1:{port}")
    for proc, url in zip(procs, urls):
        wait_ready(url + "/health", proc)
    proc_r, url = router(urls, "cache_aware")
    try:
        reqs = groups(3)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            for _, m in reqs[:4]:
                await chat(http, url, m)
            # Kill the replica that served (and caches) those groups: cache_aware would
            # send their later requests to it.
            served = [sum(v for k, v in (await metrics(u)).items()
                          if k.startswith("blockserve_requests_total")) for u in urls]
            dead = served.index(max(served))
            assert served[dead] > 0
            procs[dead].kill()  # no drain: gone, mid-service
            procs[dead].wait()
            await until_unhealthy(http, url, urls[dead])  # the router's health check saw it
            for _, m in reqs[4:12]:
                r = await chat(http, url, m)
                assert r["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        stop(proc_r)
        stop(*procs)


async def test_a_draining_replica_finishes_its_stream_through_the_router(replicas):
    procs, urls = replicas
    proc_r, url = router(urls[:1], "cache_aware")
    try:
        # 2000 tokens: seconds of streaming, so the drain has a stream to finish (the
        # replica's load, read after the signal, says so).
        body = {"model": MODEL, "stream": True, "max_tokens": 2000, "ignore_eos": True,
                "messages": groups(4)[0][1]}
        finish = None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            async with http.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                first = True
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    if first:
                        procs[0].send_signal(signal.SIGTERM)  # drain, mid-stream
                        first = False
                        async with http.get(urls[0] + "/get_load") as load:
                            assert (await load.json())["num_running_reqs"] == 1, \
                                "the stream ended before the replica was told to drain"
                    chunk = json.loads(line[5:])
                    for c in chunk.get("choices") or []:
                        finish = c.get("finish_reason") or finish
        assert finish == "length"
        assert procs[0].wait(60) == 0
    finally:
        stop(proc_r)
