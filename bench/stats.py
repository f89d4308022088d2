"""Summaries of a load-generator run, with vLLM ``bench serve``'s metric definitions.

TTFT is the time to the first content chunk; ITL the gaps between arrivals of content
(tokens arriving together, e.g. a speculative draft, are one gap: ``client.record_stream``);
TPOT (e2e - TTFT) / (output tokens - 1); decode tokens/s its inverse, per request (the rate
that speculative decoding raises, prefill left out); prefill efficiency the distinct prefix
tokens of the workload (a token trie of the rendered prompts) over the prompt tokens the
server actually computed (from its /metrics when it exposes blockserve's, else prompt - cached
tokens from ``usage``).
"""

from __future__ import annotations

from dataclasses import asdict

from blockserve.bench.client import Record
from blockserve.bench.goodput import goodput


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


def latency_stats(xs: list[float]) -> dict[str, float | None]:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}

    def q(p: float) -> float:
        k = (len(xs) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"mean": sum(xs) / len(xs), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def decode_tokens_per_s(r: Record) -> float | None:
    """Tokens a second after the first, (output tokens - 1) / (e2e - TTFT): the decode
    rate, which speculation raises, without the prefill."""
    if r.e2e is None or r.ttft is None or r.completion_tokens < 2 or r.e2e <= r.ttft:
        return None
    return (r.completion_tokens - 1) / (r.e2e - r.ttft)


COMPUTED_METRIC = "blockserve_prompt_tokens_computed_total"


def summarize(records: list[Record], wall: float, before: dict | None = None,
              after: dict | None = None, slo: dict[str, float] | None = None) -> dict:
    """The run's figures; with ``slo`` ({key: seconds}, see ``goodput.parse_slo``) also
    ``goodput``: attainment, good requests per second, share meeting each target."""
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
        "decode_tokens_per_s": latency_stats([decode_tokens_per_s(r) for r in ok]),
        "itl_s": latency_stats([x for r in ok for x in r.itl]),
        "e2e_s": latency_stats([r.e2e for r in ok]),
        "prompt_tokens": prompt, "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "prompt_tokens_computed": computed, "computed_from": source,
        "distinct_prefix_tokens": distinct,
        "prefill_efficiency": distinct / computed if distinct and computed > 0 else None,
        "per_turn": per_turn(ok),
        "goodput": goodput(records, wall, slo) if slo else None,
    }


def per_turn(records: list[Record]) -> dict[int, dict]:
    """TTFT and prompt / cached tokens by turn of a session (agent replays)."""
    out = {}
    for turn in sorted({r.turn for r in records}):
        rs = [r for r in records if r.turn == turn]
        out[turn] = {"requests": len(rs), "ttft_s": latency_stats([r.ttft for r in rs]),
                     "prompt_tokens": sum(r.prompt_tokens for r in rs) / len(rs),
                     "cached_tokens": sum(r.cached_tokens for r in rs) / len(rs)}
    return out


def records_json(records: list[Record]) -> list[dict]:
    out = []
    for r in records:
        d = asdict(r)
        d.pop("prompt_ids")
        d.pop("messages")
        d.pop("tools")
        d["tpot"] = r.tpot
        d["decode_tokens_per_s"] = decode_tokens_per_s(r)
        out.append(d)
    return out


