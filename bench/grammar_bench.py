"""Structured output: which grammar engine, and what a constrained request costs.

    python -m blockserve.bench.grammar_bench engines --tokenizer PATH/tokenizer.json
    python -m blockserve.bench.grammar_bench decode [--model builtin]

``engines`` (no MLX; runs in any venv with the engines installed) walks a nested JSON
schema's document token by token with a batch of 16 matchers and reports the time to
compute the 16 token masks and advance them, per step, for each engine installed:
llguidance (a dependency), xgrammar and outlines-core (``pip install xgrammar
outlines-core``; both pull torch, so a scratch venv is best).

``decode`` runs the engine in process: 16 free sequences, then 15 free + 1 constrained
(the nested schema), then 8 + 8, alternated twice, all to ``--max-tokens`` (EOS
ignored). It reports the time per output token in the steady state; the target is that
a constrained neighbour costs the free sequences nothing (ratio <= 1.05).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16},
                 "minItems": 1, "maxItems": 4},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 30},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 5},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
DOC = ('{"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "poetry", '
       '"engines"], "address": {"city": "London", "zip": "12345"}, "scores": [9.5, 8.25, '
       '10]}')
BATCH = 16


def _steps(fill, advance, tokens: list[int]) -> list[float]:
    times = []
    for t in tokens:
        t0 = time.perf_counter()
        fill()
        advance(t)
        times.append(time.perf_counter() - t0)
    return times


def _llguidance(tokenizer_json: str, tokens: list[int], eos: int):
    import llguidance as llg
    import llguidance.numpy as llg_np
    vocab = llg.LLTokenizer(tokenizer_json, eos_token=eos)
    t0 = time.perf_counter()
    grammar = llg.LLMatcher.grammar_from_json_schema(SCHEMA)
    matchers = [llg.LLMatcher(vocab, grammar) for _ in range(BATCH)]
    compile_s = time.perf_counter() - t0
    mask = llg_np.allocate_token_bitmask(BATCH, vocab.vocab_size)

    def fill():  # what the engine does: one matcher per sequence, in turn
        for i, m in enumerate(matchers):
            llg_np.fill_next_token_bitmask(m, mask, i)

    def advance(t):
        for m in matchers:
            assert m.consume_token(t), m.get_error()
    return compile_s, lambda: [m.reset() for m in matchers], fill, advance


def _xgrammar(tokenizer_json: str, tokens: list[int], eos: int):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer
                                 .from_str(tokenizer_json))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf), stop_token_ids=[eos])
    t0 = time.perf_counter()
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(BATCH, len(hf))

    def fill():
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(mask, i)

    def advance(t):
        for m in matchers:
            assert m.accept_token(t)
    return compile_s, lambda: [m.reset() for m in matchers], fill, advance


def _outlines(tokenizer_json: str, tokens: list[int], eos: int):
    import numpy as np
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer_json)
    vocab: dict[str, list[int]] = {}
    for i in range(tok.get_vocab_size()):
        if i != eos:
            vocab.setdefault(tok.decode([i]), []).append(i)
    t0 = time.perf_counter()
    index = oc.Index(build_regex_from_schema(json.dumps(SCHEMA)), oc.Vocabulary(eos, vocab))
    guides = [oc.Guide(index) for _ in range(BATCH)]
    compile_s = time.perf_counter() - t0
    mask = np.zeros((BATCH, (tok.get_vocab_size() + 31) // 32), dtype=np.int32)

    def fill():
        for i, g in enumerate(guides):
            g.write_mask_into(mask[i].ctypes.data, mask[i].size, 4)

    def advance(t):
        for g in guides:
            g.advance(t)
    return compile_s, lambda: [g.reset() for g in guides], fill, advance


def engines(tokenizer_path: str, eos: int) -> list[dict]:
    from tokenizers import Tokenizer
    text = open(tokenizer_path).read()
    tok = Tokenizer.from_str(text)
    tokens = tok.encode(DOC, add_special_tokens=False).ids
    print(f"vocabulary {tok.get_vocab_size()}, document {len(tokens)} tokens, batch {BATCH}")
    rows = []
    for name, make in (("llguidance", _llguidance), ("xgrammar", _xgrammar),
                       ("outlines-core", _outlines)):
        try:
            compile_s, reset, fill, advance = make(text, tokens, eos)
        except ImportError as e:
            print(f"{name:<14} not installed ({e.name})")
            continue
        reset()
        _steps(fill, advance, tokens)  # warm
        reset()
        times = sorted(_steps(fill, advance, tokens))
        row = {"engine": name, "compile_ms": compile_s * 1e3,
               "step_mean_ms": statistics.mean(times) * 1e3,
               "step_p99_ms": times[int(0.99 * (len(times) - 1))] * 1e3,
               "step_max_ms": times[-1] * 1e3}
        rows.append(row)
        print(f"{name:<14} compile {row['compile_ms']:7.1f} ms   per step (16 masks + "
              f"advance): mean {row['step_mean_ms']:.2f} ms, p99 {row['step_p99_ms']:.2f} "
              f"ms, max {row['step_max_ms']:.2f} ms")
    return rows


async def _batch(sched, prompts, constraints, max_tokens: int) -> list[float]:
    """Run the prompts together; each one's time per output token over the second half
    of its tokens (by then every prompt of the batch has been prefilled)."""
    from blockserve.scheduler import Request, SamplingParams

    async def one(prompt, constraint):
        stamps = []
        req = Request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                             constraint=constraint))
        async for out in sched.submit(req):
            stamps.extend(time.perf_counter() for _ in out.token_ids)
        half = len(stamps) // 2
        return (stamps[-1] - stamps[half]) / (len(stamps) - 1 - half)
    return await asyncio.gather(*(one(p, c) for p, c in zip(prompts, constraints)))


async def decode(model: str, max_tokens: int) -> list[dict]:
    from blockserve.bench.workloads import random_text
    from blockserve.engine.text.structured import JsonFormat
    from blockserve.stack import StackConfig, build_stack, start_worker

    config = StackConfig(model=model, max_num_seqs=BATCH, kv_cache_memory_bytes=1 << 30)
    worker = start_worker(config)
    stack = build_stack(config, worker)
    stack.scheduler.start()
    constraint = stack.frontend.constrain(JsonFormat(SCHEMA))
    rng = random.Random(0)
    rows = {n: [] for n in (0, 1, 8)}
    try:
        for rep in range(2):
            for n_constrained in (0, 1, 8):
                prompts = [worker.tokenizer.encode(random_text(rng, 96))[:48]
                           for _ in range(BATCH)]
                constraints = [constraint] * n_constrained + [None] * (BATCH - n_constrained)
                tpot = await _batch(stack.scheduler, prompts, constraints, max_tokens)
                rows[n_constrained].append((tpot[n_constrained:], tpot[:n_constrained]))
    finally:
        worker.close()
    base = statistics.mean(t for free, _ in rows[0] for t in free)
    out = []
    for n, runs in rows.items():
        free = statistics.mean(t for f, _ in runs for t in f)
        cons = [t for _, c in runs for t in c]
        row = {"constrained": n, "free": BATCH - n, "free_tpot_ms": free * 1e3,
               "free_ratio": free / base,
               "constrained_tpot_ms": statistics.mean(cons) * 1e3 if cons else None}
        out.append(row)
        print(f"{BATCH - n:>2} free + {n} constrained: free {row['free_tpot_ms']:.1f} ms/token "
              f"({row['free_ratio']:.3f}x the all-free batch; target <= 1.05)"
              + (f", constrained {row['constrained_tpot_ms']:.1f} ms/token" if cons else ""))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("engines", help="mask cost per engine (no MLX)")
    e.add_argument("--tokenizer", required=True, help="a tokenizer.json")
    e.add_argument("--eos", type=int, default=2)
    d = sub.add_parser("decode", help="a constrained request's cost to its batch")
    d.add_argument("--model", default=None, help="default: the built-in model")
    d.add_argument("--max-tokens", type=int, default=64)
    for p in (e, d):
        p.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.cmd == "engines":
        rows = engines(args.tokenizer, args.eos)
    else:
        import blockserve.engine.runtime  # noqa: F401  (BLAS preload before mlx)
        rows = asyncio.run(decode(args.model, args.max_tokens))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
