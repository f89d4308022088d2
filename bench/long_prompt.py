"""A long prompt arriving while streams decode: how much it stalls them, in process.

    python -m blockserve.bench.long_prompt [--model demo:bench] [--prompt-tokens 30000]
        [--streams 8] [--token-budget 64] [--runner auto|ragged|batch]

Issue 22's target: on ``demo:bench``, a 30K-token prompt arriving while 8 streams decode
raises their inter-token p99 by at most 2x.

Drives the scheduler and the engine directly (no HTTP), as ``bench.engine_bench`` does.
``--streams`` greedy requests with short distinct prompts (random token ids) and more
``max_tokens`` than the run needs decode throughout; each token's arrival (when the
client coroutine receives it from the scheduler) is recorded per stream. Then one long
prompt (``--prompt-tokens`` random token ids, ``--long-max-tokens`` output tokens) is
submitted, and the streams are cancelled once the windows below are complete.

The windows. A gap is the time between two consecutive tokens of one stream; it belongs
to the window in which its *second* token arrives (so the gap a stream is in when the
long prompt arrives counts as a long-prompt gap):

- **warm-up**, not reported: until every stream has ``--warmup-tokens`` tokens (their
  own prompts' prefill and the first steps). Ends at ``t_warm``.
- **baseline**: ``(t_warm, t_submit]``, where ``t_submit`` is the moment the long prompt
  is submitted, once every stream has ``--baseline-tokens`` more tokens. Only the
  streams decode here.
- **long prompt**: ``(t_submit, t_first]``, where ``t_first`` is the arrival of the long
  prompt's first token: the whole of its prefill. The target compares this window's
  p99 with the baseline's (``p99 ratio``); its TTFT is ``t_first - t_submit``.
- **after**, reported apart (not part of the target): ``(t_first, t_end]``, until the
  long prompt has finished and every stream has ``--after-tokens`` tokens more. It holds
  what follows the prefill: the long prompt's K/V joining the decode batch (every row
  of a left-padded batch then attends over the long context), its decode steps, and
  its blocks published to the prefix cache when it finishes.

Besides the gaps, the engine's steps are timed (``next()`` of the runner, on the engine
thread) with the long prompt's progress, so the long-prompt window's step time can be
read against how much of the long context each chunk attends over. ``--time-limit``
stops waiting for the long prompt's first token after that long and reports the
long-prompt window so far, marked partial (no TTFT, no after window); ``--progress``
prints a line on the prefill every so many seconds.
Prints a markdown table and writes JSON to ``bench/results/long_prompt-<runner>-<N>.json``
(or ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time

# First: importing engine.runtime preloads the system BLAS before anything loads mlx.
from blockserve.engine.runtime.blas import active_blas
from blockserve.bench.stats import latency_stats
from blockserve.scheduler import Request, SamplingParams
from blockserve.stack import StackConfig, build_stack, start_worker

TARGET_P99_RATIO = 2.0
WINDOWS = ("baseline", "long_prompt", "after")


# ---- statistics (pure: tested on synthetic timestamps) ----------------------------------

def window_gaps(arrivals: dict[str, list[float]], lo: float, hi: float) -> list[float]:
    """The gaps of every stream whose second token arrives in ``(lo, hi]``."""
    out = []
    for times in arrivals.values():
        for a, b in zip(times, times[1:]):
            if lo < b <= hi:
                out.append(b - a)
    return out


def gap_stats(gaps: list[float]) -> dict:
    s = latency_stats(gaps)
    return {"count": len(gaps), "p50_s": s["p50"], "p99_s": s["p99"], "mean_s": s["mean"],
            "max_s": max(gaps) if gaps else None}


def window_report(arrivals: dict[str, list[float]], bounds: dict[str, float]) -> dict:
    """Gap statistics per window, from ``bounds`` (``t_warm``, ``t_submit``, ``t_first``,
    ``t_end``), and the long-prompt window's p50 and p99 over the baseline's."""
    edges = [bounds["t_warm"], bounds["t_submit"], bounds["t_first"], bounds["t_end"]]
    windows = {name: gap_stats(window_gaps(arrivals, lo, hi))
               for name, lo, hi in zip(WINDOWS, edges, edges[1:])}

    def ratio(key: str, window: str = "long_prompt") -> float | None:
        a, b = windows[window][key], windows["baseline"][key]
        return a / b if a is not None and b else None

    return {"windows": windows,
            "p50_ratio": ratio("p50_s"), "p99_ratio": ratio("p99_s"),
            "after_p99_ratio": ratio("p99_s", "after")}


def step_profile(steps: list[dict], lo: float, hi: float, parts: int = 4) -> list[dict]:
    """The engine steps that ended in ``(lo, hi]``, in ``parts`` slices by the long
    prompt's progress before the step: mean step time and prefill tokens a step."""
    inside = [s for s in steps if lo < s["t1"] <= hi and s["long_done"] is not None]
    if not inside:
        return []
    total = max(s["long_total"] for s in inside)
    out = []
    for p in range(parts):
        a, b = total * p / parts, total * (p + 1) / parts
        group = [s for s in inside
                 if min(parts - 1, int(s["long_before"] * parts / total)) == p]
        if not group:
            continue
        ms = [1e3 * (s["t1"] - s["t0"]) for s in group]
        out.append({"context_from": int(a), "context_to": int(b), "steps": len(group),
                    "step_ms_mean": sum(ms) / len(ms), "step_ms_max": max(ms),
                    "chunk_tokens_mean": sum(s["long_done"] - s["long_before"]
                                             for s in group) / len(group),
                    "decodes_mean": sum(s["decodes"] for s in group) / len(group)})
    return out


def _verdict(p99_ratio: float | None, complete: bool) -> bool | None:
    """Met, missed, or None (unknown: no ratio, or a partial window still under it)."""
    if p99_ratio is None:
        return None
    if p99_ratio > TARGET_P99_RATIO:
        return False  # a partial window's gaps only grow with the context
    return True if complete else None


# ---- the run -------------------------------------------------------------------------

class StepTimer:
    """Wraps the runner's ``next()`` on the engine thread: start, end, decode tokens
    sampled, and the long prompt's progress (from the prompt responses, whose
    ``progress`` both runners report)."""

    def __init__(self, long_total: int):
        self.long_total = long_total
        self.steps: list[dict] = []
        self._done = 0

    def install(self, worker) -> None:
        def wrap(_):
            bg = worker._bg
            inner = bg.next

            def timed():
                t0 = time.perf_counter()
                prompt_responses, gen_responses = inner()
                t1 = time.perf_counter()
                before, done = self._done, None
                for r in prompt_responses:
                    if r.progress[1] >= self.long_total:
                        done = self._done = max(self._done, r.progress[0])
                self.steps.append({"t0": t0, "t1": t1, "decodes": len(gen_responses),
                                   "long_before": before, "long_done": done,
                                   "long_total": self.long_total})
                return prompt_responses, gen_responses

            bg.next = timed
        worker.run_sync(wrap)


async def run(args) -> dict:
    config = StackConfig(model=args.model, max_num_seqs=args.streams + 1,
                         kv_cache_memory_bytes=2 << 30,
                         # admission accounting only: the streams reserve their whole
                         # max_tokens, far more than they will generate here
                         active_kv_memory_bytes=64 << 30,
                         prefill_step_size=args.prefill_step_size,
                         token_budget=args.token_budget, runner=args.runner)
    worker = start_worker(config)
    try:
        return await _measure(args, config, worker)
    finally:
        worker.close()


async def _measure(args, config: StackConfig, worker) -> dict:
    sched = build_stack(config, worker).scheduler
    rng = random.Random(args.seed)
    vocab = worker.vocab_size
    n_long = args.prompt_tokens
    if n_long + args.long_max_tokens >= worker.max_context:
        raise SystemExit(f"--prompt-tokens {n_long}: the model's context is "
                         f"{worker.max_context} tokens")
    # Upper bound on the tokens a stream needs: at least one prompt token is computed a
    # step, so the long prompt's prefill takes at most n_long steps.
    stream_max = min(args.warmup_tokens + args.baseline_tokens + n_long
                     + args.long_max_tokens + args.after_tokens + 64,
                     worker.max_context - args.stream_prompt_tokens - 1)
    timer = StepTimer(n_long)
    timer.install(worker)
    sched.start()

    arrivals: dict[str, list[float]] = {}
    ended: dict[str, str | None] = {}
    tick = asyncio.Event()  # set on every token: the waits below re-check their condition
    streams = []

    async def consume(name: str, stream) -> None:
        times = arrivals[name]
        try:
            async for out in stream:
                now = time.perf_counter()
                times.extend([now] * len(out.token_ids))
                tick.set()
                if out.finish_reason is not None:
                    ended[name] = out.finish_reason
        finally:
            ended.setdefault(name, None)
            tick.set()

    async def until(cond, deadline: float | None = None) -> bool:
        """Wait for ``cond``; False if ``deadline`` (perf_counter) came first."""
        while not cond():
            tick.clear()
            if deadline is None:
                await tick.wait()
                continue
            try:
                await asyncio.wait_for(tick.wait(), deadline - time.perf_counter())
            except asyncio.TimeoutError:
                return cond()
        return True

    def all_streams_have(counts: dict[str, int]) -> bool:
        if ended:  # a stream that ended before the windows did would hang them
            raise RuntimeError(f"streams ended early: {ended}; raise their max_tokens "
                               "or check the engine's log")
        return all(len(arrivals[n]) >= c for n, c in counts.items())

    tasks = []
    for i in range(args.streams):
        name = f"stream{i}"
        prompt = [rng.randrange(vocab) for _ in range(args.stream_prompt_tokens)]
        stream = sched.submit(Request(prompt, SamplingParams(max_tokens=stream_max,
                                                             ignore_eos=True)))
        arrivals[name] = []
        streams.append(stream)
        tasks.append(asyncio.create_task(consume(name, stream)))
    t_start = time.perf_counter()

    await until(lambda: all_streams_have({n: args.warmup_tokens for n in arrivals}))
    t_warm = time.perf_counter()
    await until(lambda: all_streams_have({n: args.warmup_tokens + args.baseline_tokens
                                          for n in arrivals}))

    long_prompt = [rng.randrange(vocab) for _ in range(n_long)]
    long_times: list[float] = []
    long_end: dict = {}

    async def consume_long(stream) -> None:
        async for out in stream:
            long_times.extend([time.perf_counter()] * len(out.token_ids))
            tick.set()
            if out.finish_reason is not None:
                long_end.update(reason=out.finish_reason, error=out.error,
                                t=time.perf_counter())
        long_end.setdefault("t", time.perf_counter())
        tick.set()

    t_submit = time.perf_counter()
    long_stream = sched.submit(Request(long_prompt, SamplingParams(
        max_tokens=args.long_max_tokens, ignore_eos=True)))
    long_task = asyncio.create_task(consume_long(long_stream))
    reporter = None
    if args.progress:
        print(f"long prompt of {n_long} tokens submitted {t_submit - t_start:.1f} s in",
              flush=True)
        reporter = asyncio.create_task(_report_progress(args.progress, timer, arrivals,
                                                        t_submit, n_long))

    def long_started() -> bool:
        all_streams_have({})
        if long_end and not long_times:
            raise RuntimeError(f"the long prompt ended without a token: {long_end}")
        return bool(long_times)

    complete = await until(long_started, t_submit + args.time_limit
                           if args.time_limit else None)
    if complete:
        t_first = long_times[0]
        await until(lambda: all_streams_have({}) and bool(long_end))
        if long_end.get("error"):
            raise RuntimeError(f"the long prompt failed: {long_end['error']}")
        base = {n: len(ts) for n, ts in arrivals.items()}
        await until(lambda: all_streams_have({n: c + args.after_tokens
                                              for n, c in base.items()}))
        t_end = time.perf_counter()
    else:  # --time-limit: the long-prompt window so far, and no after window
        t_first = t_end = time.perf_counter()
        print(f"--time-limit {args.time_limit:.0f} s: stopped with {timer._done} of the "
              f"long prompt's {n_long} tokens computed; the long-prompt window is partial",
              flush=True)
    if reporter is not None:
        reporter.cancel()
    long_stream.cancel()
    for s in streams:
        s.cancel()
    await asyncio.gather(*tasks, long_task)

    bounds = {"t_warm": t_warm, "t_submit": t_submit, "t_first": t_first, "t_end": t_end}
    report = window_report(arrivals, bounds)
    runner = worker.runner
    return {
        "model": args.model, "backend": worker.describe_backend(), "blas": active_blas,
        "runner": runner, "runner_asked": args.runner,
        "token_budget": args.token_budget if runner == "ragged" else None,
        "prefill_step_size": args.prefill_step_size,
        "streams": args.streams, "stream_prompt_tokens": args.stream_prompt_tokens,
        "prompt_tokens": n_long, "long_max_tokens": args.long_max_tokens,
        "warmup_tokens": args.warmup_tokens, "baseline_tokens": args.baseline_tokens,
        "after_tokens": args.after_tokens, "seed": args.seed,
        "load_average": os.getloadavg(),
        "complete": complete,  # False: cut by --time-limit before the first token
        "long_prompt_computed_tokens": timer._done,
        "ttft_s": t_first - t_submit,  # a lower bound when not complete
        "long_prompt_e2e_s": long_end["t"] - t_submit if complete else None,
        "windows_s": {"baseline": t_submit - t_warm, "long_prompt": t_first - t_submit,
                      "after": t_end - t_first},
        **report,
        "target_p99_ratio": TARGET_P99_RATIO,
        "met": _verdict(report["p99_ratio"], complete),
        "long_prompt_steps": step_profile(timer.steps, t_submit, t_first),
        "steps": [{k: (round(v - t_start, 5) if k in ("t0", "t1") else v)
                   for k, v in s.items()} for s in timer.steps],
        "arrivals_s": {n: [round(t - t_start, 5) for t in ts] for n, ts in arrivals.items()},
        "bounds_s": {k: round(v - t_start, 5) for k, v in bounds.items()},
    }


async def _report_progress(every: float, timer: StepTimer, arrivals: dict[str, list[float]],
                           t_submit: float, n_long: int) -> None:
    """Every ``every`` seconds, a line on the long prompt's prefill so far: a run cut
    short (a timeout) still shows how step time and the streams' gaps grow with it."""
    lo = t_submit
    while True:
        await asyncio.sleep(every)
        hi = time.perf_counter()
        steps = [s for s in list(timer.steps) if lo < s["t1"] <= hi]
        gaps = gap_stats(window_gaps({n: list(ts) for n, ts in arrivals.items()}, lo, hi))
        ms = [1e3 * (s["t1"] - s["t0"]) for s in steps]
        print(f"  {hi - t_submit:6.0f} s: long prompt {timer._done}/{n_long}, "
              f"{len(steps)} steps, mean {sum(ms) / max(len(ms), 1):.0f} ms; stream gaps "
              f"p50 {_ms(gaps['p50_s'])} p99 {_ms(gaps['p99_s'])} ms", flush=True)
        lo = hi


# ---- output -------------------------------------------------------------------------

def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def markdown(r: dict) -> str:
    w = r["windows"]
    budget = f", token budget {r['token_budget']}" if r["token_budget"] else ""
    lines = [
        f"`{r['model']}`, runner {r['runner']}{budget}, prefill step "
        f"{r['prefill_step_size']}; {r['streams']} streams, a {r['prompt_tokens']}-token "
        f"prompt; load average {r['load_average'][0]:.1f}",
        "",
        "| window | length | gaps | ITL p50 ms | ITL p99 ms | ITL max ms |",
        "|---|---|---|---|---|---|",
    ]
    for name in WINDOWS:
        s = w[name]
        lines.append(f"| {name.replace('_', ' ')} | {r['windows_s'][name]:.1f} s | "
                     f"{s['count']} | {_ms(s['p50_s'])} | {_ms(s['p99_s'])} | "
                     f"{_ms(s['max_s'])} |")
    if r["complete"]:
        head = (f"Long prompt: TTFT {r['ttft_s']:.1f} s, end to end "
                f"{r['long_prompt_e2e_s']:.1f} s. ")
    else:
        head = (f"**Partial** (--time-limit): {r['long_prompt_computed_tokens']} of "
                f"{r['prompt_tokens']} prompt tokens computed in {r['ttft_s']:.0f} s, "
                "TTFT longer; the long-prompt window is its prefill so far. ")
    verdict = {True: "met", False: "missed", None: "not known yet"}[r["met"]]
    lines += [
        "",
        head + f"Long-prompt window over baseline: p50 {_x(r['p50_ratio'])}, "
        f"**p99 {_x(r['p99_ratio'])}** (target <= {r['target_p99_ratio']:.0f}x: "
        f"{verdict}); after window p99 {_x(r['after_p99_ratio'])}.",
    ]
    if r["long_prompt_steps"]:
        lines += ["", "Engine steps during the long prompt's prefill, by how far it had got:",
                  "", "| long context before the step | steps | step ms mean | step ms max "
                  "| prompt tokens a step | decodes a step |", "|---|---|---|---|---|---|"]
        for p in r["long_prompt_steps"]:
            lines.append(f"| {p['context_from']}-{p['context_to']} | {p['steps']} | "
                         f"{p['step_ms_mean']:.0f} | {p['step_ms_max']:.0f} | "
                         f"{p['chunk_tokens_mean']:.0f} | {p['decodes_mean']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo:bench")
    ap.add_argument("--prompt-tokens", type=int, default=30000)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--token-budget", type=int, default=StackConfig.token_budget)
    ap.add_argument("--runner", choices=("auto", "ragged", "batch"), default="auto")
    ap.add_argument("--prefill-step-size", type=int, default=StackConfig.prefill_step_size)
    ap.add_argument("--stream-prompt-tokens", type=int, default=32)
    ap.add_argument("--warmup-tokens", type=int, default=4)
    ap.add_argument("--baseline-tokens", type=int, default=20)
    ap.add_argument("--after-tokens", type=int, default=8)
    ap.add_argument("--long-max-tokens", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=0.0, metavar="SECONDS",
                    help="stop waiting for the long prompt's first token after this long "
                    "and report the window so far, marked partial (0: no limit)")
    ap.add_argument("--progress", type=float, default=0.0, metavar="SECONDS",
                    help="print the long prompt's progress this often (0: never)")
    ap.add_argument("--json", help="default: bench/results/long_prompt-<runner>-<N>.json")
    args = ap.parse_args(argv)
    result = asyncio.run(run(args))
    print(markdown(result))
    path = args.json or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"long_prompt-{result['runner']}-{args.prompt_tokens}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
