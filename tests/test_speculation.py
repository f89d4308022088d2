"""Prompt-lookup speculative decoding: drafts from the sequence's own context, verified
in the ragged batch, leave every output exactly as plain decoding gives it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import StopSequences, generation_stream
from mlx_lm.models.cache import KVCache

from blockserve.engine.models.loader import load_weights
from blockserve.engine.runtime import lookup, runner
from blockserve.engine.runtime.lookup import Drafting, PromptLookup
from blockserve.engine.runtime.runner import RaggedRunner
from blockserve.engine.runtime.sampling import greedy, logits_processors, make_sampler
from blockserve.scheduler import SamplingParams
from tests.engine_harness import reference_tokens

# A prompt that repeats itself: its continuation is worth drafting from the context.
BASE = [(i * 17) % 300 + 3 for i in range(40)]
PROMPTS = [BASE * 3, [(i * 7) % 50 + 5 for i in range(60)], list(range(10, 90))]
N = 48


@pytest.fixture(autouse=True)
def _stream():
    with mx.stream(generation_stream):
        yield


@pytest.fixture
def keep_drafting(monkeypatch):
    """Every window pays and a step costs so much that any draft is worth verifying:
    a random model's sequences draft to the end, so the tests of the verify see many
    drafts, accepted and rejected."""
    monkeypatch.setattr(Drafting, "MIN_SAVED", 0)
    monkeypatch.setattr(runner, "STEP_COST_TOKENS", 1e6)
    monkeypatch.setattr(runner, "MEASURED_COSTS", False)  # the fixed price, not this CPU's


@pytest.fixture(scope="module")
def model():
    return load_weights("demo:tiny").model


def generate(model, prompts, n, *, speculative, samplers=None, stops=None, processors=None,
             budget=64):
    """Run prompts to the end: (tokens, logprob of each, finish caches) per prompt."""
    runner = RaggedRunner(model, token_budget=budget, prefill_step_size=budget,
                          speculative=speculative)
    uids = runner.insert_segments([[p] for p in prompts], max_tokens=[n] * len(prompts),
                                  samplers=samplers, stop_sequences=stops,
                                  logits_processors=processors)
    tokens: dict[int, list[int]] = {u: [] for u in uids}
    logprobs: dict[int, list[float]] = {u: [] for u in uids}
    ends = {}
    while True:
        p, g = runner.next()
        if not p and not g:
            break
        for r in g:
            tokens[r.uid].append(r.token)
            logprobs[r.uid].append(r.logprobs[r.token].item())
            if r.finish_reason:
                ends[r.uid] = (r.prompt_cache, r.all_tokens)
    return [tokens[u] for u in uids], [logprobs[u] for u in uids], \
        [ends[u] for u in uids], runner.draft_stats


# ---- the lookup -----------------------------------------------------------------------

def test_the_longest_most_recent_match_is_proposed():
    lk = PromptLookup([1, 2, 3, 9, 9, 2, 3, 7, 8, 5, 2, 3])
    # "2 3" ends the context; its longest earlier match is "2 3" (twice), most recent
    # first: the one followed by 7 8; "5 2 3" occurs nowhere else
    assert lk.propose(2) == [7, 8]
    assert lk.propose(10) == [7, 8, 5, 2, 3]  # up to the end of the context
    lk.extend([1, 2, 3])
    assert lk.propose(3) == [9, 9, 2]  # "1 2 3" now matches, longer than "2 3"
    # a longer match wins over a more recent shorter one: "7 8 5" -> 1, not "8 5" -> 2
    assert PromptLookup([7, 8, 5, 1, 0, 8, 5, 2, 7, 8, 5]).propose(1) == [1]
    assert lookup.MIN_NGRAM == 2 and PromptLookup([4, 6, 8, 4]).propose(4) == []


def test_no_match_no_draft_and_the_suffix_never_matches_itself():
    assert PromptLookup([1, 2, 3, 4]).propose(4) == []
    assert PromptLookup([5, 5]).propose(4) == []
    assert PromptLookup([5, 5, 5]).propose(4) == [5]
    assert PromptLookup([5, 6, 5, 6]).propose(4) == [5, 6]
    assert PromptLookup([1, 2, 3, 1, 2]).propose(0) == []


def test_the_lookup_grows_past_its_buffer():
    lk = PromptLookup([])
    seq = list(np.random.default_rng(0).integers(0, 50, 1000))
    for t in seq:
        lk.extend([t])
    assert len(lk) == 1000
    lk.extend(seq[100:103])
    # The old tokens survived the growth: the proposal is what a plain search of the
    # whole context finds, five tokens long.
    context = [int(t) for t in seq + seq[100:103]]
    assert lk.propose(5) == _search(context, 5) and len(lk.propose(5)) == 5


def _search(context: list[int], k: int) -> list[int]:
    """The lookup's rule, by brute force: the longest suffix (``MAX_NGRAM`` tokens down
    to ``MIN_NGRAM``) that occurred earlier, at its most recent occurrence; the ``k``
    tokens that followed it."""
    n = len(context)
    for length in range(min(lookup.MAX_NGRAM, n - 1), lookup.MIN_NGRAM - 1, -1):
        suffix = context[n - length:]
        for end in range(n - 2, length - 2, -1):  # the match ends before the suffix's end
            if context[end - length + 1 : end + 1] == suffix:
                return context[end + 1 : end + 1 + k]
    return []


def test_drafting_grows_and_shrinks():
    d = Drafting(list(range(1, 20)) * 3)
    assert d.k == lookup.FIRST_DRAFT
    assert d.draft(8, share=1e6) == [1, 2, 3, 4]  # "... 18 19" -> what followed it
    d.update(4, [1, 2, 3, 4, 5])  # all four accepted, and the sample after them
    assert d.k == min(2 * lookup.FIRST_DRAFT, lookup.MAX_DRAFT)
    assert d.draft(8, share=1e6) == list(range(6, 6 + d.k))
    d.update(d.k, [6, 999])  # one accepted, then the model wrote something new
    assert d.k == 2 and d.on


def _always_proposing(seed: int = 0) -> tuple[Drafting, np.random.Generator]:
    """A sequence whose every pair of tokens occurred before: always a proposal."""
    rng = np.random.default_rng(seed)
    return Drafting([int(t) for t in rng.integers(0, 5, 400)]), rng


def _step(d: Drafting, right: int) -> None:
    """A verify whose first ``right`` proposed tokens come true, then a wrong one."""
    draft = d.draft(8, share=1e6)
    wrong = (d.proposal[right] + 1) % 5 if right < len(d.proposal) else 0
    d.update(len(draft), d.proposal[:right] + [wrong])


def test_drafting_pauses_then_gives_up():
    d, _ = _always_proposing()
    for _ in range(Drafting.WINDOW):  # a window that pays
        _step(d, 2)
    for strike in range(1, Drafting.MAX_STRIKES + 1):  # windows that fail: pauses
        for _ in range(Drafting.WINDOW):
            _step(d, 0)
        assert d.on and d._pause == Drafting.WINDOW << (strike - 1)
        for _ in range(Drafting.WINDOW << (strike - 1)):
            assert d.draft(8, share=1e6) == []
            d.update(0, [1])
        assert d.draft(8, share=1e6)  # drafting again
    for _ in range(Drafting.WINDOW):
        _step(d, 0)
    assert not d.on and d.draft(8, share=1e6) == []


def test_text_whose_proposals_fail_stops_drafting_after_one_window():
    d, _ = _always_proposing(1)
    for _ in range(Drafting.WINDOW):
        assert d.on
        _step(d, 0)
    assert not d.on


def test_text_with_nothing_to_propose_stops_drafting_after_a_while():
    d = Drafting(list(range(100)))
    for i in range(Drafting.MAX_IDLE):
        assert d.on and d.draft(8, share=1e6) == []
        d.update(0, [1000 + i])
    assert not d.on


def test_the_hit_rate_prices_the_draft(monkeypatch):
    """A proposal is scored against what came, drafted or not; the draft keeps the
    tokens whose chance of acceptance outweighs their cost."""
    monkeypatch.setattr(Drafting, "MIN_SAVED", 0)  # the rate alone, never switched off
    d = Drafting([1, 2, 3, 4, 5, 6, 7, 8, 9] * 3 + [1, 2])
    assert d.rate == 0.5
    assert d.draft(8, share=1.5) == []  # 0.5 * 1.5 < 1: nothing worth verifying
    assert d.proposal == [3, 4, 5, 6]
    d.update(0, [3])  # the proposal's first token came true
    assert d.rate > 0.5
    for _ in range(10):  # the text keeps copying: drafts get longer
        d.draft(8, share=6.0)
        d.update(0, d.proposal[:1])
    assert d.rate > 0.9 and d.worth(1.5) >= 3 and d.worth(6.0) == lookup.MAX_DRAFT
    # Text whose every pair of tokens occurred before, continued at random: the lookup
    # always proposes something, and it rarely comes true.
    rng = np.random.default_rng(0)
    d = Drafting(list(rng.integers(0, 5, 400)))
    for t in rng.integers(0, 5, 30):
        d.draft(8, share=6.0)
        assert d.proposal
        d.update(0, [int(t)])
    assert d.rate < 0.35 and d.worth(1.5) == 0


# ---- exactness in the runner ----------------------------------------------------------

def test_greedy_output_is_unchanged_and_drafts_were_verified(model, keep_drafting):
    plain, plain_lp, _, none = generate(model, PROMPTS, N, speculative=False)
    spec, spec_lp, ends, stats = generate(model, PROMPTS, N, speculative=True)
    assert none.steps == 0
    assert stats.accepted > 0 and stats.drafted > stats.accepted  # accepts and rejects
    assert spec == plain
    assert spec[0] == reference_tokens(model, PROMPTS[0], N)
    assert np.allclose(spec_lp, plain_lp, atol=1e-4)
    for (cache, tokens), prompt, out in zip(ends, PROMPTS, spec):
        # the cache holds the prompt and every output token but the last (never fed)
        assert tokens == prompt + out[:-1]
        assert all(c.offset == len(tokens) for c in cache)


def test_a_cache_that_is_not_trimmed_changes_the_output(model, keep_drafting, monkeypatch):
    """The exactness test can fail: rejected drafts left in the cache corrupt it."""
    monkeypatch.setattr(KVCache, "trim", lambda self, n: 0)
    spec, _, _, stats = generate(model, PROMPTS[2:], N, speculative=True)
    assert stats.drafted > stats.accepted
    assert spec[0] != reference_tokens(model, PROMPTS[2], N)


def test_seeded_sampling_draws_the_same_tokens_with_and_without_speculation(model, keep_drafting):
    params = [SamplingParams(temperature=0.1, seed=s, max_tokens=N) for s in (1, 2, 3)]
    outs = []
    for speculative in (False, True):
        samplers = [make_sampler(p) for p in params]
        tokens, _, _, stats = generate(model, PROMPTS, N, speculative=speculative,
                                       samplers=samplers)
        outs.append(tokens)
    assert stats.accepted > 0 and stats.drafted > stats.accepted
    assert outs[0] == outs[1]


def test_a_stop_token_inside_an_accepted_draft_ends_the_sequence_there(model, keep_drafting):
    prompt, n = PROMPTS[2], 32
    ref = reference_tokens(model, prompt, n)
    inside = 0
    for stop in dict.fromkeys(ref[8:]):  # each distinct token, in order of appearance
        cut = ref.index(stop) + 1
        spec, _, ends, stats = generate(model, [prompt], n, speculative=True,
                                        stops=[StopSequences([[stop]])])
        assert spec[0] == ref[:cut]
        cache, tokens = ends[0]
        assert tokens == prompt + ref[: cut - 1]
        assert all(c.offset == len(tokens) for c in cache)
        inside += stats.accepted > 0
    assert inside  # some stops came while drafts were being accepted


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_max_tokens_bounds_the_drafts(model, keep_drafting, n):
    spec, _, ends, _ = generate(model, PROMPTS, n, speculative=True)
    assert spec == [reference_tokens(model, p, n) for p in PROMPTS]


def test_processors_keep_a_sequence_in_the_batch(model):
    params = SamplingParams(repetition_penalty=1.3)
    spec, _, _, stats = generate(model, PROMPTS, 16, speculative=True,
                                 samplers=[greedy] * 3,
                                 processors=[logits_processors(params) for _ in PROMPTS])
    plain = generate(model, PROMPTS, 16, speculative=False, samplers=[greedy] * 3,
                     processors=[logits_processors(params) for _ in PROMPTS])[0]
    assert stats.steps == 0 and spec == plain


def test_a_sequence_whose_drafts_fail_joins_the_batch_exactly(model, monkeypatch):
    monkeypatch.setattr(Drafting, "WINDOW", 3)
    monkeypatch.setattr(Drafting, "MIN_SAVED", 100)  # no window pays: drafting stops
    joined = []
    real_join = RaggedRunner._join

    def spy(self, seqs):
        joined.extend(s.uid for s in seqs if s.drafting is not None)
        real_join(self, seqs)

    monkeypatch.setattr(RaggedRunner, "_join", spy)
    spec = generate(model, PROMPTS, N, speculative=True)[0]
    assert len(joined) == len(PROMPTS)  # each left speculation for the batch
    assert spec == [reference_tokens(model, p, N) for p in PROMPTS]


# ---- priced by this machine's step costs (issue 33) ------------------------------------

def test_the_step_cost_fit_recovers_fixed_token_and_span_costs():
    rng = np.random.default_rng(0)
    cost = runner.StepCost()
    assert not cost.ready
    for _ in range(200):
        tokens, spans = int(rng.integers(1, 64)), int(rng.integers(1, 16))
        cost.add(tokens, spans, tokens, 0.002 + 1e-4 * tokens + 5e-4 * spans)
    assert cost.ready
    assert cost.fixed == pytest.approx(0.002, rel=0.05)
    assert cost.per_token == pytest.approx(1e-4, rel=0.05)
    assert cost.per_span == pytest.approx(5e-4, rel=0.05)


def _priced(per_token: float, per_span: float, per_emitted: float) -> type:
    class Fixed(runner.StepCost):
        ready = True

        def __init__(self):
            super().__init__()
            self.per_token, self.per_span, self.fixed = per_token, per_span, 0.0
            self.seconds, self.emitted = per_emitted, 1.0

        def add(self, *args) -> None:  # keeps its prices
            pass

    return Fixed


def test_a_span_that_costs_more_than_its_drafts_earn_joins_the_batch(model, monkeypatch):
    """A near-free model on a GPU: a verify's own span costs far more than an accepted
    token saves, so every sequence soon decodes in the shared batch, exactly."""
    monkeypatch.setattr(Drafting, "MIN_SAVED", 0)  # the text alone would keep drafting
    monkeypatch.setattr(runner, "StepCost", _priced(1e-6, 1.0, 1e-3))
    monkeypatch.setattr(runner, "SPAN_CREDIT", 2)  # leaves before its reply is done
    joined = []
    real_join = RaggedRunner._join

    def spy(self, seqs):
        joined.extend(s.uid for s in seqs if s.drafting is not None)
        real_join(self, seqs)

    monkeypatch.setattr(RaggedRunner, "_join", spy)
    spec, _, _, stats = generate(model, PROMPTS, N, speculative=True)
    assert sorted(joined) == [0, 1, 2]
    assert stats.steps <= len(PROMPTS) * (runner.SPAN_CREDIT + 1)  # its credit, then out
    assert spec == [reference_tokens(model, p, N) for p in PROMPTS]


def test_free_spans_and_dear_steps_keep_sequences_drafting(model, monkeypatch):
    """This CPU with SmolLM2: a span costs nothing next to a step, so drafts that come
    true keep a sequence speculating; the output is still exact."""
    monkeypatch.setattr(Drafting, "MIN_SAVED", 0)
    monkeypatch.setattr(runner, "StepCost", _priced(1e-3, 0.0, 1.0))
    spec, _, _, stats = generate(model, PROMPTS, N, speculative=True)
    assert stats.accepted > 0 and stats.steps > len(PROMPTS)
    assert spec == [reference_tokens(model, p, N) for p in PROMPTS]


# ---- through the engine thread and the scheduler --------------------------------------

async def test_stop_strings_cut_a_speculating_stream_as_a_plain_one(keep_drafting):
    """Several tokens a step reach the worker's stop strings, text and finish: every
    stop string cuts the speculating stream where it cuts the plain one, and blocks
    are published and freed as usual."""
    from blockserve.engine.runtime.worker import EngineWorker
    from blockserve.scheduler import Request
    from tests.engine_harness import assert_idle, make_scheduler

    async def text_of(sched, params):
        outs = [o async for o in sched.submit(Request(list(PROMPTS[2]), params))]
        return "".join(o.text for o in outs), outs[-1]

    workers = [EngineWorker("demo:tiny", block_size=16, max_running=4, speculative=s)
               for s in (False, True)]
    try:
        scheds = [make_scheduler(w) for w in workers]
        params = SamplingParams(max_tokens=32, ignore_eos=True)
        full = [(await text_of(s, params))[0] for s in scheds]
        assert full[0] == full[1]
        text = full[0]
        for start in range(4, len(text) - 3, max(len(text) // 12, 1)):
            stop = text[start: start + 3]
            params = SamplingParams(max_tokens=32, ignore_eos=True, stop=(stop,))
            cuts = [await text_of(s, params) for s in scheds]
            assert cuts[1][0] == cuts[0][0] == text[: text.index(stop)]
            assert cuts[1][1].finish_reason == cuts[0][1].finish_reason == "stop"
            assert cuts[1][1].usage.completion_tokens == cuts[0][1].usage.completion_tokens
        assert workers[1].draft_stats.accepted > 0
        for s, w in zip(scheds, workers):
            assert_idle(s, w)
    finally:
        for w in workers:
            w.close()


def test_the_replay_bench_counts_steps_exactly():
    """bench.lookup_replay: a reply that copies its prompt takes fewer steps, one that
    never repeats takes one step a token and drafts nothing."""
    from blockserve.bench.lookup_replay import replay

    prompt = [(i * 37) % 500 for i in range(300)]
    copy = prompt[:120]
    steps, cost, plain = replay(prompt, copy, streams=1, step_cost=5.0)
    assert steps < len(copy) // 3 and plain / cost > 2
    fresh = list(range(1000, 1100))
    steps, cost, plain = replay(prompt, fresh, streams=1, step_cost=5.0)
    assert steps == len(fresh) - 1 and cost == plain
