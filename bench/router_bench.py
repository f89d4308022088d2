"""Cache-aware routing against round-robin: N blockserve replicas behind vllm-router.

    python -m blockserve.bench.router_bench [--model demo:tiny] [--replicas 2,4]

For each replica count and policy, in one run: start the replicas and the router on
127.0.0.1, run the seeded shared-prefix workload through the router, and report the hit
rate, prefill efficiency and TTFT. On one machine the replicas share its cores, so this
shows where requests go and what they hit, not a throughput gain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from blockserve.bench.client import run_workload
from blockserve.bench.run import make_target
from blockserve.bench.stats import summarize
from blockserve.bench.tokens import LocalTokenizer
from blockserve.bench.workloads import shared_prefix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    """Until ``url`` answers 200; fails early if ``proc``, the server, exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read()[-2000:] if proc.stdout else ""
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {out}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not come up")


def stop(*procs: subprocess.Popen) -> None:
    """SIGTERM (a replica drains), then wait; kill what doesn't end."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(model: str, replicas: int, policy: str, groups: int, per_group: int,
        system_tokens: int) -> dict:
    router = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    procs, urls = [], []
    try:
        for _ in range(replicas):
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "blockserve.cli", "serve", "--model", model, "--port",
                 str(port), "--log-level", "WARNING"], stdout=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_ready(url + "/health")
        port = free_port()
        procs.append(subprocess.Popen([router, "--host", "127.0.0.1", "--port", str(port),
                                       "--policy", policy, "--worker-urls", *urls],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_ready(f"http://127.0.0.1:{port}/v1/models")
        with urllib.request.urlopen(urls[0] + "/server_info") as r:
            tok = LocalTokenizer(json.loads(r.read())["model_path"])
        workload = shared_prefix(groups, per_group, system_tokens, 32, 16, seed=0,
                                 trim=tok.trim)
        target = make_target(f"http://127.0.0.1:{port}", model, tok)
        # From usage, not /metrics: through the router, /metrics is one replica's.
        records, wall = asyncio.run(run_workload(target, workload, replicas * 2, None, 900,
                                                 0, progress=False))
        return summarize(records, wall)
    finally:
        stop(*procs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo:tiny")
    ap.add_argument("--replicas", default="2,4")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--prompts-per-group", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=1024)
    args = ap.parse_args(argv)
    print(f"| replicas | policy | hit rate | prefill efficiency | TTFT p50 s | TTFT p90 s | "
          f"req/s | errors |\n|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.replicas.split(",")):
        for policy in ("cache_aware", "round_robin"):
            s = run(args.model, n, policy, args.groups, args.prompts_per_group,
                    args.system_tokens)
            eff = s["prefill_efficiency"]
            print(f"| {n} | {policy} | {s['hit_rate']:.2f} | "
                  f"{'n/a' if eff is None else f'{eff:.2f}'} | {s['ttft_s']['p50']:.2f} | "
                  f"{s['ttft_s']['p90']:.2f} | {s['requests_per_s']:.2f} | {s['errors']} |",
                  flush=True)


if __name__ == "__main__":
    main()
