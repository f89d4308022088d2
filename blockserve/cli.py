"""The ``blockserve`` command line. ``blockserve.stack`` builds what ``serve`` runs;
importing this module loads no MLX, so ``blockserve bench`` runs anywhere."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from blockserve.server.limits import Limits

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _serve_args(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI and Anthropic APIs)")
    p.add_argument("--model", default=None,
                   help="a local mlx-lm directory, a hub id, a .gguf file (llama, qwen2, "
                        "qwen3; converted once), or a demo id such as demo:tiny (default: "
                        "SmolLM2-135M-Instruct, fetched and converted on first use)")
    p.add_argument("--revision", default=None, help="hub revision")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--memory-limit", type=parse_bytes, default=None, metavar="SIZE",
                   help="the most memory the server holds, all of it: weights, runtime, a "
                        "step's activations (measured), running requests' K/V and the "
                        "prefix cache, which gets what running requests leave (default: "
                        "85%% of Metal's recommended working set on a Mac, 75%% of RAM "
                        "elsewhere; the start-up log prints the split)")
    p.add_argument("--kv-cache-memory-bytes", type=parse_bytes, default=None, metavar="SIZE",
                   help="an optional cap on the prefix cache, inside --memory-limit")
    p.add_argument("--disk-cache-dir", default=None, metavar="DIR",
                   help="keep evicted and checkpoint KV blocks in DIR, so the prefix cache "
                        "outlives RAM and restarts (default: off)")
    p.add_argument("--disk-cache-bytes", type=parse_bytes, default=None, metavar="SIZE",
                   help="byte budget of --disk-cache-dir (default: the smaller of 10%% of "
                        "its free space and 32GiB)")
    p.add_argument("--active-kv-memory-bytes", type=parse_bytes, default=None,
                   metavar="SIZE",
                   help="an optional cap on running requests' K/V, inside --memory-limit "
                        "(they take it as they grow; past it the newest is preempted)")
    p.add_argument("--max-num-seqs", type=int, default=16,
                   help="maximum number of requests generating at once")
    p.add_argument("--max-queue", type=int, default=256,
                   help="maximum waiting requests; beyond it, HTTP 429")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context limit in tokens (default: the model's)")
    p.add_argument("--prefill-step-size", type=int, default=256,
                   help="prompt tokens per forward pass while no stream decodes (256 "
                        "measured best on CPU)")
    p.add_argument("--token-budget", type=int, default=64,
                   help="tokens per forward pass while streams decode: their decode tokens, "
                        "then prefill chunks (ragged runner; BENCHMARKS.md, the step grid)")
    p.add_argument("--runner", choices=("auto", "ragged", "batch"), default="auto",
                   help="ragged: decodes ride along with prefill chunks in one forward "
                        "(llama, mistral, qwen2, qwen3, gemma); batch: mlx-lm's "
                        "BatchGenerator; auto: ragged where the model family allows")
    p.add_argument("--speculative-lookup", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="prompt-lookup speculative decoding: a sequence drafts its next "
                        "tokens from its own context (an edit copies its file) and one "
                        "forward verifies them; greedy and seeded outputs are unchanged, "
                        "and it turns itself off per sequence when drafts don't pay "
                        "(ragged runner)")
    p.add_argument("--prompt-concurrency", type=int, default=None,
                   help="prompts prefilled together in one batch (default: 1 on the CPU, "
                        "where batching only delays the first tokens; 8 on a GPU)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="an optional cap on max_tokens, also the default when a request "
                        "gives none (default: no cap; a request without max_tokens may "
                        "generate to the end of the context, as with vLLM and OpenAI)")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require a key (Authorization: Bearer, or x-api-key); repeatable: "
                        "each key is a tenant, whose prefix cache no other tenant shares "
                        "(default: $BLOCKSERVE_API_KEY, if set)")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="more keys, one per line (# starts a comment)")
    p.add_argument("--admin-key", default=None, metavar="KEY",
                   help="the key that may flush and see the whole prefix cache "
                        "(/v1/cache/reset, /v1/cache/stats); a tenant key flushes and sees "
                        "only its own (default: $BLOCKSERVE_ADMIN_KEY; with tenant keys and "
                        "no admin key, nobody flushes another's cache)")
    p.add_argument("--max-body-bytes", type=parse_bytes, default=Limits.max_body_bytes,
                   help="largest request body, after decompression (default: 32MiB)")
    p.add_argument("--body-timeout", type=float, default=Limits.body_timeout,
                   metavar="SECONDS", help="time a client has to send a whole body")
    p.add_argument("--max-messages", type=int, default=Limits.max_messages,
                   help="most messages in one request")
    p.add_argument("--idle-timeout", type=float, default=75.0, metavar="SECONDS",
                   help="close a connection that sends no complete request for this long "
                        "(idle keep-alive, or headers that never end)")
    p.add_argument("--stalled-stream-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="abort a stream whose client reads nothing for this long, and free "
                        "its blocks")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, stop admitting and let running requests finish "
                        "for this long before aborting the rest (a second signal aborts "
                        "at once)")
    p.add_argument("--schedule-order", choices=("finish", "prefix"), default="finish",
                   help="which waiting request starts first, within each key's fair "
                        "share and with aging: finish, what finishes soonest (the least "
                        "prefill left after its cache hit, then the fewest tokens to "
                        "generate); prefix, the longest cached prefix (SGLang's LPM)")
    p.add_argument("--no-inflight-sharing", action="store_true",
                   help="do not make requests wait for a shared prefix being computed")
    p.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="a name clients may use for the model (repeatable; the first is "
                        "reported; default: the --model value)")
    p.add_argument("--log-level", default="INFO")


def api_keys(args: argparse.Namespace) -> list[str]:
    """Keys from --api-key, --api-key-file and $BLOCKSERVE_API_KEY, in that order."""
    keys = list(args.api_key or [])
    if args.api_key_file:
        with open(args.api_key_file) as f:
            keys += [line.split("#", 1)[0].strip() for line in f]
    if not keys and os.environ.get("BLOCKSERVE_API_KEY"):
        keys.append(os.environ["BLOCKSERVE_API_KEY"])
    return [k for k in dict.fromkeys(keys) if k]


def stack_config(args: argparse.Namespace) -> StackConfig:
    from dataclasses import replace

    from blockserve.stack import StackConfig

    return StackConfig(
        model=args.model, revision=args.revision, block_size=args.block_size,
        memory_limit=args.memory_limit, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        active_kv_memory_bytes=args.active_kv_memory_bytes, max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue, max_model_len=args.max_model_len,
        prefill_step_size=args.prefill_step_size, prompt_concurrency=args.prompt_concurrency,
        token_budget=args.token_budget, runner=args.runner,
        speculative_lookup=args.speculative_lookup, default_max_tokens=args.max_tokens,
        max_tokens_cap=args.max_tokens,
        api_keys=api_keys(args),
        admin_key=args.admin_key or os.environ.get("BLOCKSERVE_ADMIN_KEY") or None,
        share_inflight=not args.no_inflight_sharing, schedule_order=args.schedule_order,
        served_model_names=args.served_model_name or [],
        limits=replace(Limits(), max_body_bytes=args.max_body_bytes,
                       body_timeout=args.body_timeout, max_messages=args.max_messages),
        stalled_stream_timeout=args.stalled_stream_timeout,
        disk_cache_dir=args.disk_cache_dir, disk_cache_bytes=args.disk_cache_bytes)


def serve(args: argparse.Namespace) -> int:
    import asyncio

    from aiohttp import web

    from blockserve.stack import build_stack

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = stack_config(args)
    try:
        stack = build_stack(config)
    except (ValueError, RuntimeError, OSError) as e:  # a bad model file, a failed fetch
        logging.getLogger("blockserve").error("cannot serve %s: %s",
                                              args.model or "the built-in model", e)
        return 2
    app = stack.app()

    async def close_engine(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, stack.close_cache)  # spills RAM blocks to disk
        await loop.run_in_executor(None, stack.worker.close)

    app.on_cleanup.append(close_engine)
    loaded = stack.worker.loaded
    logging.getLogger("blockserve").info(
        "serving %s (as %s) on http://%s:%d | %s | block size %d, %d K/V bytes a token, "
        "context %d | %s", loaded.model_id, ", ".join(stack.frontend.model_names),
        args.host, args.port, stack.worker.describe_backend(), config.block_size,
        loaded.kv_bytes_per_token, stack.scheduler.max_prompt_tokens,
        stack.scheduler.config.memory.describe())
    disk = stack.prefix.disk
    if disk is not None:
        ds = disk.stats()
        logging.getLogger("blockserve").info(
            "disk cache at %s: budget %.2f GiB, %d files (%.2f GiB) indexed in %.2f s",
            disk.path, disk.budget_bytes / 2**30, ds.files, ds.bytes_used / 2**30,
            disk.scan_seconds)
    return asyncio.run(_run(app, stack.scheduler, args.host, args.port, args.drain_timeout,
                            args.idle_timeout))


async def _run(app, scheduler, host: str, port: int, drain_timeout: float,
               idle_timeout: float) -> int:
    """Serve until SIGTERM or SIGINT, then drain: health says so and new requests get a
    503, running ones finish within ``drain_timeout``, and only then is the rest aborted
    (their streams end with finish reason "abort"). A second signal skips the wait.
    If the engine dies, every request has failed already: exit 1 at once, so that a
    supervisor restarts the process (it never hangs)."""
    import asyncio
    import signal

    from aiohttp import web

    log = logging.getLogger("blockserve")
    runner = web.AppRunner(app, handler_cancellation=True, keepalive_timeout=idle_timeout)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    loop = asyncio.get_running_loop()
    signals = asyncio.Queue()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    got_signal = asyncio.create_task(signals.get())
    engine_died = asyncio.create_task(scheduler.stopped.wait())
    await asyncio.wait([got_signal, engine_died], return_when=asyncio.FIRST_COMPLETED)
    if engine_died.done():
        log.error("exiting: the engine stopped (%s)", scheduler.failed)
        await runner.cleanup()
        return 1
    engine_died.cancel()
    sig = got_signal.result()
    scheduler.drain()
    log.info("%s: draining %d running and %d waiting requests (up to %.0f s)",
             signal.Signals(sig).name, scheduler.num_running, scheduler.num_waiting,
             drain_timeout)
    deadline = loop.time() + drain_timeout
    while not scheduler.idle and loop.time() < deadline and signals.empty():
        await asyncio.sleep(0.05)
    if not scheduler.idle:
        log.info("aborting %d requests still running", scheduler.num_running
                 + scheduler.num_waiting)
    await runner.cleanup()  # aborts what is left, closes connections and the engine
    return 0


def demo(args: argparse.Namespace) -> int:
    from blockserve.engine.models.demo import demo_spec, ensure_demo_model

    print(ensure_demo_model(demo_spec(args.size, args.arch, args.seed)))
    return 0


def bench(args: argparse.Namespace) -> int:
    from blockserve.bench.run import main as run_bench

    return run_bench(args)


def compare(args: argparse.Namespace) -> int:
    from blockserve.bench.compare import main as run_compare

    return run_compare(args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="blockserve", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    _serve_args(sub)
    d = sub.add_parser("demo", help="build (or find) an offline demo model; prints its path")
    d.add_argument("--size", default="tiny", help="tiny (tests) or bench (~80M parameters)")
    d.add_argument("--arch", default="qwen3",
                   help="qwen3, llama, qwen3_next (hybrid SSM) or gemma3_text (sliding window)")
    d.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("bench", help="load-test an OpenAI-compatible server")
    from blockserve.bench.run import add_args

    add_args(b)
    c = sub.add_parser("compare", help="blockserve against mlx_lm server, same model and "
                                       "machine, one run; writes bench/results/")
    from blockserve.bench.compare import add_args as add_compare_args

    add_compare_args(c)
    args = ap.parse_args(argv)
    return {"serve": serve, "demo": demo, "bench": bench, "compare": compare}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
