"""The ``blockserve`` command line, and the one place that wires engine, pool,
scheduler and server together."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def _serve_args(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI and Anthropic APIs)")
    p.add_argument("--model", default=None,
                   help="local path, hub id, or demo id (default: demo:tiny, built offline)")
    p.add_argument("--revision", default=None, help="hub revision")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    ram = total_ram()
    p.add_argument("--kv-cache-memory-bytes", type=parse_bytes, default=ram // 4,
                   help="byte budget of the prefix cache (default: 1/4 of RAM)")
    p.add_argument("--active-kv-memory-bytes", type=parse_bytes, default=ram // 4,
                   help="KV budget of running requests, prompt + max_tokens "
                        "(default: 1/4 of RAM)")
    p.add_argument("--max-num-seqs", type=int, default=16,
                   help="maximum number of requests generating at once")
    p.add_argument("--max-queue", type=int, default=256,
                   help="maximum waiting requests; beyond it, HTTP 429")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context limit in tokens (default: the model's)")
    p.add_argument("--prefill-step-size", type=int, default=256,
                   help="prompt tokens per forward pass (256 measured best on CPU)")
    p.add_argument("--prompt-concurrency", type=int, default=8,
                   help="prompts prefilled together in one batch")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="default max_tokens when a request gives none")
    p.add_argument("--api-key", default=os.environ.get("BLOCKSERVE_API_KEY"),
                   help="require this key (Authorization: Bearer, or x-api-key)")
    p.add_argument("--no-inflight-sharing", action="store_true",
                   help="do not make requests wait for a shared prefix being computed")
    p.add_argument("--log-level", default="INFO")


def serve(args: argparse.Namespace) -> int:
    import asyncio

    import engine  # noqa: F401  (first: the BLAS preload)
    import mlx.core as mx
    from aiohttp import web

    from engine.blas import active_blas
    from engine.frontend import TokenizerFrontend
    from engine.worker import EngineWorker
    from kvpool import BlockPool
    from scheduler import Scheduler, SchedulerConfig
    from server.app import ServerConfig, create_app

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = EngineWorker(args.model, block_size=args.block_size,
                          max_running=args.max_num_seqs,
                          prefill_batch_size=args.prompt_concurrency,
                          prefill_step_size=args.prefill_step_size, revision=args.revision)
    loaded = worker.loaded
    pool = BlockPool(args.block_size, args.kv_cache_memory_bytes)
    scheduler = Scheduler(worker, pool, SchedulerConfig(
        max_running=args.max_num_seqs, max_queue=args.max_queue,
        max_prompt_tokens=args.max_model_len,
        active_kv_budget_bytes=args.active_kv_memory_bytes,
        share_inflight=not args.no_inflight_sharing))
    frontend = TokenizerFrontend(loaded.model_id, worker.tokenizer,
                                 args.max_model_len or loaded.max_context)
    app = create_app(scheduler, frontend, ServerConfig(args.max_tokens, args.api_key))

    async def close_engine(app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, worker.close)

    app.on_cleanup.append(close_engine)
    logging.getLogger("blockserve").info(
        "serving %s on http://%s:%d | backend %s, BLAS %s | block size %d, KV cache budget "
        "%.2f GiB (%d bytes/token, ~%d blocks), active KV budget %.2f GiB, context %d",
        loaded.model_id, args.host, args.port, mx.default_device(), active_blas,
        args.block_size, args.kv_cache_memory_bytes / 2**30, loaded.kv_bytes_per_token,
        args.kv_cache_memory_bytes // (loaded.kv_bytes_per_token * args.block_size),
        args.active_kv_memory_bytes / 2**30, scheduler.max_prompt_tokens)
    web.run_app(app, host=args.host, port=args.port, handler_cancellation=True,
                shutdown_timeout=10, print=None)
    return 0


def demo(args: argparse.Namespace) -> int:
    from engine.demo import demo_spec, ensure_demo_model

    print(ensure_demo_model(demo_spec(args.size, args.arch, args.seed)))
    return 0


def bench(args: argparse.Namespace) -> int:
    from bench.run import main as run_bench

    return run_bench(args)


def compare(args: argparse.Namespace) -> int:
    from bench.compare import main as run_compare

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
    from bench.run import add_args

    add_args(b)
    c = sub.add_parser("compare", help="blockserve against mlx_lm server, same model and "
                                       "machine, one run; writes bench/results/")
    from bench.compare import add_args as add_compare_args

    add_compare_args(c)
    args = ap.parse_args(argv)
    return {"serve": serve, "demo": demo, "bench": bench, "compare": compare}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
