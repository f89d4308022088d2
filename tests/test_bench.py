"""The load generator: metric definitions, workload determinism, and a short run."""

import argparse
import ast
import asyncio
import re

import pytest

from blockserve.bench.client import Record, record_stream, run_workload, scrape
from blockserve.bench.run import bench_once, format_summary, make_target
from blockserve.bench.stats import decode_tokens_per_s, distinct_prefix_tokens, records_json, \
    summarize
from blockserve.bench.tokens import ServerTokenizer
from blockserve.bench.workloads import agent_sessions, claude_code_sessions, edit_sessions, \
    no_sharing, shared_prefix
from blockserve.engine.runtime.worker import EngineWorker
from tests.server_harness import serve


def chunk(text=None, usage=None):
    c = {"choices": [{"delta": {"content": text}}] if text is not None else []}
    if usage:
        c["usage"] = usage
    return c


def test_metrics_from_a_recorded_stream():
    t0 = 100.0
    events = [(100.1, chunk("")),  # the role chunk: no content, not a token
              (100.5, chunk("a")), (100.7, chunk("b")), (101.2, chunk("c")),
              (101.3, chunk(usage={"prompt_tokens": 50, "completion_tokens": 3,
                                   "prompt_tokens_details": {"cached_tokens": 32}}))]
    rec = Record(0, 0)
    record_stream(rec, t0, events)
    assert rec.ttft == pytest.approx(0.5)
    assert rec.itl == pytest.approx([0.2, 0.5])
    assert rec.e2e == pytest.approx(1.3)
    assert rec.tpot == pytest.approx((1.3 - 0.5) / 2)
    assert (rec.prompt_tokens, rec.cached_tokens, rec.completion_tokens) == (50, 32, 3)
    assert rec.text == "abc"
    other = Record(1, 0, ttft=1.5, e2e=2.0, prompt_tokens=50, completion_tokens=1,
                   prompt_ids=[1, 2, 3, 9])
    rec.prompt_ids = [1, 2, 3, 4]
    bad = Record(2, 0, error="HTTP 500")
    s = summarize([rec, other, bad], wall=2.0)
    assert s["requests"] == 3 and s["errors"] == 1
    assert s["requests_per_s"] == 1.0 and s["output_tokens_per_s"] == 2.0
    assert s["ttft_s"]["mean"] == pytest.approx(1.0)
    assert s["ttft_s"]["p50"] == pytest.approx(1.0)
    assert s["ttft_s"]["p90"] == pytest.approx(1.4)
    assert s["hit_rate"] == pytest.approx(32 / 100)
    assert s["prompt_tokens_computed"] == 68 and s["computed_from"] == "usage"
    assert s["distinct_prefix_tokens"] == 5
    assert s["prefill_efficiency"] == pytest.approx(5 / 68)
    # /metrics deltas win over usage when the target exposes them.
    s = summarize([rec, other], 2.0, {"blockserve_prompt_tokens_computed_total": 10},
                  {"blockserve_prompt_tokens_computed_total": 15})
    assert s["prompt_tokens_computed"] == 5 and s["computed_from"] == "metrics"


def test_distinct_prefix_tokens_is_the_trie_size():
    assert distinct_prefix_tokens([[1, 2, 3], [1, 2, 4], [1, 2, 3], [5]]) == 5
    assert distinct_prefix_tokens([]) == 0


def _shape(w):
    return [(s.system, [t.message["content"] for t in s.turns], s.group) for s in w.sessions]


@pytest.mark.parametrize("make", [shared_prefix, agent_sessions, no_sharing])
def test_workloads_are_deterministic_for_a_seed(make):
    assert _shape(make(seed=3)) == _shape(make(seed=3))
    assert _shape(make(seed=3)) != _shape(make(seed=4))


def test_shared_prefix_groups_share_their_system_prompt():
    w = shared_prefix(groups=3, prompts_per_group=4, system_tokens=20, seed=0)
    assert w.num_requests == 12
    systems = {}
    for s in w.sessions:
        systems.setdefault(s.group, set()).add(s.system)
    assert all(len(v) == 1 for v in systems.values()) and len(systems) == 3


@pytest.fixture(scope="module")
def worker():
    w = EngineWorker("demo:tiny", block_size=16, max_running=8)
    yield w
    w.close()


async def test_a_short_end_to_end_bench_run(worker):
    async with serve(worker) as srv:
        tok = ServerTokenizer(srv.url)  # the server's /tokenize: blocking, so off the loop
        target = make_target(srv.url, "demo:tiny", tok)
        w = await asyncio.to_thread(
            shared_prefix, groups=2, prompts_per_group=3, system_tokens=80,
            question_tokens=8, output_tokens=4, seed=0, trim=tok.trim)
        summary, records = await bench_once(target, w, 3, None, 60, 0, progress=False)
        assert summary["errors"] == 0 and summary["requests"] == 6
        assert all(r.ttft is not None and r.completion_tokens == 4 for r in records)
        assert summary["computed_from"] == "metrics"
        assert summary["hit_rate"] > 0.3
        assert 0.5 < summary["prefill_efficiency"] <= 1.2
        agent = await asyncio.to_thread(agent_sessions, sessions=2, turns=3,
                                        system_tokens=60, output_tokens=4, seed=1,
                                        trim=tok.trim)
        recs, wall = await run_workload(target, agent, 2, None, 60, 0, progress=False)
        assert len(recs) == 6 and all(r.error is None for r in recs)
        later = [r for r in recs if r.turn > 0]
        assert all(r.cached_tokens > 0 for r in later)
        split = summary["engine_split"]  # the engine's step, by phase, from /metrics
        assert split["steps"] > 0 and split["ms"]["eval"] > 0 and split["ms"]["step"] > 0
        assert (await scrape(srv.url))["blockserve_requests_running"] == 0
        assert await scrape("http://127.0.0.1:9") == {}  # nothing there: no metrics


def test_claude_code_replay_sends_the_trace_not_the_reply():
    w = claude_code_sessions(sessions=1, turns=3, system_tokens=400, tools=3, tool_tokens=40,
                             result_tokens=20, seed=0)
    assert _shape(w) == _shape(claude_code_sessions(sessions=1, turns=3, system_tokens=400,
                                                    tools=3, tool_tokens=40,
                                                    result_tokens=20, seed=0))
    (s,) = w.sessions
    assert len(s.tools) == 3 and s.tools[0]["function"]["name"] == "Read"
    first = s.messages_for(0)
    assert [m["role"] for m in first] == ["system", "user"]
    s.record_reply(0, "the server's own words")
    second = s.messages_for(1)
    assert [m["role"] for m in second] == ["system", "user", "assistant", "tool"]
    call = second[2]["tool_calls"][0]
    assert second[3]["tool_call_id"] == call["id"] and "the server's" not in str(second)
    s.record_reply(1, "again")
    s.record_reply(2, "last reply")
    assert s.history[-1] == {"role": "assistant", "content": "last reply"}


async def test_a_short_claude_code_replay(worker):
    async with serve(worker) as srv:
        tok = ServerTokenizer(srv.url)
        w = await asyncio.to_thread(claude_code_sessions, sessions=1, turns=3,
                                    system_tokens=600, tools=4, tool_tokens=60,
                                    result_tokens=30, output_tokens=4, trim=tok.trim)
        summary, records = await bench_once(make_target(srv.url, "demo:tiny", tok), w, 1,
                                            None, 60, 0, progress=False)
        assert summary["errors"] == 0 and summary["requests"] == 3
        turns = summary["per_turn"]
        # Later turns hit the system prompt, the tools and the earlier turns.
        assert turns[1]["cached_tokens"] >= turns[0]["prompt_tokens"] - 16
        assert turns[2]["cached_tokens"] >= turns[1]["prompt_tokens"] - 16
        assert summary["prefill_efficiency"] > 0.9


def test_the_cached_prefix_target_leaves_out_the_request_that_cached_it():
    from blockserve.bench.compare import _cached_prefix_lines

    def recs(*ttfts):
        return [Record(i, 0, start=float(i), ttft=t) for i, t in enumerate(ttfts)]
    lines = _cached_prefix_lines({
        "shared-prefix 1x5": {"blockserve": recs(9.0, 0.3, 0.2, 0.3, 0.4),
                              "mlx_lm server": recs(9.0, 0.6, 0.6, 0.5, 0.6)},
        "no-sharing x5": {"blockserve": recs(0.2, 0.2, 0.1, 0.2, 0.2),
                          "mlx_lm server": recs(0.1, 0.1, 0.1, 0.1, 0.1)}})
    rows = {ln.split(" | ")[0].strip("| "): ln.split(" | ")[1:] for ln in lines
            if ln.startswith("| ") and not ln.startswith("| server |")}
    assert rows["blockserve"][:3] == ["0.200", "0.300", "1.50"]
    assert rows["mlx_lm server"][:3] == ["0.100", "0.600", "6.00"]
    assert rows["mlx_lm server"][3].startswith("0.50")


def _chunks(text, n):
    """A simple tokenizer's trim: the first n whitespace-separated chunks, spacing kept."""
    return "".join(re.findall(r"\s*\S+", text)[:n])


def test_the_edit_workload_sends_distinct_python_files_of_about_n_tokens_greedy():
    w = edit_sessions(requests=4, file_tokens=600, output_tokens=100, seed=7, trim=_chunks)
    assert _shape(w) == _shape(edit_sessions(4, 600, 100, seed=7, trim=_chunks))
    assert _shape(w) != _shape(edit_sessions(4, 600, 100, seed=8, trim=_chunks))
    assert w.name == "edit x4" and w.num_requests == 4
    files = []
    for s in w.sessions:
        (turn,) = s.turns
        assert s.system is None and turn.temperature == 0 and turn.max_tokens == 100
        text = turn.message["content"]
        src = text.split("```python\n")[1].split("```")[0]
        ast.parse(src)  # whole top-level blocks, so the file is valid Python
        assert 0.8 * 600 <= len(re.findall(r"\S+", src)) <= 600
        assert src.count("def ") >= 5 and src.count("    return ") >= 5  # code, repeating
        old, new = re.search(r"rename the function `(\w+)` to `(\w+)`", text).groups()
        assert src.index(f"def {old}(") < len(src) // 2 and new not in src
        files.append(src)
    assert len(set(files)) == 4
    # Without a tokenizer the file is cut by an estimate (a word or a symbol a token).
    assert 1000 < len(edit_sessions(1).sessions[0].turns[0].message["content"]) // 3 < 2500


def test_decode_tokens_per_s_leaves_the_prefill_out():
    fast = Record(0, 0, ttft=2.0, e2e=4.0, completion_tokens=401)  # 400 tokens in 2 s
    slow = Record(1, 0, ttft=0.5, e2e=10.5, completion_tokens=101)  # 100 tokens in 10 s
    one = Record(2, 0, ttft=1.0, e2e=1.0, completion_tokens=1)  # no decode: left out
    assert decode_tokens_per_s(fast) == pytest.approx(200.0)
    assert decode_tokens_per_s(one) is None
    s = summarize([fast, slow, one], wall=10.5)
    assert s["decode_tokens_per_s"]["mean"] == pytest.approx(105.0)
    assert s["decode_tokens_per_s"]["p50"] == pytest.approx(105.0)
    assert s["output_tokens_per_s"] == pytest.approx(503 / 10.5)
    assert records_json([fast])[0]["decode_tokens_per_s"] == pytest.approx(200.0)
    assert "decode p50 105.0 tok/s" in format_summary("edit", s)


def test_blockserve_variants_become_servers_with_their_own_arguments():
    from blockserve.bench.compare import _server_command, _workloads, add_args, parse_variants

    assert parse_variants("") == [("blockserve", [])]
    assert parse_variants("spec=--speculative-lookup,nospec=--no-speculative-lookup "
                          "--max-num-seqs 4") == [
        ("blockserve spec", ["--speculative-lookup"]),
        ("blockserve nospec", ["--no-speculative-lookup", "--max-num-seqs", "4"])]
    for bad in ("=--x", "a=--x,a=--y"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variants(bad)
    p = argparse.ArgumentParser()
    add_args(p)
    assert p.parse_args([]).blockserve_variants == [("blockserve", [])]
    args = p.parse_args(["--blockserve-variants", "spec=--speculative-lookup",
                         "--workloads", "edit"])
    (label, extra), = args.blockserve_variants
    cmd, model, _ = _server_command("blockserve", args, None, 8400, extra)
    assert label == "blockserve spec" and cmd[-1] == "--speculative-lookup"
    rows = _workloads(args, _chunks)
    assert [(w.name, c, w.num_requests) for w, c in rows] == [("edit x1", 1, 4),
                                                              ("edit x4", 4, 4)]
    assert _shape(rows[0][0]) != _shape(rows[1][0])  # nothing cached from the x1 row


def test_variants_are_set_against_the_peers_and_against_each_other():
    from blockserve.bench.compare import ratio_lines

    def run(rate, texts):  # 400 tokens after the first at ``rate`` tokens/s
        recs = [Record(i, 0, ttft=1.0, e2e=1.0 + 400 / rate, completion_tokens=401, text=t)
                for i, t in enumerate(texts)]
        return summarize(recs, 10.0), recs

    runs = {"blockserve spec": run(200, ["a", "b"]), "blockserve nospec": run(100, ["a", "c"]),
            "mlx_lm server": run(80, ["a", "b"])}
    lines = ratio_lines({"edit x1": {k: v[0] for k, v in runs.items()}},
                        {"edit x1": {k: v[1] for k, v in runs.items()}},
                        ["blockserve spec", "blockserve nospec"], ["mlx_lm server"])
    assert len(lines) == 3
    assert lines[0].startswith("- edit x1, blockserve spec against mlx_lm server: decode "
                               "tok/s p50 ratio **2.50x**")
    assert lines[1].startswith("- edit x1, blockserve nospec against mlx_lm server: decode "
                               "tok/s p50 ratio **1.25x**")
    assert "blockserve spec against blockserve nospec: decode tok/s p50 ratio **2.00x**" \
        in lines[2] and "same output on **1 of 2** requests" in lines[2]


# --- goodput (issue 31, item 4) ---------------------------------------------------------


def test_slo_parser_takes_units_any_subset_and_says_what_is_wrong():
    from blockserve.bench.goodput import parse_slo

    assert parse_slo("ttft=2s,itl=300ms,e2e=20s") == pytest.approx(
        {"ttft": 2.0, "itl": 0.3, "e2e": 20.0})
    assert parse_slo("itl=0.3s") == {"itl": pytest.approx(0.3)}
    # vLLM's spelling: ``key:value`` and ``e2el``; spaces and case do not matter
    assert parse_slo(" TPOT:50ms , e2el : 1.5s") == pytest.approx({"tpot": 0.05, "e2e": 1.5})
    for bad, why in [("ttft=2", "unit"), ("ttft=2h", "unit"), ("foo=1s", "unknown"),
                     ("ttft", "KEY=VALUE"), ("ttft=1s,ttft=2s", "twice"), ("", "empty"),
                     ("ttft=0s", "> 0"), ("ttft=-1s", "unit")]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(why)):
            parse_slo(bad)


def _streamed(times, t0=0.0, completion_tokens=None, texts=None):
    """A record from content chunks arriving at ``times`` (seconds)."""
    texts = texts or ["x"] * len(times)
    events = [(t, chunk(x)) for t, x in zip(times, texts)]
    n = completion_tokens or len(times)
    events.append((times[-1], chunk(usage={"prompt_tokens": 8, "completion_tokens": n})))
    rec = Record(0, 0)
    record_stream(rec, t0, events)
    return rec


def test_a_draft_arriving_at_once_is_one_gap_not_several():
    # 4 tokens of a draft in one chunk at 0.6, then 3 more chunks arriving in one read
    # (the same arrival time) at 0.9: two gaps, 0.2 and 0.3, and no zero-length ones
    rec = _streamed([0.4, 0.6, 0.9, 0.9, 0.9], texts=["a", "bcde", "f", "g", "h"],
                    completion_tokens=8)
    assert rec.itl == pytest.approx([0.2, 0.3])
    assert rec.text == "abcdefgh"
    # chunks a fraction of a millisecond apart are the same arrival too
    rec = _streamed([0.4, 0.6, 0.6002, 0.6004, 1.0])
    assert rec.itl == pytest.approx([0.2, 1.0 - 0.6004])
    s = summarize([rec], 1.0)
    assert s["itl_s"]["p50"] == pytest.approx((0.2 + 0.3996) / 2)


def test_attainment_and_goodput_on_synthetic_records():
    from blockserve.bench.goodput import goodput, meets, parse_slo

    slo = parse_slo("ttft=1s,itl=300ms,e2e=3s")
    fast = _streamed([0.5, 0.7, 0.9, 1.1])  # meets all
    slow_start = _streamed([1.5, 1.7, 1.9])  # ttft misses
    stall = _streamed([0.5, 0.7, 1.2, 1.3])  # one 0.5 s gap: itl (its largest) misses
    # a draft: 6 tokens in 3 arrivals 0.25 s apart; counted per token the "gaps" would
    # include zeros, but the largest gap is what counts and it is 0.25: meets
    draft = _streamed([0.5, 0.75, 0.75, 0.75, 1.0, 1.0], completion_tokens=6)
    long = _streamed([0.5] + [0.5 + 0.25 * i for i in range(1, 14)])  # e2e 3.75 s misses
    failed = Record(5, 0, error="HTTP 500")
    assert meets(fast, slo) == {"ttft": True, "itl": True, "e2e": True}
    assert meets(slow_start, slo) == {"ttft": False, "itl": True, "e2e": True}
    assert meets(stall, slo) == {"ttft": True, "itl": False, "e2e": True}
    assert draft.itl == pytest.approx([0.25, 0.25]) and all(meets(draft, slo).values())
    assert meets(long, slo) == {"ttft": True, "itl": True, "e2e": False}
    assert meets(failed, slo) == {"ttft": False, "itl": False, "e2e": False}
    g = goodput([fast, slow_start, stall, draft, long, failed], 4.0, slo)
    assert g["good_requests"] == 2
    assert g["attainment"] == pytest.approx(2 / 6)
    assert g["goodput_per_s"] == pytest.approx(0.5)
    assert g["share_meeting"] == pytest.approx({"ttft": 4 / 6, "itl": 4 / 6, "e2e": 4 / 6})
    # tpot is vLLM's per-request (e2e - ttft) / (tokens - 1): 0.6 / 3 = 0.2 s for ``fast``
    assert meets(fast, parse_slo("tpot=201ms")) == {"tpot": True}
    assert meets(fast, parse_slo("tpot=199ms")) == {"tpot": False}
    # summarize reports it when given an SLO, and e2e's mean and percentiles beside
    s = summarize([fast, slow_start, stall, draft, long, failed], 4.0, slo=slo)
    assert s["goodput"] == g
    assert s["e2e_s"]["mean"] == pytest.approx((1.1 + 1.9 + 1.3 + 1.0 + 3.75) / 5)
    assert summarize([fast], 1.0)["goodput"] is None
    text = format_summary("w", s)
    assert "e2e mean 1.81 s p50 1.30 s" in text
    assert "2 of 6 requests meet it (attainment 0.33), goodput 0.500 req/s" in text
    assert "ttft 0.67, itl 0.67, e2e 0.67" in text


def test_the_knee_is_the_highest_rate_at_90_percent_below_the_first_miss():
    from blockserve.bench.goodput import find_knee, knee_of

    curve = [(4, 0.5), (0.5, 1.0), (1, 0.97), (2, 0.9), (3, 0.85)]
    assert find_knee(curve) == 2  # 0.9 exactly counts
    # a noisy pass above a miss is not the knee
    assert find_knee([(0.5, 1.0), (1, 0.8), (2, 0.95)]) == 0.5
    assert find_knee([(0.5, 0.7), (1, 0.6)]) is None
    assert find_knee([(1, 0.95), (2, 0.93)]) == 2
    assert find_knee(curve, threshold=0.99) == 0.5
    pts = [{"rate": r, "attainment": a, "goodput_per_s": r * a} for r, a in curve]
    assert knee_of(pts)["goodput_per_s"] == pytest.approx(1.8)


def test_the_auto_sweep_doubles_until_a_miss_then_bisects():
    from blockserve.bench.goodput import next_auto_rate, parse_rates

    def attainment(rate):  # the knee of this synthetic server is 2.6 req/s
        return 1.0 if rate <= 2.6 else 0.5

    points, rate = [], next_auto_rate([], start=0.5, bisect_steps=3)
    while rate is not None:
        points.append((rate, attainment(rate)))
        rate = next_auto_rate(points, start=0.5, bisect_steps=3)
    assert [r for r, _ in points] == [0.5, 1, 2, 4, 3, 2.5, 2.75]
    # starting above the knee halves down first
    points, rate = [], next_auto_rate([], start=8, bisect_steps=3)
    while rate is not None:
        points.append((rate, attainment(rate)))
        rate = next_auto_rate(points, start=8, bisect_steps=3)
    assert [r for r, _ in points][:3] == [8, 4, 2] and len(points) <= 7
    assert parse_rates("2,0.5,1") == [0.5, 1, 2] and parse_rates("AUTO") == "auto"
    with pytest.raises(argparse.ArgumentTypeError):
        parse_rates("0,1")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_rates("fast")


def test_compare_reports_goodput_at_each_knee_and_the_ratio():
    from blockserve.bench.goodput import goodput_lines, parse_slo, sweep_lines

    def pt(rate, att):
        q = {"p50": 0.1, "p90": 0.2}
        return {"rate": rate, "attainment": att, "goodput_per_s": rate * att, "errors": 0,
                "ttft_s": q, "itl_s": q, "e2e_s": q}

    slo = parse_slo("ttft=2s,itl=300ms")
    sweeps = {"blockserve": [pt(1, 1.0), pt(2, 0.95), pt(4, 0.5)],
              "mlx_lm server": [pt(1, 0.92), pt(2, 0.6), pt(4, 0.3)]}
    lines = sweep_lines(sweeps, slo, ["blockserve"], ["mlx_lm server"])
    assert "- blockserve: knee 2 req/s, goodput at the knee **1.900 req/s**" in lines
    assert "- mlx_lm server: knee 1 req/s, goodput at the knee **0.920 req/s**" in lines
    assert lines[-1] == ("- blockserve against mlx_lm server: goodput at the knee ratio "
                         "**2.07x** (target >= 1.5x)")
    s = summarize([_streamed([0.5, 0.7])], 1.0, slo=slo)
    rows = goodput_lines({"shared-prefix 4x8": {"blockserve": s}})
    assert rows[-1] == "| shared-prefix 4x8 | blockserve | 1.00 | 1.000 | 1.00 | 1.00 |"


def test_a_knee_at_the_highest_rate_run_is_flagged():
    from blockserve.bench.goodput import format_sweep

    q = {"p50": 0.1, "p90": 0.2}
    pts = [{"rate": r, "attainment": 1.0, "goodput_per_s": r, "errors": 0, "ttft_s": q,
            "itl_s": q, "e2e_s": q} for r in (1, 2)]
    assert format_sweep(pts).endswith("knee: 2 req/s, goodput 2.000 req/s (attainment 1.00) "
                                      "(the highest rate run: the knee lies above, add "
                                      "higher rates)")
    pts.append({**pts[-1], "rate": 4, "attainment": 0.5})
    assert format_sweep(pts).endswith("(attainment 1.00)")


def test_the_overhead_workload_levels_and_its_step_split():
    from blockserve.bench.compare import _server_command, _workloads, add_args, \
        overhead_lines
    from blockserve.bench.overhead import step_split

    p = argparse.ArgumentParser()
    add_args(p)
    args = p.parse_args(["--workloads", "overhead", "--overhead-streams", "1,16",
                         "--overhead-tokens", "32"])
    rows = _workloads(args, _chunks)
    assert [(w.name, c, w.num_requests) for w, c in rows] == [("overhead x1", 1, 1),
                                                              ("overhead x16", 16, 16)]
    assert all(t.max_tokens == 32 and t.temperature == 0.0
               for w, _ in rows for s in w.sessions for t in s.turns)
    cmd, _, _ = _server_command("blockserve", args, None, 8400)
    assert cmd[cmd.index("--max-num-seqs") + 1] == "16"  # room for the most streams
    phase = 'blockserve_engine_step_seconds_total{phase="%s"}'
    before = {"blockserve_engine_steps_total": 10, phase % "eval": 1.0}
    after = {"blockserve_engine_steps_total": 110, phase % "eval": 1.5,
             phase % "events": 0.1}
    split = step_split(before, after, wall=1.0)
    assert split["steps"] == 100 and split["steps_per_s"] == 100
    assert split["ms"]["eval"] == pytest.approx(5.0)
    assert split["ms"]["events"] == pytest.approx(1.0)
    assert split["ms"]["other"] == pytest.approx(4.0) and split["ms"]["step"] == 10.0
    assert step_split({}, {}, 1.0) is None  # a peer: no such metrics
    recs = [Record(0, 0, ttft=0.1, e2e=1.1, completion_tokens=101, itl=[0.01] * 100)]
    mine, peer = summarize(recs, 1.0), summarize(recs, 2.0)
    mine["engine_split"] = split
    lines = overhead_lines({"overhead x1": {"blockserve": mine, "mlx_lm server": peer}},
                           ["blockserve"], ["mlx_lm server"], {})
    text = "\n".join(lines)
    assert "| 1 | 101 | 10/10 | 50 | 10/10 |" in text
    assert "tok/s 2.00x, ITL p50 1.00 against mlx_lm server" in text
    assert "| overhead x1 | blockserve | 100 | 1.0 |" in text
