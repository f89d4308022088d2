"""Where the engine thread's time goes on the agent workload, in process (no HTTP).

    python -m blockserve.bench.profile_agent [--model SmolLM2-135M-Instruct]
        [--prompt-concurrency N] [--prefill-step-size N]

Wraps the engine's steps with timers: ``BatchGenerator.next`` (and mlx-lm's own split of
it into prefill and decode), cache assembly from blocks, block extraction at checkpoints
and finishes, and counts the ``next()`` calls from a request's insert to its first token.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time

import blockserve.engine.runtime  # noqa: F401  (BLAS preload before mlx)
from blockserve.bench.engine_bench import run_in_process
from blockserve.bench.tokens import LocalTokenizer
from blockserve.bench.workloads import agent_sessions
from blockserve.engine.runtime import worker as worker_module
from blockserve.stack import StackConfig, build_stack, start_worker


class Timers:
    def __init__(self):
        self.seconds = collections.Counter()
        self.calls = collections.Counter()

    def wrap(self, obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - t
                self.calls[key] += 1

        setattr(obj, name, timed)


async def profile(args) -> None:
    timers = Timers()
    # The worker module imported these by name: time them where it calls them.
    timers.wrap(worker_module, "cache_from_blocks", "blocks -> cache")
    timers.wrap(worker_module, "blocks_from_cache", "cache -> blocks")
    config = StackConfig(model=args.model, max_num_seqs=8, kv_cache_memory_bytes=4 << 30,
                         prefill_step_size=args.prefill_step_size,
                         prompt_concurrency=args.prompt_concurrency)
    worker = start_worker(config)
    worker.run_sync(lambda _: timers.wrap(worker._bg, "next", "BatchGenerator.next"))
    timers.wrap(worker, "_step", "engine step")
    steps, inserted, first = [0], {}, {}
    step, insert, send = worker._step, worker._insert, worker._send

    def counting_step():
        steps[0] += 1
        return step()

    def noting_insert(spec):
        inserted[spec.seq_id] = (steps[0], time.perf_counter(), len(spec.prompt),
                                 spec.cached_tokens)
        return insert(spec)

    def noting_send(event):
        if type(event).__name__ == "TokenEvent" and event.seq_id not in first:
            s0, t0, n, cached = inserted[event.seq_id]
            first[event.seq_id] = (steps[0] - s0, time.perf_counter() - t0, n, cached)
        return send(event)

    worker._step, worker._insert, worker._send = counting_step, noting_insert, noting_send
    try:
        sched = build_stack(config, worker).scheduler
        sched.start()
        tok = LocalTokenizer(worker.loaded.model_path)
        workload = agent_sessions(4, 4, 1024, output_tokens=32, seed=1, trim=tok.trim)
        t0 = time.perf_counter()
        res = await run_in_process(sched, worker.tokenizer, workload, 4)
        wall = time.perf_counter() - t0
        counters = worker.run_sync(lambda _: vars(worker._bg._counters).copy())
    finally:
        worker.close()
    print(f"{args.model}, {worker.describe_backend()}, prefill step {args.prefill_step_size}: "
          f"wall {wall:.1f} s, TTFT mean {sum(res.ttft) / len(res.ttft):.2f} s")
    for key in sorted(timers.seconds, key=timers.seconds.get, reverse=True):
        print(f"  {key:22s} {timers.seconds[key]:7.2f} s in {timers.calls[key]} calls")
    print(f"  mlx-lm: prefill {counters['prompt_time']:.2f} s for {counters['prompt_tokens']} "
          f"tokens, decode {counters['decode_time']:.2f} s in "
          f"{counters['generation_steps']} steps")
    for steps_to_first, ttft, n, cached in first.values():
        print(f"  prompt {n:5d} (cached {cached:5d}): first token after {steps_to_first} "
              f"steps, {ttft:.2f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--prompt-concurrency", type=int, default=None)
    ap.add_argument("--prefill-step-size", type=int, default=256)
    asyncio.run(profile(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
