"""``blockserve bench``: run a seeded workload against a server and write the results.

Writes ``<out>/<name>.json`` (every request and the summary) and PNG plots: the TTFT
CDF, and throughput against concurrency when ``--concurrency`` lists several values.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import urllib.request
from pathlib import Path
from typing import Callable

from blockserve.bench.client import Target, run_workload, scrape
from blockserve.bench.goodput import (format_slo, format_sweep, knee_of, next_auto_rate,
                                     parse_rates, parse_slo, sweep_point)
from blockserve.bench.overhead import step_split
from blockserve.bench.plots import plot_goodput, plot_sweep, plot_ttft_cdf
from blockserve.bench.stats import records_json, summarize
from blockserve.bench.tokens import BenchTokenizer, open_tokenizer
from blockserve.bench.workloads import WORKLOADS, Workload


def served_model(url: str, api_key: str | None = None) -> str:
    """The first model a server lists at /v1/models (any OpenAI-compatible server)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    req = urllib.request.Request(url.rstrip("/") + "/v1/models", headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def make_target(url: str, model: str, tok: BenchTokenizer, api_key: str | None = None
                ) -> Target:
    return Target(url.rstrip("/"), model, api_key, tok.render)


def build_workload(args: argparse.Namespace, tok: BenchTokenizer) -> Workload:
    trim = tok.trim
    if args.workload == "shared-prefix":
        return WORKLOADS[args.workload](args.groups, args.prompts_per_group, args.system_tokens,
                                        args.question_tokens, args.output_tokens, args.seed,
                                        trim)
    if args.workload == "agent":
        return WORKLOADS[args.workload](args.sessions, args.turns, args.system_tokens,
                                        output_tokens=args.output_tokens, seed=args.seed,
                                        trim=trim)
    if args.workload == "claude-code":
        return WORKLOADS[args.workload](args.sessions, args.turns, args.system_tokens,
                                        tools=args.tools, output_tokens=args.output_tokens,
                                        seed=args.seed, trim=trim)
    # no-sharing; edit: --prompt-tokens is the size of each request's source file
    return WORKLOADS[args.workload](args.requests, args.prompt_tokens, args.output_tokens,
                                    args.seed, trim)


async def bench_once(target: Target, workload: Workload, concurrency: int | None,
                     rate: float | None, max_seconds: float, seed: int,
                     progress: bool = True, slo: dict[str, float] | None = None
                     ) -> tuple[dict, list]:
    before = await scrape(target.url)
    records, wall = await run_workload(target, workload, concurrency, rate, max_seconds,
                                       seed, progress)
    after = await scrape(target.url)
    summary = summarize(records, wall, before, after, slo)
    split = step_split(before, after, wall)  # blockserve's engine step, by phase
    if split is not None:
        summary["engine_split"] = split
    return summary, records


def run_sweep(target: Target, make_workload: Callable[[int], Workload], rates: list[float] | str,
              slo: dict[str, float], max_seconds: float, seed: int, progress: bool = True,
              start: float = 0.5, bisect_steps: int = 3, label: str = ""
              ) -> tuple[list[dict], dict[float, list]]:
    """Poisson arrivals at each rate (a fresh workload each), or ``auto`` (doubling, then
    bisecting: ``goodput.next_auto_rate``): the sweep points and each rate's records.
    ``make_workload(i)`` builds the i-th run's workload: give each its own seed, or the
    prefix cache would hold the whole prompts of the runs before."""
    points: list[dict] = []
    records: dict[float, list] = {}
    todo = list(rates) if rates != "auto" else []
    while True:
        if rates == "auto":
            rate = next_auto_rate([(p["rate"], p["attainment"]) for p in points], start,
                                  bisect_steps)
        else:
            rate = todo.pop(0) if todo else None
        if rate is None:
            break
        summary, recs = asyncio.run(bench_once(target, make_workload(len(points)), None, rate,
                                               max_seconds, seed, progress, slo))
        p = sweep_point(rate, summary)
        points.append(p)
        records[rate] = recs
        print(f"  {label + ', ' if label else ''}rate {rate:g}/s: attainment "
              f"{p['attainment']:.2f}, goodput {p['goodput_per_s']:.3f} req/s, "
              f"{summary['errors']} errors", flush=True)
    return sorted(points, key=lambda p: p["rate"]), records


def format_turns(s: dict) -> str:
    """One line per turn of a session: TTFT and cached / prompt tokens."""
    return "\n".join(
        f"  turn {t + 1}: TTFT p50 {v['ttft_s']['p50'] or 0:.3f} s, cached "
        f"{v['cached_tokens']:.0f} of {v['prompt_tokens']:.0f} prompt tokens"
        for t, v in sorted(s["per_turn"].items()))


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1e3:.0f}"


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def format_latency(s: dict) -> str:
    """Inter-token p50/p90/p99 and end-to-end mean/p50/p90/p99."""
    i, e = s["itl_s"], s["e2e_s"]
    return (f"  ITL p50 {_ms(i['p50'])} ms p90 {_ms(i['p90'])} ms p99 {_ms(i['p99'])} ms | "
            f"e2e mean {_s(e['mean'])} s p50 {_s(e['p50'])} s p90 {_s(e['p90'])} s "
            f"p99 {_s(e['p99'])} s")


def format_goodput(s: dict) -> str:
    g = s["goodput"]
    share = ", ".join(f"{k} {v:.2f}" for k, v in g["share_meeting"].items())
    return (f"  SLO {format_slo(g['slo'])}: {g['good_requests']} of {s['requests']} requests "
            f"meet it (attainment {g['attainment']:.2f}), goodput {g['goodput_per_s']:.3f} "
            f"req/s | share meeting each: {share}")


def format_summary(name: str, s: dict) -> str:
    eff = s["prefill_efficiency"]
    lines = [format_latency(s)] + ([format_goodput(s)] if s.get("goodput") else [])
    return "\n".join([_first_line(name, s, eff)] + lines)


def _first_line(name: str, s: dict, eff: float | None) -> str:
    return (f"{name}: {s['requests']} requests ({s['errors']} errors) in {s['wall_s']:.1f} s | "
            f"{s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} out tok/s | "
            f"TTFT p50 {s['ttft_s']['p50'] or 0:.3f} s p90 {s['ttft_s']['p90'] or 0:.3f} s | "
            f"TPOT p50 {(s['tpot_s']['p50'] or 0) * 1e3:.0f} ms, decode p50 "
            f"{s['decode_tokens_per_s']['p50'] or 0:.1f} tok/s | hit rate {s['hit_rate']:.2f} | "
            f"prefill efficiency {'n/a' if eff is None else f'{eff:.2f}'} "
            f"({s['prompt_tokens_computed']} computed, from {s['computed_from']})")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None,
                   help="model name to send (default: the first of the server's /v1/models)")
    p.add_argument("--tokenizer", default=None,
                   help="a local Hugging Face tokenizer directory (default: the server's "
                        "/tokenize and /detokenize endpoints, which blockserve serves)")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="shared-prefix")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--prompts-per-group", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=1024,
                   help="system prompt (claude-code: system prompt and tools) in tokens; "
                        "Claude Code's is ~18000")
    p.add_argument("--tools", type=int, default=24, help="tools (claude-code)")
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--requests", type=int, default=32, help="requests (no-sharing, edit)")
    p.add_argument("--prompt-tokens", type=int, default=512,
                   help="prompt (no-sharing) or source file (edit) in tokens; the issue's "
                        "edit runs are --requests 4 --prompt-tokens 1500 --output-tokens 400")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", default="8",
                   help="closed-loop concurrency; a comma list sweeps it")
    p.add_argument("--rate", type=float, default=None,
                   help="open loop: Poisson arrivals, sessions per second")
    p.add_argument("--slo", type=parse_slo, default=None, metavar="ttft=2s,itl=300ms,e2e=20s",
                   help="latency targets (any subset of ttft, itl, tpot, e2e; units s or ms): "
                        "report goodput, the requests meeting every target per second, and "
                        "the share meeting each; itl is a request's largest gap")
    p.add_argument("--sweep-rates", type=parse_rates, default=None, metavar="0.5,1,2,4|auto",
                   help="with --slo: Poisson arrivals at each rate (requests/s; auto: "
                        "double from --sweep-start until attainment < 90%%, then bisect "
                        "--sweep-bisect times); reports the knee, the highest rate with "
                        ">= 90%% of requests meeting the SLO, and plots <name>-goodput.png")
    p.add_argument("--sweep-start", type=float, default=0.5, help="auto sweep's first rate")
    p.add_argument("--sweep-bisect", type=int, default=3, help="auto sweep's bisections")
    p.add_argument("--max-seconds", type=float, default=600)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default=None, help="file name stem (default: the workload)")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.model is None:
        args.model = served_model(args.url, args.api_key)
    tok = open_tokenizer(args.url, args.tokenizer, args.model, args.api_key)
    target = make_target(args.url, args.model, tok, args.api_key)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or args.workload
    if args.sweep_rates is not None:
        return sweep_main(args, tok, target, out, stem)
    levels = [None] if args.rate else [int(c) for c in args.concurrency.split(",")]
    runs, sweep = [], []
    for c in levels:
        workload = build_workload(args, tok)  # fresh sessions (histories) per level
        summary, records = asyncio.run(bench_once(target, workload, c, args.rate,
                                                  args.max_seconds, args.seed,
                                                  not args.no_progress, args.slo))
        label = f"rate {args.rate}/s" if args.rate else f"concurrency {c}"
        print(format_summary(f"{workload.name}, {label}", summary))
        if len(summary["per_turn"]) > 1:
            print(format_turns(summary))
        runs.append({"concurrency": c, "rate": args.rate, "summary": summary,
                     "records": records_json(records)})
        sweep.append((c, summary["output_tokens_per_s"], records, label))
    (out / f"{stem}.json").write_text(json.dumps(
        {"url": args.url, "model": args.model, "workload": args.workload, "seed": args.seed,
         "runs": runs}, indent=1))
    try:
        plot_ttft_cdf({label: recs for _, _, recs, label in sweep}, str(out / f"{stem}-ttft.png"))
        if len(sweep) > 1:
            plot_sweep({args.model: [(c, v) for c, v, _, _ in sweep]},
                       str(out / f"{stem}-sweep.png"))
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
    print(f"wrote {os.path.join(args.out, stem)}.json")
    return 0


def sweep_main(args: argparse.Namespace, tok: BenchTokenizer, target: Target, out: Path,
               stem: str) -> int:
    """``--sweep-rates``: the rate sweep, its knee, ``<stem>.json`` and the plot."""
    if not args.slo:
        raise SystemExit("--sweep-rates needs --slo (e.g. --slo ttft=2s,itl=300ms,e2e=20s): "
                         "the knee is where 90% of requests meet it")
    def make(i: int) -> Workload:  # other prompts at each rate: none cached from the last
        return build_workload(argparse.Namespace(**{**vars(args), "seed": args.seed + 1000 * i}),
                              tok)

    points, records = run_sweep(target, make, args.sweep_rates,
                                args.slo, args.max_seconds, args.seed, not args.no_progress,
                                args.sweep_start, args.sweep_bisect)
    print(f"{args.workload}, SLO {format_slo(args.slo)}")
    print(format_sweep(points))
    (out / f"{stem}.json").write_text(json.dumps(
        {"url": args.url, "model": args.model, "workload": args.workload, "seed": args.seed,
         "slo": args.slo, "sweep": points, "knee": knee_of(points),
         "records": {str(r): records_json(v) for r, v in records.items()}}, indent=1))
    try:
        plot_goodput({args.model: points}, str(out / f"{stem}-goodput.png"),
                     f"SLO {format_slo(args.slo)}")
        print(f"wrote {os.path.join(args.out, stem)}-goodput.png")
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
    print(f"wrote {os.path.join(args.out, stem)}.json")
    return 0
