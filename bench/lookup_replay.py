"""Replay prompt-lookup drafting on recorded greedy replies: policies compared in
milliseconds, exactly, without the model.

    python -m blockserve.bench.lookup_replay --record replies.json [--seed 4]
    python -m blockserve.bench.lookup_replay replies.json [more.json ...]

A greedy reply does not depend on speculation, so once the edit workload's replies are
recorded (``--record``: SmolLM2, greedy, EOS ends a reply), which draft tokens a policy
would have had accepted is known for every step. The step count is exact; the time is
a cost model, ``step_cost + tokens`` in units of one token's cost (``STEP_COST_TOKENS``
in ``engine.runtime.runner``, from the verify grid in BENCHMARKS.md), with the step's
own cost shared by ``S`` sequences decoding together.
"""

from __future__ import annotations

import argparse
import json

from blockserve.engine.runtime.lookup import Drafting
from blockserve.engine.text.chat import common_prefix


def replay(prompt: list[int], reply: list[int], streams: int, step_cost: float
           ) -> tuple[int, float, float]:
    """(steps, modelled cost with speculation, without) of one reply."""
    d = Drafting(prompt + reply[:1])
    share = 1.0 + step_cost / streams
    pos, steps, cost = 1, 0, 0.0
    while pos < len(reply):
        draft = d.draft(len(reply) - pos - 1, share)
        truth = reply[pos: pos + len(draft) + 1]
        m = common_prefix(draft, truth)
        d.update(len(draft), truth[: m + 1])
        steps += 1
        cost += step_cost / streams + 1 + len(draft)
        pos += m + 1
    return steps, cost, (step_cost / streams + 1) * (len(reply) - 1)


def record(path: str, seed: int, requests: int, tokens: int) -> None:
    """The edit workload's greedy replies on SmolLM2, as prompt and reply token ids."""
    import mlx.core as mx  # the model only here: a replay runs none
    from mlx_lm.generate import StopSequences, generation_stream
    from mlx_lm.utils import load

    from blockserve.bench.workloads import edit_sessions
    from blockserve.engine.models.loader import resolve
    from blockserve.engine.runtime.runner import RaggedRunner

    with mx.stream(generation_stream):
        model, tok = load(resolve("SmolLM2-135M-Instruct")[1])[:2]
        w = edit_sessions(requests, 1500, tokens, seed=seed,
                          trim=lambda text, n: tok.decode(tok.encode(text)[:n]))
        prompts = [tok.apply_chat_template(s.messages_for(0), add_generation_prompt=True)
                   for s in w.sessions]
        runner = RaggedRunner(model, token_budget=256, prefill_step_size=256)
        stops = StopSequences([[t] for t in sorted(tok.eos_token_ids)])
        uids = runner.insert_segments([[p] for p in prompts], [tokens] * len(prompts),
                                      stop_sequences=[stops] * len(prompts))
        out: dict[int, list[int]] = {u: [] for u in uids}
        while True:
            p, g = runner.next()
            if not p and not g:
                break
            for r in g:
                out[r.uid].append(r.token)
    with open(path, "w") as f:
        json.dump([{"prompt": p, "output": out[u]} for p, u in zip(prompts, uids)], f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help="recorded replies to replay")
    p.add_argument("--record", metavar="PATH", help="record the edit workload's replies")
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--output-tokens", type=int, default=400)
    p.add_argument("--streams", default="1,4,8", help="sequences decoding together")
    p.add_argument("--step-cost", type=float, default=None,
                   help="a step's own cost in tokens (default: the runner's)")
    args = p.parse_args()
    if args.record:
        record(args.record, args.seed, args.requests, args.output_tokens)
    if args.step_cost is None:
        from blockserve.engine.runtime.runner import STEP_COST_TOKENS

        args.step_cost = STEP_COST_TOKENS
    print("| replies | streams | steps (plain) | steps | modelled speed-up |")
    print("|---|---|---|---|---|")
    for path in args.files + ([args.record] if args.record else []):
        with open(path) as f:
            recs = json.load(f)
        for s in (int(x) for x in args.streams.split(",")):
            runs = [replay(r["prompt"], r["output"], s, args.step_cost) for r in recs]
            plain = sum(len(r["output"]) - 1 for r in recs)
            print(f"| {path} | {s} | {plain} | {sum(x[0] for x in runs)} | "
                  f"{sum(x[2] for x in runs) / sum(x[1] for x in runs):.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
