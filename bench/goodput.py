"""Goodput: the requests that meet their latency targets (an SLO), per second.

    blockserve bench --slo ttft=2s,itl=0.3s,e2e=20s --sweep-rates 0.5,1,2,4

Definitions (vLLM ``bench serve --goodput``, DistServe): a request is *good* when every
given target holds for that request's own values:

- ``ttft``: its time to first content chunk;
- ``tpot``: its (e2e - TTFT) / (output tokens - 1), vLLM's per-request TPOT;
- ``e2e`` (vLLM's ``e2el``): its end-to-end latency;
- ``itl``: its **largest** inter-token gap (vLLM's goodput has no ITL key; we take the
  per-request maximum: every gap of the stream within the target, so one stall fails it).
  Tokens arriving together (a speculative draft in one chunk, or chunks within
  ``client.BURST_S`` of each other) are one gap, see ``client.record_stream``. A request
  with one arrival has no gap and meets any ``itl`` target.

A request that failed (HTTP error, empty stream) meets no target. Attainment = good
requests / all requests; goodput = good requests / wall seconds of the run (vLLM's
``request_goodput``). The knee of a rate sweep is the highest arrival rate with
attainment >= 90% below the lowest rate that misses it (a noisy pass above a miss does
not count).
"""

from __future__ import annotations

import argparse
import re

from blockserve.bench.client import Record

SLO_KEYS = ("ttft", "itl", "tpot", "e2e")
ALIASES = {"e2el": "e2e"}  # vLLM's name
KNEE_ATTAINMENT = 0.9
_VALUE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s)\s*$")


def parse_slo(spec: str) -> dict[str, float]:
    """``ttft=2s,itl=300ms,e2e=20s`` (any subset of ttft, itl, tpot, e2e; ``:`` works for
    ``=``) as {key: seconds}. Raises ``argparse.ArgumentTypeError`` with the reason."""
    out: dict[str, float] = {}
    if not spec or not spec.strip():
        raise argparse.ArgumentTypeError("empty SLO: want e.g. ttft=2s,itl=300ms,e2e=20s")
    for part in spec.split(","):
        key, sep, value = part.replace(":", "=", 1).partition("=")
        key = ALIASES.get(key.strip().lower(), key.strip().lower())
        if not sep:
            raise argparse.ArgumentTypeError(
                f"SLO target {part.strip()!r}: want KEY=VALUE, e.g. ttft=2s")
        if key not in SLO_KEYS:
            raise argparse.ArgumentTypeError(
                f"SLO target {key!r}: unknown, want one of {', '.join(SLO_KEYS)}")
        if key in out:
            raise argparse.ArgumentTypeError(f"SLO target {key!r} given twice")
        m = _VALUE.match(value)
        if not m:
            raise argparse.ArgumentTypeError(
                f"SLO target {key}={value.strip()!r}: want a positive number with a unit, "
                f"s or ms (e.g. {key}=2s or {key}=300ms)")
        seconds = float(m.group(1)) * (1e-3 if m.group(2) == "ms" else 1.0)
        if seconds <= 0:
            raise argparse.ArgumentTypeError(f"SLO target {key}={value.strip()}: must be > 0")
        out[key] = seconds
    return out


def format_slo(slo: dict[str, float]) -> str:
    return ",".join(f"{k}={v * 1e3:g}ms" if v < 1 else f"{k}={v:g}s" for k, v in slo.items())


def request_values(r: Record) -> dict[str, float | None]:
    """The per-request values an SLO is judged on (None: not measured)."""
    return {"ttft": r.ttft, "itl": max(r.itl) if r.itl else 0.0, "tpot": r.tpot,
            "e2e": r.e2e}


def meets(r: Record, slo: dict[str, float]) -> dict[str, bool]:
    """Which targets of ``slo`` request ``r`` meets. A failed request meets none; a
    missing TPOT (one output token) meets a tpot target, as it has no decode."""
    if r.error is not None or r.e2e is None:
        return {k: False for k in slo}
    vals = request_values(r)
    out = {}
    for k, target in slo.items():
        v = vals[k]
        out[k] = (v is None and k == "tpot") or (v is not None and v <= target)
    return out


def goodput(records: list[Record], wall: float, slo: dict[str, float]) -> dict:
    """Attainment, goodput and the share of requests meeting each target."""
    n = len(records)
    per = [meets(r, slo) for r in records]
    good = sum(all(m.values()) for m in per)
    return {"slo": dict(slo), "good_requests": good,
            "attainment": good / n if n else 0.0,
            "goodput_per_s": good / wall if wall else 0.0,
            "share_meeting": {k: (sum(m[k] for m in per) / n if n else 0.0) for k in slo}}


def find_knee(points: list[tuple[float, float]], threshold: float = KNEE_ATTAINMENT
              ) -> float | None:
    """The highest rate whose attainment is >= ``threshold`` with every lower rate's too:
    (rate, attainment) pairs in any order; None when the lowest rate misses already."""
    knee = None
    for rate, att in sorted(points):
        if att < threshold:
            break
        knee = rate
    return knee


def next_auto_rate(points: list[tuple[float, float]], start: float = 0.5,
                   bisect_steps: int = 3, threshold: float = KNEE_ATTAINMENT
                   ) -> float | None:
    """``--sweep auto``: the next rate to run given the (rate, attainment) pairs so far,
    or None when done. Doubles from ``start`` until a rate misses ``threshold``, then
    bisects between the knee and that rate ``bisect_steps`` times; when ``start`` misses
    already, halves down (at most ``bisect_steps`` times) to find a passing rate."""
    if not points:
        return start
    passing = [r for r, a in points if a >= threshold]
    failing = [r for r, a in points if a < threshold]
    if not failing:
        return max(passing) * 2
    lo_fail = min(failing)
    knee = find_knee(points, threshold)
    if knee is None:  # even the lowest rate missed: go down
        halvings = sum(1 for r in failing if r < start)
        return lo_fail / 2 if halvings < bisect_steps else None
    # bisection steps: the runs after the first failure above the knee
    first_fail_run = next(i for i, (r, a) in enumerate(points) if a < threshold)
    if len(points) - 1 - first_fail_run >= bisect_steps:
        return None
    return (knee + lo_fail) / 2


def parse_rates(spec: str) -> list[float] | str:
    """``--sweep-rates 0.5,1,2,4`` (ascending or not) or ``auto``."""
    if spec.strip().lower() == "auto":
        return "auto"
    try:
        rates = sorted({float(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sweep-rates {spec!r}: want a comma list of requests/s, or auto") from None
    if not rates or rates[0] <= 0:
        raise argparse.ArgumentTypeError(f"--sweep-rates {spec!r}: want rates > 0")
    return rates


def sweep_point(rate: float, summary: dict) -> dict:
    """One rate of a sweep, for the JSON, the table and the plot."""
    g = summary["goodput"]

    def q(key: str) -> dict:
        s = summary[key]
        return {"p50": s["p50"], "p90": s["p90"]}

    return {"rate": rate, "attainment": g["attainment"], "goodput_per_s": g["goodput_per_s"],
            "share_meeting": g["share_meeting"], "requests": summary["requests"],
            "errors": summary["errors"], "wall_s": summary["wall_s"],
            "ttft_s": q("ttft_s"), "itl_s": q("itl_s"), "e2e_s": q("e2e_s")}


def knee_of(points: list[dict], threshold: float = KNEE_ATTAINMENT) -> dict | None:
    """The sweep point at the knee (None when no rate meets the threshold)."""
    rate = find_knee([(p["rate"], p["attainment"]) for p in points], threshold)
    return next((p for p in points if p["rate"] == rate), None)


def _above(points: list[dict], knee: dict) -> str:
    """A warning when the knee is the highest rate run: the real one lies above it."""
    if knee["rate"] >= max(p["rate"] for p in points):
        return " (the highest rate run: the knee lies above, add higher rates)"
    return ""


def format_sweep(points: list[dict], label: str = "") -> str:
    """A text table of a sweep and its knee line."""
    head = f"rate sweep{f' ({label})' if label else ''}:"
    lines = [head, "  rate/s  attain  goodput/s  TTFT p50/p90 s   ITL p50/p90 ms  "
                   "e2e p50/p90 s  errors"]

    def f(x, scale=1.0, fmt="{:.2f}"):
        return "n/a" if x is None else fmt.format(x * scale)

    for p in sorted(points, key=lambda p: p["rate"]):
        lines.append(
            f"  {p['rate']:6.3g}  {p['attainment']:6.2f}  {p['goodput_per_s']:9.3f}  "
            f"{f(p['ttft_s']['p50'])}/{f(p['ttft_s']['p90'])}  "
            f"{f(p['itl_s']['p50'], 1e3, '{:.0f}')}/{f(p['itl_s']['p90'], 1e3, '{:.0f}')}  "
            f"{f(p['e2e_s']['p50'])}/{f(p['e2e_s']['p90'])}  {p['errors']}")
    k = knee_of(points)
    lines.append("  knee: none (no rate reaches 90% attainment)" if k is None else
                 f"  knee: {k['rate']:g} req/s, goodput {k['goodput_per_s']:.3f} req/s "
                 f"(attainment {k['attainment']:.2f}){_above(points, k)}")
    return "\n".join(lines)


GOODPUT_KNEE_RATIO = 1.5  # issue 31: blockserve's goodput at the knee against mlx_lm's


def goodput_lines(results: dict[str, dict[str, dict]]) -> list[str]:
    """compare: per workload and server, the SLO's attainment, goodput and share meeting
    each target (summaries made with an ``slo``)."""
    rows = [(w, srv, s["goodput"]) for w, by in results.items() for srv, s in by.items()
            if s.get("goodput")]
    if not rows:
        return []
    keys = list(rows[0][2]["slo"])
    out = ["", f"SLO {format_slo(rows[0][2]['slo'])} (itl: a request's largest gap):", "",
           "| workload | server | attainment | goodput req/s | "
           + " | ".join(f"meeting {k}" for k in keys) + " |",
           "|---|---|---|---|" + "---|" * len(keys)]
    for w, srv, g in rows:
        out.append(f"| {w} | {srv} | {g['attainment']:.2f} | {g['goodput_per_s']:.3f} | "
                   + " | ".join(f"{g['share_meeting'][k]:.2f}" for k in keys) + " |")
    return out


def sweep_lines(sweeps: dict[str, list[dict]], slo: dict[str, float], ours: list[str],
                peers: list[str]) -> list[str]:
    """compare: each server's rate sweep, goodput at its knee, and each blockserve
    variant's knee goodput against each peer's."""
    if not sweeps:
        return []
    out = ["", f"Rate sweep (Poisson arrivals, shared-prefix), SLO {format_slo(slo)}; "
               f"the knee is the highest rate with >= {KNEE_ATTAINMENT:.0%} meeting it:", "",
           "| server | rate req/s | attainment | goodput req/s | TTFT p50 / p90 s | "
           "ITL p50 / p90 ms | e2e p50 / p90 s | errors |", "|---|---|---|---|---|---|---|---|"]

    def f(x, scale=1.0, fmt="{:.2f}"):
        return "n/a" if x is None else fmt.format(x * scale)

    for srv, pts in sweeps.items():
        for p in pts:
            out.append(f"| {srv} | {p['rate']:g} | {p['attainment']:.2f} | "
                       f"{p['goodput_per_s']:.3f} | {f(p['ttft_s']['p50'])} / "
                       f"{f(p['ttft_s']['p90'])} | {f(p['itl_s']['p50'], 1e3, '{:.0f}')} / "
                       f"{f(p['itl_s']['p90'], 1e3, '{:.0f}')} | {f(p['e2e_s']['p50'])} / "
                       f"{f(p['e2e_s']['p90'])} | {p['errors']} |")
    out.append("")
    knees = {srv: knee_of(pts) for srv, pts in sweeps.items()}
    for srv, k in knees.items():
        out.append(f"- {srv}: " + ("no rate reaches the knee" if k is None else
                                   f"knee {k['rate']:g} req/s, goodput at the knee "
                                   f"**{k['goodput_per_s']:.3f} req/s**"
                                   f"{_above(sweeps[srv], k)}"))
    for mine in ours:
        for peer in peers:
            a, b = knees.get(mine), knees.get(peer)
            if mine not in knees or peer not in knees:
                continue
            ga = a["goodput_per_s"] if a else 0.0
            gb = b["goodput_per_s"] if b else 0.0
            ratio = f"{ga / gb:.2f}x" if gb else ("inf" if ga else "n/a")
            out.append(f"- {mine} against {peer}: goodput at the knee ratio **{ratio}** "
                       f"(target >= {GOODPUT_KNEE_RATIO}x)")
    return out
