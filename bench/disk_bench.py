"""In-process disk-tier benchmark (issue 21's targets).

    python -m blockserve.bench.disk_bench [--model SmolLM2-135M-Instruct]
        [--sizes 2048,4096,7168] [--small-model demo:tiny-qwen3] [--json FILE]

Drives the scheduler and the MLX engine directly (no HTTP), with a fresh temporary
disk-cache directory per measurement:
  (1) warm restart: a prompt of N tokens is served cold, the cache is closed (RAM
      spilled to disk), and a fresh pool over the same directory serves it again. TTFT
      ratio warm/cold (target <= 0.1 at 4K and above), output identical;
  (2) the load path against the hardware: the time to load the largest prompt's blocks
      against the same bytes read with ``dd`` (target <= 2x), both with the files
      dropped from the page cache first (``posix_fadvise(DONTNEED)``), medians of
      repeats; on (1)'s real files, and on a synthetic chain of SmolLM2-sized blocks;
  (3) the disk tier on with nothing to hit vs off: distinct prompts with a small RAM
      budget, so every eviction is written behind (target >= 0.97x requests/s);
  (4) RAM much smaller than the working set: interleaved agent sessions whose KV is
      4x the RAM budget, hit rate with the disk tier vs without (target >= 2x).
(3) and (4) run on ``--small-model``: cache behaviour, not model speed, is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import tempfile
import time

import blockserve.engine.runtime  # noqa: F401  (BLAS preload before mlx)
from blockserve.bench.tokens import LocalTokenizer
from blockserve.bench.workloads import agent_sessions, random_text
from blockserve.engine.runtime.blas import active_blas
from blockserve.engine.text.chat import render_chat
from blockserve.scheduler import Request, SamplingParams
from blockserve.stack import Stack, StackConfig, build_stack, start_worker


async def _one(stack: Stack, prompt: list[int], max_tokens: int,
               checkpoints=()) -> tuple[float, list[int], int]:
    """(TTFT, tokens, cached tokens) of one greedy request."""
    t0 = time.perf_counter()
    ttft, tokens, cached = None, [], 0
    req = Request(list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                  checkpoints=list(checkpoints))
    async for out in stack.scheduler.submit(req):
        if ttft is None and out.token_ids:
            ttft = time.perf_counter() - t0
        tokens += out.token_ids
        if out.usage is not None:
            cached = out.usage.cached_tokens
    return ttft, tokens, cached


def _stack(config: StackConfig, worker) -> Stack:
    stack = build_stack(config, worker)
    stack.scheduler.start()
    return stack


def _drop_page_cache(paths: list[str]) -> None:
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _block_files(path: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".kv")]


def _dd_read(path: str, nbytes: int) -> tuple[float, str]:
    """Seconds for ``dd`` to read ``nbytes`` of a fresh file, out of the page cache."""
    big = os.path.join(path, "dd.bin")
    with open(big, "wb") as f:
        f.write(os.urandom(min(nbytes, 1 << 20)) * max(1, nbytes // (1 << 20)))
    _drop_page_cache([big])
    t0 = time.perf_counter()
    out = subprocess.run(["dd", f"if={big}", "of=/dev/null", "bs=1M"], capture_output=True,
                         text=True, check=True)
    elapsed = time.perf_counter() - t0
    os.unlink(big)
    return elapsed, out.stderr.strip().splitlines()[-1]


def _load_vs_dd(stack: Stack, prompt: list[int], d: str, files: list[str], nbytes: int,
                repeats: int) -> dict:
    """The disk tier's load of the prompt's chain against ``dd`` reading as many bytes
    from one file, both out of the page cache; medians of ``repeats`` (the machine is
    shared, single runs are noisy)."""
    disk = stack.prefix.disk
    chain = stack.prefix.prompt(stack.scheduler.namespace(None), prompt)
    step = 4 * stack.prefix.block_size
    chunks = [chain.raw[i * step : (i + 1) * step] for i in range(len(chain.keys))]
    loads, dds = [], []
    for _ in range(repeats):
        _drop_page_cache(files)
        t0 = time.perf_counter()
        found = disk.load(chain.namespace, chain.namespace.root_key(), chain.keys, chunks)
        loads.append(time.perf_counter() - t0)
        assert len(found) == len(chain.keys)
        dd_s, dd_line = _dd_read(d, nbytes)
        dds.append(dd_s)
    load, dd = sorted(loads)[len(loads) // 2], sorted(dds)[len(dds) // 2]
    return {"load_median_s": load, "dd_median_s": dd, "dd": dd_line, "load_vs_dd": load / dd,
            "loads_s": loads, "dds_s": dds}


class _RawCodec:
    """Payloads that are their bytes (section 2 needs no model)."""

    def encode(self, p: "_RawPayload") -> bytes:
        return p.data

    def decode(self, data) -> "_RawPayload":
        return _RawPayload(data)


class _RawPayload:
    resumable = True

    def __init__(self, data):
        self.data, self.nbytes = data, len(data)


def load_vs_dd_synthetic(args) -> dict:
    """Section 2 without a model: a chain of ``--synthetic-blocks`` block files of
    ``--synthetic-block-bytes`` (default: SmolLM2's 16-token float32 block, 7K tokens),
    loaded through the disk tier against ``dd`` of one file of the same size."""
    from blockserve.kvpool import TIER_SYSTEM, BlockPool, DiskTier, Namespace, PrefixCache

    d = tempfile.mkdtemp(prefix="bs-disk-", dir=args.dir)
    n, size = args.synthetic_blocks, args.synthetic_block_bytes
    disk = DiskTier(d, _RawCodec(), 16, 1 << 40, max_queue_blocks=n + 1,
                    max_queue_bytes=(n + 1) * size)
    cache = PrefixCache(BlockPool(16, 1 << 40), disk)
    ns = Namespace("synthetic")
    toks = list(range(n * 16 + 1))
    chain = cache.prompt(ns, toks)
    cache.acquire(chain)
    blob = os.urandom(size)
    cache.publish(chain, toks[: n * 16], 0, [_RawPayload(blob) for _ in range(n)], TIER_SYSTEM)
    cache.release(chain)
    disk.flush()
    files = _block_files(d)
    chunks = [chain.raw[i * 64 : (i + 1) * 64] for i in range(n)]
    loads, dds = [], []
    for _ in range(args.repeats * 3):
        _drop_page_cache(files)
        t0 = time.perf_counter()
        assert len(disk.load(ns, ns.root_key(), chain.keys, chunks)) == n
        loads.append(time.perf_counter() - t0)
        dds.append(_dd_read(d, n * size)[0])
    cache.close(spill=False)
    shutil.rmtree(d, ignore_errors=True)
    load, dd = sorted(loads)[len(loads) // 2], sorted(dds)[len(dds) // 2]
    return {"blocks": n, "bytes": n * size, "load_median_s": load, "dd_median_s": dd,
            "load_vs_dd": load / dd, "loads_s": loads, "dds_s": dds}


async def warm_restart(model: str, sizes: list[int], args) -> list[dict]:
    config = StackConfig(model=model, block_size=args.block_size, max_num_seqs=4,
                         kv_cache_memory_bytes=4 << 30)
    worker = start_worker(config)
    tok = worker.tokenizer
    trim = LocalTokenizer(worker.loaded.model_path).trim
    rows = []
    try:
        for n in sizes:
            rng = random.Random(n)
            prompt = tok.encode(random_text(rng, n, trim))[:n]
            d = tempfile.mkdtemp(prefix="bs-disk-", dir=args.dir)
            cfg = StackConfig(**{**config.__dict__, "disk_cache_dir": d,
                                 "disk_cache_bytes": 8 << 30})
            s1 = _stack(cfg, worker)
            cold, cold_tokens, _ = await _one(s1, prompt, 8)
            t0 = time.perf_counter()
            s1.close_cache()
            spill = time.perf_counter() - t0
            t0 = time.perf_counter()
            s2 = _stack(cfg, worker)
            start = time.perf_counter() - t0
            files = _block_files(d)
            _drop_page_cache(files)  # a restart after a reboot: nothing in the page cache
            warm, warm_tokens, cached = await _one(s2, prompt, 8)
            ds = s2.prefix.disk.stats()
            # The same prompt again, now a RAM hit: what the engine needs with no disk.
            ram, ram_tokens, _ = await _one(s2, prompt, 8)
            row = {"tokens": len(prompt), "cold_ttft_s": cold, "warm_ttft_s": warm,
                   "ratio": warm / cold, "ram_hit_ttft_s": ram,
                   "identical": warm_tokens == cold_tokens == ram_tokens,
                   "cached_tokens": cached, "files": len(files),
                   "bytes_read": ds.bytes_read, "load_s": ds.load_seconds,
                   "spill_s": spill, "startup_s": start}
            if n == max(sizes):
                row.update(_load_vs_dd(s2, prompt, d, files, ds.bytes_read, args.repeats * 3))
            rows.append(row)
            s2.close_cache()
            shutil.rmtree(d, ignore_errors=True)
            print(json.dumps(row), flush=True)
    finally:
        worker.close()
    return rows


async def nothing_to_hit(model: str, args) -> dict:
    """Distinct prompts, small RAM: every eviction is written behind, nothing hits."""
    config = StackConfig(model=model, block_size=args.block_size, max_num_seqs=4)
    worker = start_worker(config)
    tok = worker.tokenizer
    trim = LocalTokenizer(worker.loaded.model_path).trim
    per_req = (args.distinct_tokens + 16) * worker.kv_bytes_per_token
    result: dict = {"requests": args.distinct_requests, "prompt_tokens": args.distinct_tokens}
    try:
        for rep in range(args.repeats):
            for mode in ("off", "on"):
                rng = random.Random(rep)  # the same prompts for both modes
                prompts = [tok.encode(f"{i} {rep} " + random_text(rng, args.distinct_tokens,
                                                                  trim))
                           for i in range(args.distinct_requests)]
                d = tempfile.mkdtemp(prefix="bs-disk-", dir=args.dir)
                cfg = StackConfig(**{**config.__dict__, "kv_cache_memory_bytes": 2 * per_req,
                                     "disk_cache_dir": d if mode == "on" else None})
                s = _stack(cfg, worker)
                t0 = time.perf_counter()
                sem = asyncio.Semaphore(4)

                async def go(p):
                    async with sem:
                        return await _one(s, p, 16)

                res = await asyncio.gather(*(go(p) for p in prompts))
                wall = time.perf_counter() - t0
                assert sum(r[2] for r in res) == 0
                rps = len(prompts) / wall
                result.setdefault(f"runs_{mode}", []).append(rps)
                if mode == "on":
                    s.prefix.disk.flush()
                    ds = s.prefix.disk.stats()
                    result["written_files"] = result.get("written_files", 0) + ds.written_files
                    result["dropped_writes"] = result.get("dropped_writes", 0) + \
                        ds.dropped_writes
                s.close_cache()
                shutil.rmtree(d, ignore_errors=True)
                print(mode, f"{rps:.2f} req/s", flush=True)
    finally:
        worker.close()
    for mode in ("off", "on"):  # medians: the machine is shared, single runs swing +-10%
        runs = sorted(result[f"runs_{mode}"])
        result[f"requests_s_{mode}"] = runs[len(runs) // 2]
    result["ratio"] = result["requests_s_on"] / result["requests_s_off"]
    return result


async def small_ram(model: str, args) -> dict:
    """Interleaved agent sessions, each with its own system prompt (agents of several
    users or projects); RAM is a quarter of their KV."""
    config = StackConfig(model=model, block_size=args.block_size, max_num_seqs=4)
    worker = start_worker(config)
    tok = worker.tokenizer
    trim = LocalTokenizer(worker.loaded.model_path).trim

    async def run(budget: int, disk: str | None) -> tuple[float, int]:
        sessions = [agent_sessions(1, 4, 256, output_tokens=16, seed=5 + i, trim=trim)
                    .sessions[0] for i in range(args.sessions)]
        s = _stack(StackConfig(**{**config.__dict__, "kv_cache_memory_bytes": budget,
                                  "disk_cache_dir": disk}), worker)
        for i in range(4):  # turn i of every session, then turn i + 1: a cycling working set
            for session in sessions:
                r = render_chat(tok, session.messages_for(i))
                _, tokens, _ = await _one(s, r.tokens, 16, r.checkpoints)
                session.record_reply(i, tok.decode(tokens))
        st = s.scheduler.stats
        used = s.pool.nbytes
        s.close_cache()
        return st.cached_tokens / st.prompt_tokens, used

    try:
        ceiling, working_set = await run(64 << 30, None)  # RAM for all: the best case
        budget = working_set // 4
        off, _ = await run(budget, None)
        d = tempfile.mkdtemp(prefix="bs-disk-", dir=args.dir)
        on, _ = await run(budget, d)
        shutil.rmtree(d, ignore_errors=True)
    finally:
        worker.close()
    return {"sessions": args.sessions, "working_set_bytes": working_set,
            "ram_budget_bytes": budget, "hit_rate_all_in_ram": ceiling, "hit_rate_off": off, "hit_rate_on": on,
            "ratio": on / off if off else float("inf")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--small-model", default="demo:tiny-qwen3")
    ap.add_argument("--sizes", default="2048,4096,7168")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--distinct-requests", type=int, default=24)
    ap.add_argument("--distinct-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--dir", default=None, help="where the temporary cache folders go")
    ap.add_argument("--synthetic-blocks", type=int, default=448)
    ap.add_argument("--synthetic-block-bytes", type=int, default=737280)
    ap.add_argument("--only", default="1,2,3,4",
                    help="sections to run (1 also measures load vs dd on its real files)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    print(f"BLAS: {active_blas}")
    only = set(args.only.split(","))
    out: dict = {}
    if "1" in only:
        out["warm_restart"] = asyncio.run(warm_restart(
            args.model, [int(s) for s in args.sizes.split(",")], args))
    if "2" in only:
        out["load_vs_dd_synthetic"] = load_vs_dd_synthetic(args)
        print(json.dumps(out["load_vs_dd_synthetic"]))
    if "3" in only:
        out["nothing_to_hit"] = asyncio.run(nothing_to_hit(args.small_model, args))
        print(json.dumps(out["nothing_to_hit"]))
    if "4" in only:
        out["small_ram"] = asyncio.run(small_ram(args.small_model, args))
        print(json.dumps(out["small_ram"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
