"""blockserve against ``mlx_lm server``: same model, same machine, one run.

    blockserve compare [--model demo:bench]

Starts each server in turn on 127.0.0.1 (never both at once: they would share the
cores), runs the same seeded workloads against it, stops it, and writes
``bench/results/<name>.{json,md}`` and TTFT CDF plots. Both servers get the system
OpenBLAS: blockserve loads it itself, the peers through LD_PRELOAD. vllm-mlx pins an
older mlx-lm and pulls torch, so it lives in its own venv (``python -m venv v &&
v/bin/pip install vllm-mlx 'mlx[cpu]'``) and is run with ``--continuous-batching`` and
its prefix cache on (its default).

``--blockserve-variants spec=--speculative-lookup,nospec=--no-speculative-lookup`` runs
blockserve once per variant, each with its own server arguments, and reports each variant
against the peers and against the variants after it; ``--workloads edit`` is the edit
workload (a ~1.5K-token file sent back with one change, greedy) alone and 4 at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from blockserve.bench.client import Record
from blockserve.bench.plots import plot_ttft_cdf
from blockserve.bench.goodput import (format_slo, goodput_lines, parse_rates, parse_slo,
                                     sweep_lines)
from blockserve.bench.plots import plot_goodput
from blockserve.bench.run import bench_once, make_target, run_sweep
from blockserve.bench.stats import records_json
from blockserve.bench.tokens import LocalTokenizer
from blockserve.bench.workloads import (
    agent_sessions,
    claude_code_sessions,
    edit_sessions,
    no_sharing,
    overhead_streams,
    shared_prefix,
)
from blockserve.bench.overhead import (
    py_spy_start,
    py_spy_summary,
    split_header,
    split_row,
)

TARGETS = {"ttft_p90_ratio": 0.5, "requests_per_s_ratio": 1.5, "prefill_efficiency": 0.9,
           "edit_decode_ratio": 1.5}


def parse_variants(spec: str) -> list[tuple[str, list[str]]]:
    """``name=args,name=args`` as [(server label, args split as a shell would)], so that
    one compare runs blockserve with and without a flag; empty: plain ``blockserve``."""
    if not spec.strip():
        return [("blockserve", [])]
    out: list[tuple[str, list[str]]] = []
    for part in spec.split(","):
        name, _, extra = part.partition("=")
        name = name.strip()
        label = name if name.startswith("blockserve") else f"blockserve {name}"
        if not name or label in (n for n, _ in out):
            raise argparse.ArgumentTypeError(
                f"blockserve variant {part!r}: want a unique name, then = and its arguments")
        out.append((label, shlex.split(extra)))
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo:bench")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--port", type=int, default=8310, help="first of the servers' ports")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=1024)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=900)
    p.add_argument("--workloads", default="shared-prefix,agent",
                   help="comma list of: shared-prefix, agent, claude-code, cached-prefix, edit")
    p.add_argument("--edit-concurrency", default="1,4",
                   help="edit: comma list of concurrencies, a row each (max(4, c) requests)")
    p.add_argument("--edit-file-tokens", type=int, default=1500,
                   help="edit: each request's source file, in tokens")
    p.add_argument("--edit-output-tokens", type=int, default=400)
    p.add_argument("--blockserve-variants", type=parse_variants, default="",
                   metavar="NAME=ARGS,...",
                   help="run blockserve once per variant with these extra serve arguments, "
                        "e.g. 'spec=--speculative-lookup,nospec=--no-speculative-lookup' "
                        "(default: one plain blockserve); each variant is reported against "
                        "the peers and against the variants after it")
    p.add_argument("--claude-code-tokens", type=int, default=18000,
                   help="claude-code replay: system prompt and 24 tools, in tokens")
    p.add_argument("--claude-code-turns", type=int, default=4)
    p.add_argument("--name", default="compare", help="stem of the result files")
    p.add_argument("--no-peers", action="store_true",
                   help="run only blockserve's variants (e.g. a flag on and off)")
    p.add_argument("--slo", type=parse_slo, default=None, metavar="ttft=2s,itl=300ms,e2e=20s",
                   help="latency targets (any subset of ttft, itl, tpot, e2e; s or ms): "
                        "goodput and the share meeting each target per workload and server")
    p.add_argument("--sweep-rates", type=parse_rates, default=None, metavar="0.5,1,2,4|auto",
                   help="with --slo: a Poisson rate sweep of shared-prefix requests against "
                        "each server; reports goodput at each one's knee (>= 90%% meeting "
                        "the SLO) and the ratio")
    p.add_argument("--sweep-requests", type=int, default=32,
                   help="requests at each rate of the sweep (4 groups)")
    p.add_argument("--overhead-streams", default="1,4,16,32,64",
                   help="overhead: comma list of concurrent greedy streams, a row each")
    p.add_argument("--overhead-tokens", type=int, default=256,
                   help="overhead: tokens each stream generates")
    p.add_argument("--overhead-prompt-tokens", type=int, default=32)
    p.add_argument("--py-spy", type=int, default=0, metavar="STREAMS",
                   help="overhead: sample blockserve with py-spy during this level")
    p.add_argument("--vllm-mlx", metavar="PATH",
                   help="the vllm-mlx executable (its own venv): compare against it too")


def _workloads(args, trim):
    chosen = args.workloads.split(",")
    out = []
    if "shared-prefix" in chosen:
        out.append((shared_prefix(4, 8, args.system_tokens, 32, args.output_tokens, 0, trim),
                    args.concurrency))
    if "agent" in chosen:
        out.append((agent_sessions(4, 4, args.system_tokens, output_tokens=args.output_tokens,
                                   seed=1, trim=trim), 4))
    if "cached-prefix" in chosen:  # one request at a time: a cached 2K prefix + 32 new
        # tokens (the first request caches the prefix), and cold 32-token prompts
        out.append((shared_prefix(1, 5, 2048, 32, 1, seed=4, trim=trim), 1))
        out.append((no_sharing(5, 32, 1, seed=5, trim=trim), 1))
    if "claude-code" in chosen:
        out.append((claude_code_sessions(1, args.claude_code_turns, args.claude_code_tokens,
                                         output_tokens=args.output_tokens, seed=3, trim=trim),
                    1))
    if "edit" in chosen:  # other files at each level: none is in a cache from the last
        for i, c in enumerate(int(x) for x in args.edit_concurrency.split(",")):
            w = edit_sessions(max(4, c), args.edit_file_tokens, args.edit_output_tokens,
                              seed=4 + i, trim=trim)
            w.name = f"edit x{c}"
            out.append((w, c))
    if "overhead" in chosen:  # the near-free model's regime: N streams at once
        for i, c in enumerate(_levels(args)):
            out.append((overhead_streams(c, args.overhead_prompt_tokens, args.overhead_tokens,
                                         seed=6 + i, trim=trim), c))
    return out


def _sweep_workload(args, trim, i: int):
    """The rate sweep's i-th run: one-request sessions (rate = requests/s), other prompts
    at each run so that none is cached from the run before."""
    return shared_prefix(4, max(1, args.sweep_requests // 4), args.system_tokens, 32,
                         args.output_tokens, 100 + i, trim)


def _levels(args) -> list[int]:
    return [int(x) for x in args.overhead_streams.split(",")]


def _max_seqs(args) -> int:
    """Every server's batch size: the concurrency, or the most overhead streams."""
    n = args.concurrency
    if "overhead" in args.workloads.split(","):
        n = max(n, *_levels(args))
    return n


def _server_command(server: str, args, model_path: str | None, port: int,
                    extra: list[str] | None = None
                    ) -> tuple[list[str], str, dict]:
    """(command line, model name to send, environment) of one server; ``extra``: a
    blockserve variant's arguments."""
    env = dict(os.environ)
    n = str(_max_seqs(args))
    if server == "blockserve":
        return ([sys.executable, "-m", "blockserve.cli", "serve", "--model", args.model,
                 "--port", str(port), "--max-num-seqs", n, "--log-level", "WARNING",
                 *(extra or [])], args.model, env)
    # This machine runs MLX anyway (every server does): give the peers the same BLAS.
    from blockserve.engine.runtime.blas import find_openblas

    blas = find_openblas()
    if blas and sys.platform.startswith("linux"):
        env["LD_PRELOAD"] = blas
    if server == "vllm-mlx":
        return ([args.vllm_mlx, "serve", model_path, "--port", str(port),
                 "--continuous-batching", "--max-num-seqs", n, "--prefill-batch-size", n,
                 "--completion-batch-size", n], model_path, env)
    return ([sys.executable, "-m", "mlx_lm.server", "--model", model_path,
             "--port", str(port), "--decode-concurrency", n, "--prompt-concurrency", n,
             "--log-level", "WARNING"], model_path, env)


async def _model_path(url: str) -> str:
    """Where blockserve's model lives (demo ids are built there): mlx_lm loads it too."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/server_info") as r:
            return (await r.json())["model_path"]


async def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                async with http.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} did not become ready")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _row(workload: str, server: str, s: dict) -> str:
    eff = s["prefill_efficiency"]
    return (f"| {workload} | {server} | {s['requests_per_s']:.2f} | "
            f"{s['output_tokens_per_s']:.1f} | {s['ttft_s']['p50']:.2f} | "
            f"{s['ttft_s']['p90']:.2f} | {(s['tpot_s']['p50'] or 0) * 1e3:.0f} | "
            f"{_tps(s['decode_tokens_per_s']['p50'])} | "
            f"{_ms(s['itl_s']['p50'])} | {_ms(s['itl_s']['p99'])} | {_s(s['e2e_s']['mean'])} | "
            f"{_s(s['e2e_s']['p50'])} | {_s(s['e2e_s']['p90'])} | {_s(s['e2e_s']['p99'])} | "
            f"{s['hit_rate']:.2f} | {s['prompt_tokens_computed']} | "
            f"{s['distinct_prefix_tokens']} | {'n/a' if eff is None else f'{eff:.2f}'} | "
            f"{s['errors']} |")


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1e3:.0f}"


def _tps(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def _median_ttft(recs: list, skip_first: bool) -> float | None:
    ttfts = [r.ttft for r in sorted(recs, key=lambda r: r.start)[1 if skip_first else 0:]
             if r.ttft is not None]
    return sorted(ttfts)[len(ttfts) // 2] if ttfts else None


def _cached_prefix_lines(records: dict[str, dict[str, list]], ours: str = "blockserve"
                         ) -> list[str]:
    """The cached-2K-prefix target: its TTFT (the first request, which cached the
    prefix, left out) against a cold 32-token prompt, and against each peer (``ours``:
    the blockserve variant they are set against)."""
    cached = next((v for k, v in records.items() if k.startswith("shared-prefix 1x5")), None)
    cold = next((v for k, v in records.items() if k.startswith("no-sharing")), None)
    if not cached or not cold:
        return []
    out = ["", "Cached 2K-token prefix + 32 new tokens (median TTFT, one request at a time):",
           "", "| server | cold 32 tokens s | cached 2K + 32 s | ratio (target <= 1.5) | "
           f"{ours} / this server |", "|---|---|---|---|---|"]
    mine = _median_ttft(cached.get(ours, []), True)
    for server, recs in cached.items():
        warm, c = _median_ttft(recs, True), _median_ttft(cold.get(server, []), False)
        if warm is None or c is None:
            continue
        vs = f"{mine / warm:.2f}" if mine else "n/a"
        out.append(f"| {server} | {c:.3f} | {warm:.3f} | {warm / c:.2f} | {vs} |")
    return out


def _peer_line(workload: str, mine: str, peer: str, a: dict, b: dict, who: str) -> str:
    """One blockserve variant against one peer, with the targets of its workload."""
    if workload.startswith("edit"):
        return (f"- {workload},{who} against {peer}: decode tok/s p50 ratio "
                f"**{_ratio(a['decode_tokens_per_s']['p50'], b['decode_tokens_per_s']['p50'])}x**"
                f" (target >= {TARGETS['edit_decode_ratio']}x with speculation), mean "
                f"**{_ratio(a['decode_tokens_per_s']['mean'], b['decode_tokens_per_s']['mean'])}x**"
                f", out tok/s ratio "
                f"**{_ratio(a['output_tokens_per_s'], b['output_tokens_per_s'])}x**")
    rps = a["requests_per_s"] / b["requests_per_s"]
    ttft = a["ttft_s"]["p90"] / b["ttft_s"]["p90"]
    p50 = a["ttft_s"]["p50"] / b["ttft_s"]["p50"]
    return (f"- {workload},{who} against {peer}: requests/s ratio **{rps:.2f}x** (target >= "
            f"{TARGETS['requests_per_s_ratio']}x), p50 TTFT ratio **{p50:.2f}** (target "
            f"<= 1), p90 TTFT ratio **{ttft:.2f}** (target <= "
            f"{TARGETS['ttft_p90_ratio']}), {mine} prefill efficiency "
            f"**{a['prefill_efficiency']:.2f}** (target >= "
            f"{TARGETS['prefill_efficiency']}); inter-token p50 ratio "
            f"**{_ratio(a['itl_s']['p50'], b['itl_s']['p50'])}** (target <= 1), p99 "
            f"**{_ratio(a['itl_s']['p99'], b['itl_s']['p99'])}** (target <= 1.5), "
            f"end-to-end p50 **{_ratio(a['e2e_s']['p50'], b['e2e_s']['p50'])}** "
            f"(target <= 0.8)")


def same_outputs(a: list[Record], b: list[Record]) -> tuple[int, int]:
    """(requests whose reply is the same text in both runs, requests both answered):
    greedy replies with and without speculation must match token for token."""
    ta = {(r.session, r.turn): r.text for r in a if r.error is None}
    tb = {(r.session, r.turn): r.text for r in b if r.error is None}
    both = [k for k in ta if k in tb]
    return sum(ta[k] == tb[k] for k in both), len(both)


def _variant_line(workload: str, x: str, y: str, a: dict, b: dict, ra: list, rb: list
                  ) -> str:
    """One blockserve variant against a later one: issue 23's speculation targets
    (decode tok/s, requests/s, the same greedy output)."""
    same, n = same_outputs(ra, rb)
    return (f"- {workload}, {x} against {y}: decode tok/s p50 ratio "
            f"**{_ratio(a['decode_tokens_per_s']['p50'], b['decode_tokens_per_s']['p50'])}x**,"
            f" requests/s ratio **{_ratio(a['requests_per_s'], b['requests_per_s'])}x**, "
            f"same output on **{same} of {n}** requests")


def ratio_lines(results: dict[str, dict[str, dict]], records: dict[str, dict[str, list]],
                ours: list[str], peers: list[str]) -> list[str]:
    """Each blockserve variant against each peer, then against each variant after it."""
    lines = []
    for workload, by_server in results.items():
        for mine in ours:
            who = "" if len(ours) == 1 else f" {mine}"
            for peer in peers:
                a, b = by_server.get(mine), by_server.get(peer)
                if a and b:
                    lines.append(_peer_line(workload, mine, peer, a, b, who))
        for i, x in enumerate(ours):
            for y in ours[i + 1:]:
                if x in by_server and y in by_server:
                    lines.append(_variant_line(workload, x, y, by_server[x], by_server[y],
                                               records[workload][x], records[workload][y]))
    return lines


def overhead_lines(results: dict[str, dict[str, dict]], ours: list[str], peers: list[str],
                   spies: dict[tuple[str, str], list[str]]) -> list[str]:
    """The overhead workload (issue 33): tokens/s and inter-token latency per level,
    each blockserve variant against each peer and the first variant against the
    others; then blockserve's engine step split, and py-spy's samples."""
    levels = [w for w in results if w.startswith("overhead")]
    if not levels:
        return []
    servers = ours + peers
    out = ["", "Overhead (near-free model; greedy streams, all at once):", "",
           "| streams | " + " | ".join(f"{s} tok/s | {s} ITL p50/p99 ms" for s in servers)
           + " |", "|---" * (1 + 2 * len(servers)) + "|"]
    for w in levels:
        cells = []
        for s in servers:
            r = results[w].get(s)
            cells += (["n/a", "n/a"] if r is None else [
                f"{r['output_tokens_per_s']:.0f}",
                f"{_ms(r['itl_s']['p50'])}/{_ms(r['itl_s']['p99'])}"])
        out.append(f"| {w.split('x')[-1]} | " + " | ".join(cells) + " |")
    out.append("")
    for w in levels:
        by = results[w]
        for mine in ours:
            a = by.get(mine)
            if a is None:
                continue
            parts = []
            for other in peers + [o for o in ours if o != mine][:1]:
                b = by.get(other)
                if b:
                    parts.append(f"tok/s {_ratio(a['output_tokens_per_s'], b['output_tokens_per_s'])}x"
                                 f", ITL p50 {_ratio(a['itl_s']['p50'], b['itl_s']['p50'])} "
                                 f"against {other}")
            if parts:
                out.append(f"- {w}, {mine}: " + "; ".join(parts))
    rows = [(w, s, results[w][s]) for w in levels for s in ours
            if "engine_split" in results[w].get(s, {})]
    if rows:
        out += ["", "blockserve's engine step, ms per step by phase (`other`: the engine "
                "thread outside a step: its queue, the GIL):", ""] + split_header()
        for w, s, r in rows:
            out.append(split_row(w, s, r["engine_split"],
                                 int(r["output_tokens_per_s"] * r["wall_s"])))
    for (w, s), table in spies.items():
        if table:
            out += ["", f"py-spy, {w}, {s} (share of CPU samples):", ""] + table
    return out


def _plot_stem(workload: str) -> str:
    """A workload's plot file stem: its kind, and an edit row's concurrency too."""
    kind, _, rest = workload.partition(" ")
    return f"{kind}-{rest}" if kind in ("edit", "overhead") else kind


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict]] = {}
    records: dict[str, dict[str, list]] = {}
    sweeps: dict[str, list[dict]] = {}
    if args.sweep_rates is not None and not args.slo:
        raise SystemExit("--sweep-rates needs --slo (e.g. --slo ttft=2s,itl=300ms,e2e=20s)")
    model_path, tok = None, None
    spies: dict[tuple[str, str], list[str]] = {}
    variants = args.blockserve_variants
    ours = [label for label, _ in variants]
    peers = [] if args.no_peers else ["mlx_lm server"] + (["vllm-mlx"] if args.vllm_mlx
                                                          else [])
    servers = [("blockserve", label, extra) for label, extra in variants] + [
        (peer, peer, []) for peer in peers]
    for i, (kind, server, extra) in enumerate(servers):
        port = args.port + i
        cmd, model_name, env = _server_command(kind, args, model_path, port, extra)
        url = f"http://127.0.0.1:{port}"
        print(f"starting {server}: {' '.join(cmd)}", flush=True)
        proc = subprocess.Popen(cmd, env=env)
        try:
            asyncio.run(_wait_ready(url, proc))
            if model_path is None:
                model_path = asyncio.run(_model_path(url))
                tok = LocalTokenizer(model_path)  # one tokenizer for every server
            target = make_target(url, model_name, tok)
            for workload, concurrency in _workloads(args, tok.trim):
                spy = None
                if (kind == "blockserve" and args.py_spy == concurrency
                        and workload.name.startswith("overhead")):
                    spy_out = str(out / f"{args.name}-{server.replace(' ', '-')}-"
                                  f"x{concurrency}.pyspy.txt")
                    spy = py_spy_start(proc.pid, args.max_seconds, spy_out)
                summary, recs = asyncio.run(bench_once(target, workload, concurrency, None,
                                                       args.max_seconds, 0, slo=args.slo))
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=60)
                    spies[(workload.name, server)] = py_spy_summary(spy_out)
                results.setdefault(workload.name, {})[server] = summary
                records.setdefault(workload.name, {})[server] = recs
                print(f"  {workload.name}: {summary['requests_per_s']:.2f} req/s, "
                      f"TTFT p90 {summary['ttft_s']['p90']:.2f} s, decode p50 "
                      f"{_tps(summary['decode_tokens_per_s']['p50'])} tok/s, "
                      f"efficiency {summary['prefill_efficiency']}")
            if args.sweep_rates is not None:
                sweeps[server], _ = run_sweep(
                    target, lambda i: _sweep_workload(args, tok.trim, i), args.sweep_rates,
                    args.slo, args.max_seconds, 0, label=server)
        finally:
            _stop(proc)
    head = (f"Model `{args.model}`, {platform.machine()} {platform.system()}, "
            f"{os.cpu_count()} cores; concurrency {args.concurrency} (agent: 4 sessions); "
            f"output {args.output_tokens} tokens, greedy.")
    if "edit" in args.workloads.split(","):
        head += (f" Edit: a ~{args.edit_file_tokens}-token file each, "
                 f"{args.edit_output_tokens} output tokens, {args.edit_concurrency} at a time.")
    if "overhead" in args.workloads.split(","):
        head += (f" Overhead: {args.overhead_streams} greedy streams at once, "
                 f"{args.overhead_tokens} tokens each (EOS ends one sooner), every server "
                 f"at most {_max_seqs(args)} sequences.")
    if len(variants) > 1 or variants[0][1]:
        head += " " + "; ".join(f"{label}: `{shlex.join(extra)}`" for label, extra in variants)
        head += "."
    lines = [
        head, "",
        "| workload | server | req/s | out tok/s | TTFT p50 s | TTFT p90 s | TPOT p50 ms | "
        "decode tok/s p50 | ITL p50 ms | ITL p99 ms | e2e mean s | e2e p50 s | e2e p90 s | "
        "e2e p99 s | hit rate | prompt tokens computed | distinct prefix tokens | "
        "prefill efficiency | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for workload, by_server in results.items():
        for server, s in by_server.items():
            lines.append(_row(workload, server, s))
    lines.append("")
    lines += ratio_lines(results, records, ours, peers)
    for workload in results:
        try:
            plot_ttft_cdf(records[workload],
                          str(out / f"{args.name}-{_plot_stem(workload)}-ttft.png"))
        except ImportError:
            pass
    lines += goodput_lines(results)
    lines += sweep_lines(sweeps, args.slo or {}, ours, peers)
    if sweeps:
        try:
            plot_goodput(sweeps, str(out / f"{args.name}-goodput.png"),
                         f"SLO {format_slo(args.slo)}")
        except ImportError:
            pass
    lines += _cached_prefix_lines(records, ours[0])
    lines += overhead_lines(results, ours, peers, spies)
    for workload, by_server in results.items():
        if all(len(s["per_turn"]) > 1 for s in by_server.values()):
            lines += ["", f"Per turn, {workload}:", "",
                      "| turn | server | TTFT p50 s | cached / prompt tokens |", "|---|---|---|---|"]
            for server, s in by_server.items():
                for t, v in sorted(s["per_turn"].items()):
                    lines.append(f"| {t + 1} | {server} | {v['ttft_s']['p50']:.2f} | "
                                 f"{v['cached_tokens']:.0f} / {v['prompt_tokens']:.0f} |")
    table = "\n".join(lines) + "\n"
    (out / f"{args.name}.md").write_text(table)
    (out / f"{args.name}.json").write_text(json.dumps(
        {"variants": {label: extra for label, extra in variants}, "summaries": results,
         "slo": args.slo, "sweeps": sweeps,
         "records": {w: {s: records_json(r) for s, r in by.items()}
                     for w, by in records.items()}}, indent=1))
    print(table)
    return 0
