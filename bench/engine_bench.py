"""In-process engine benchmark: prefix reuse on shared-prefix and agent workloads.

    python -m blockserve.bench.engine_bench [--model demo:bench] [--block-size 16]

Drives the scheduler and the MLX engine directly (no HTTP) and reports prompt tokens
actually prefilled, hit rate, TTFT and throughput for:
  (a) 32 requests in 4 groups sharing ~1K-token system prompts, 8 concurrent;
  (b) 4 concurrent 4-turn agent sessions sharing one system prompt;
  (c) a fully cached 2K-token prefix + 32-token suffix against a cold 32-token prompt.
Targets: prefill efficiency (distinct prefix tokens / prefilled tokens) >= 0.9 on (a)
and (b); TTFT of (c) within 1.5x of the cold prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import blockserve.engine.runtime  # noqa: F401  (BLAS preload before mlx)
from blockserve.bench.stats import distinct_prefix_tokens, latency_stats
from blockserve.bench.tokens import LocalTokenizer
from blockserve.bench.workloads import Workload, agent_sessions, random_text, shared_prefix
from blockserve.engine.runtime.blas import active_blas
from blockserve.engine.text.chat import render_chat
from blockserve.scheduler import Request, SamplingParams, Scheduler
from blockserve.stack import StackConfig, build_stack, start_worker


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompts: list[list[int]] = field(default_factory=list)
    wall: float = 0.0


async def one(sched: Scheduler, prompt, checkpoints, max_tokens: int, res: Result) -> str:
    t0 = time.perf_counter()
    first = None
    text = []
    res.prompts.append(list(prompt))
    stream = sched.submit(Request(list(prompt), SamplingParams(max_tokens=max_tokens,
                                                               ignore_eos=True),
                                  checkpoints=checkpoints))
    async for out in stream:
        if first is None and out.token_ids:
            first = time.perf_counter() - t0
        text.append(out.text)
        res.output_tokens += len(out.token_ids)
    res.ttft.append(first if first is not None else float("nan"))
    res.latency.append(time.perf_counter() - t0)
    return "".join(text)


async def run_in_process(sched: Scheduler, tok, workload: Workload, concurrency: int) -> Result:
    """``bench.client.run_workload`` without HTTP: the same sessions, closed loop."""
    res = Result()
    todo = list(workload.sessions)
    todo.reverse()

    async def client() -> None:
        while todo:
            session = todo.pop()
            for i, turn in enumerate(session.turns):
                r = render_chat(tok, session.messages_for(i))
                reply = await one(sched, r.tokens, r.checkpoints, turn.max_tokens, res)
                session.record_reply(i, reply)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    res.wall = time.perf_counter() - t0
    return res


async def cached_prefix_ttft(sched, tok, prefix_tokens=2048, suffix=32, seed=2):
    rng = random.Random(seed)
    prefix = tok.encode(random_text(rng, prefix_tokens * 2))[:prefix_tokens]
    cold_prompt = tok.encode(random_text(rng, suffix * 2))[:suffix]
    warm_suffix = tok.encode(random_text(rng, suffix * 2))[:suffix]
    scratch = Result()
    await one(sched, prefix + [1], [], 1, scratch)  # cache the prefix
    cold, warm = Result(), Result()
    for _ in range(3):  # best of three, both sides
        await one(sched, cold_prompt, [], 1, cold)
        cold_prompt = cold_prompt[1:] + cold_prompt[:1]  # a fresh prompt each time
        await one(sched, prefix + warm_suffix, [], 1, warm)
        warm_suffix = warm_suffix[1:] + warm_suffix[:1]
    return min(cold.ttft), min(warm.ttft)


def summarize(name: str, res: Result, prefilled: int, prompt_tokens: int, cached: int):
    distinct = distinct_prefix_tokens(res.prompts)
    return {
        "workload": name,
        "requests": len(res.prompts),
        "prompt_tokens": prompt_tokens,
        "distinct_prefix_tokens": distinct,
        "prefilled_tokens": prefilled,
        "prefill_efficiency": distinct / prefilled if prefilled else float("nan"),
        "hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
        "ttft_mean_s": latency_stats(res.ttft)["mean"],
        "ttft_p90_s": latency_stats(res.ttft)["p90"],
        "output_tok_s": res.output_tokens / res.wall,
        "requests_s": len(res.prompts) / res.wall,
        "wall_s": res.wall,
    }


async def main_async(args) -> list[dict]:
    config = StackConfig(model=args.model, block_size=args.block_size, max_num_seqs=8,
                         prefill_step_size=args.prefill_step_size,
                         kv_cache_memory_bytes=4 << 30, share_inflight=not args.no_inflight)
    worker = start_worker(config)
    tok = worker.tokenizer
    rows = []
    try:
        trim = LocalTokenizer(worker.loaded.model_path).trim
        workloads = [(shared_prefix(4, 8, 1024, 32, 32, seed=0, trim=trim), 8),
                     (agent_sessions(4, 4, 1024, output_tokens=32, seed=1, trim=trim), 4)]
        for workload, concurrency in workloads:
            sched = build_stack(config, worker).scheduler  # a fresh, empty pool each
            sched.start()
            res = await run_in_process(sched, tok, workload, concurrency)
            s = sched.stats
            rows.append(summarize(workload.name, res, s.prefill_tokens, s.prompt_tokens,
                                  s.cached_tokens))
        sched = build_stack(config, worker).scheduler
        sched.start()
        cold, warm = await cached_prefix_ttft(sched, tok)
        rows.append({"workload": "2K cached prefix + 32 vs cold 32", "cold_ttft_s": cold,
                     "warm_ttft_s": warm, "ratio": warm / cold})
    finally:
        worker.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo:bench")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prefill-step-size", type=int, default=256)
    ap.add_argument("--no-inflight", action="store_true", help="disable in-flight sharing")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    print(f"model {args.model}, block size {args.block_size}, BLAS: {active_blas}")
    rows = asyncio.run(main_async(args))
    for r in rows:
        if "prefill_efficiency" in r:
            print(f"{r['workload']:<18} requests {r['requests']:>3}  prompt {r['prompt_tokens']:>6}"
                  f"  distinct {r['distinct_prefix_tokens']:>6}  prefilled {r['prefilled_tokens']:>6}"
                  f"  efficiency {r['prefill_efficiency']:.2f} (target >= 0.9)"
                  f"  hit rate {r['hit_rate']:.2f}  TTFT mean {r['ttft_mean_s']*1e3:.0f} ms"
                  f" p90 {r['ttft_p90_s']*1e3:.0f} ms  {r['output_tok_s']:.1f} out tok/s"
                  f"  {r['requests_s']:.2f} req/s")
        else:
            print(f"{r['workload']}: cold {r['cold_ttft_s']*1e3:.0f} ms, cached prefix "
                  f"{r['warm_ttft_s']*1e3:.0f} ms, ratio {r['ratio']:.2f} (target <= 1.5)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
