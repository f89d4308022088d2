"""The time of one ragged forward at (prefill chunk tokens, decode tokens), in process.

    python -m blockserve.bench.step_grid [--model demo:bench] [--context 1024]
        [--chunks 0,32,64,128,256,512] [--decodes 0,1,4,8,16] [--reps 3]

Each decode sequence and the prefilling prompt have ``--context`` tokens in their
caches already (random K/V: timing does not depend on the values), as on the agent
and shared-prefix workloads. A cell is the fastest of ``--reps`` forwards (the least disturbed by other
processes on a shared machine), each timed
to the end of its evaluation; the caches are trimmed back after each one. The table
tells the step's token budget: where decode tokens ride along with a chunk for
nearly nothing, and how long a step of that many tokens takes.
"""

from __future__ import annotations

import argparse
import time

import blockserve.engine.runtime  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from blockserve.engine.runtime import ragged
from blockserve.engine.models.loader import load_model


def _filled(model, context: int) -> list:
    """A fresh cache list holding ``context`` tokens of random K/V."""
    caches = make_prompt_cache(model)
    for layer, c in zip(model.model.layers, caches):
        attn = layer.self_attn
        dim = attn.k_proj.weight.shape[0] // attn.n_kv_heads
        kv = mx.random.normal((2, 1, attn.n_kv_heads, context, dim))
        c.update_and_fetch(kv[0], kv[1])
    mx.eval([c.state for c in caches])
    return caches


def time_step(model, chunk: int, decode_caches: list, prompt_caches: list | None,
              reps: int) -> float:
    """The fastest of ``reps`` forwards, in seconds, with ``chunk`` prefill tokens and one decode
    token per entry of ``decode_caches``."""
    n_decode = len(decode_caches)
    tokens = [7] * (n_decode + chunk)
    decodes = None
    if n_decode:  # batched as the runner batches them: one BatchKVCache per layer
        decodes = ragged.Decodes(n_decode, [BatchKVCache.merge([c[i] for c in decode_caches])
                                            for i in range(len(decode_caches[0]))])
        mx.eval([c.state for c in decodes.caches])
    spans = []
    rows = list(range(n_decode))
    if chunk:
        spans.append(ragged.Span(n_decode, chunk, prompt_caches))
        rows.append(n_decode + chunk - 1)
    times = []
    for _ in range(reps):
        offsets = [s.caches[0].offset for s in spans]
        batched = decodes.caches if decodes else []
        t = time.perf_counter()
        logits = ragged.forward(model, tokens, decodes, spans, rows)
        mx.eval(logits, [c.state for s in spans for c in s.caches],
                [c.state for c in batched])
        times.append(time.perf_counter() - t)
        for s, off in zip(spans, offsets):
            for c in s.caches:
                c.trim(c.offset - off)
        for c in batched:
            c.trim(1)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo:bench")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--chunks", default="0,32,64,128,256,512")
    p.add_argument("--decodes", default="0,1,4,8,16")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    chunks = [int(x) for x in args.chunks.split(",")]
    decodes = [int(x) for x in args.decodes.split(",")]
    loaded = load_model(args.model)
    model = loaded.model
    if not ragged.supports(model, make_prompt_cache(model)):
        raise SystemExit(f"{args.model}: the ragged runner does not cover this family")
    pool = [_filled(model, args.context) for _ in range(max(decodes))]
    prompt = _filled(model, args.context)
    time_step(model, 16, pool[:2], prompt, 1)  # warm-up
    print(f"Model `{loaded.model_id}`, context {args.context} tokens per sequence; "
          f"ms per forward (fastest of {args.reps})\n")
    print("| prefill chunk \\ decode tokens | " + " | ".join(map(str, decodes)) + " |")
    print("|---" * (len(decodes) + 1) + "|")
    for chunk in chunks:
        cells = []
        for d in decodes:
            if chunk == 0 and d == 0:
                cells.append("")
                continue
            cells.append(f"{1000 * time_step(model, chunk, pool[:d], prompt, args.reps):.0f}")
        print(f"| {chunk} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
