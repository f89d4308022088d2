"""A continuous-batching runner with a token budget per step (stall-free batching).

Each ``next()`` is ONE forward pass over a ragged batch (``engine.ragged``): first the
decode token of every running sequence, then prefill chunks of waiting prompts, in
arrival order, until the step's token budget is spent. So no stream waits a whole
prompt between two tokens, and a step's length is bounded by the budget. A prompt's
K/V lives in its own mlx-lm ``KVCache`` while it prefills (so checkpoints read it
directly); when it starts decoding it is copied once into the decode batch, mlx-lm's
left-padded ``BatchKVCache``, so all decodes share one attention call per layer.

It speaks ``BatchGenerator``'s interface as the worker uses it (``insert_segments``,
``next``, ``extract_cache``, ``remove``, ``prompt_cache_nbytes``, ``close``) and its
response fields, so the worker's checkpoints, finishes, guards and recovery work
unchanged. Two differences, both harmless there: a prompt's first token is sampled in
the step that computes its last chunk (one step sooner), and the last sampled token is
never fed, so a finished sequence's cache ends one token before ``BatchGenerator``'s.

Speculation (prompt lookup, ``engine.lookup``): a sequence with no logits processors
decodes outside the batch, in its own ``KVCache``, for as long as drafting pays. Each
step it feeds its last token plus a draft of up to k tokens found in its own context
(one span: a verify of k+1 tokens), samples every position with its own sampler,
keeps the drafts up to the first that differs from the sample there, plus that sample,
and trims its cache to what it kept. A deterministic draft is accepted with the
probability the model gives it, and a rejection's sample is the model's distribution
without the draft, so greedy replies are unchanged and sampled ones keep their
distribution (and, seeded, their tokens: ``sampling.make_sampler``). When its drafts
stop paying, the sequence joins the batch.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import StopSequences
from mlx_lm.models.cache import BatchKVCache, KVCache, TokenBuffer, make_prompt_cache

from blockserve.engine.runtime import ragged
from blockserve.engine.runtime.lookup import Drafting, DraftStats
from blockserve.engine.runtime.sampling import greedy
from blockserve.engine.text.chat import common_prefix

log = logging.getLogger(__name__)

# A forward's cost besides its tokens', in tokens' cost: ~110 ms against ~22 ms a token
# for SmolLM2 at 1.6K tokens of context on this CPU (BENCHMARKS.md, the verify grid).
# It prices speculation: the larger it is, the more a draft token may cost to verify.
STEP_COST_TOKENS = 5.0
# Price speculation from this machine's measured step costs (``StepCost``) once enough
# steps are seen; STEP_COST_TOKENS until then, or always when False (tests).
MEASURED_COSTS = True
SPAN_CREDIT = 16  # spans' cost a speculating sequence may spend before its drafts pay
DEFAULT_TOKEN_BUDGET = 64  # per step while streams decode; BENCHMARKS.md, the step grid
DEFAULT_PREFILL_STEP = 256  # per step while none does: nobody waits on a longer step
MIN_CHUNK = 16  # prefill tokens a step always takes, so decodes never starve a prompt


@dataclass
class StepTimes:
    """Where an engine step's time goes, summed over steps (seconds, by phase), read by
    ``/metrics`` (``blockserve_engine_step_seconds``) and the overhead bench.

    The runner's phases: ``draft`` (planning, the lookup's drafts), ``build`` (the
    forward's and the samplers' graphs, on the host), ``eval`` (waiting for the device:
    the forward and the sampling ops), ``emit`` (the sampled tokens as responses, trims,
    joins). The worker's: ``engine`` (its bookkeeping per token: detokenizer, stop
    strings, finishes, blocks) and ``events`` (handing events to the scheduler's loop)."""

    steps: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class StepCost:
    """What a step costs on this machine, fitted online: seconds ~ fixed + per token x
    tokens fed + per span x attention groups (the decode batch, each verify, each
    prefill chunk: one attention call per layer each, graphs built on the host).

    Speculation outside the batch is priced from it: a verify's sequence is a span of
    its own (its attention per layer, its rope, its cache update), which on a GPU or
    with a small model costs more than the tokens themselves, and on this CPU with
    SmolLM2 next to nothing. Least squares over recent steps (each weighs ``DECAY`` of
    the next), with a light ridge so that a design without variety (every step the same
    shape) still solves; ``ready`` once ``MIN_STEPS`` were seen."""

    DECAY = 0.98
    MIN_STEPS = 8
    RIDGE = 1e-3

    def __init__(self) -> None:
        self._a = np.zeros((3, 3))
        self._b = np.zeros(3)
        self.n = 0
        self.fixed = self.per_token = self.per_span = 0.0
        self.seconds = 0.0  # a step's seconds, and tokens it emitted (decayed means)
        self.emitted = 0.0

    @property
    def ready(self) -> bool:
        return self.n >= self.MIN_STEPS

    def add(self, tokens: int, spans: int, emitted: int, seconds: float) -> None:
        x = np.array([1.0, tokens, spans])
        self._a = self.DECAY * self._a + np.outer(x, x)
        self._b = self.DECAY * self._b + x * seconds
        self.n += 1
        w = 1 - self.DECAY if self.n > 1 else 1.0
        self.seconds += w * (seconds - self.seconds)
        self.emitted += w * (emitted - self.emitted)
        if not self.ready:
            return
        ridge = self.RIDGE * np.diag(np.diag(self._a) * [0.0, 1.0, 1.0])
        try:
            fixed, tok, span = np.linalg.solve(self._a + ridge, self._b)
        except np.linalg.LinAlgError:
            return
        self.fixed, self.per_token, self.per_span = max(fixed, 0.0), max(tok, 0.0), \
            max(span, 0.0)

    @property
    def per_emitted(self) -> float:
        """Seconds of step per token emitted: what an accepted draft token saves."""
        return self.seconds / max(self.emitted, 1e-9)


@dataclass
class PromptResponse:
    """As ``PromptProcessingBatch.Response``: a prefill chunk was computed."""

    uid: int
    progress: tuple[int, int]  # (prompt tokens computed since insert, of how many)
    end_of_segment: bool
    end_of_prompt: bool


@dataclass
class GenerationResponse:
    """As ``GenerationBatch.Response``: one sampled token."""

    uid: int
    token: int
    rows: mx.array = field(repr=False)  # the step's log probabilities, a row per position
    row: int
    finish_reason: str | None
    prompt_cache: list[Any] | None = None  # on a finish: the caches...
    all_tokens: list[int] | None = None  # ...and the tokens they hold

    @property
    def logprobs(self) -> mx.array:
        """This token's row: sliced when asked (few requests want logprobs), not one
        array op per token per step."""
        return self.rows[self.row]


@dataclass(eq=False)
class _Seq:
    uid: int
    segments: deque[list[int]]  # prompt tokens still to compute, cut at checkpoints
    total: int  # prompt tokens to compute at insert
    caches: list[KVCache] | None  # None while its K/V is in the decode batch
    tokens: list[int]  # the tokens the caches hold
    max_tokens: int
    sampler: Callable[[mx.array], mx.array]
    processors: list[Callable]
    matcher: Any  # StopSequences.Matcher
    done: int = 0  # prompt tokens computed
    next_token: int | None = None  # sampled, fed by the next step
    generated: int = 0
    context: TokenBuffer | None = field(default=None, repr=False)  # processors' tokens
    drafting: Drafting | None = None  # while it speculates (outside the decode batch)
    balance: float | None = None  # speculation's earnings less its span's cost (seconds)
    rewind: int = 0  # positions its sampler drew last step that were thrown away


def accepted(draft: list[int], samples: list[int]) -> list[int]:
    """The tokens a verify emits: the drafts up to the first that differs from the
    sample at its position, then the sample there (``samples``: one per position)."""
    return samples[: common_prefix(draft, samples) + 1]


@dataclass
class StepPlan:
    """One step: the batch's decodes, the speculating sequences' verifies (their
    drafts), and prefill chunks (a sequence and its token count)."""

    decodes: list[_Seq]
    verifies: list[tuple[_Seq, list[int]]]
    chunks: list[tuple[_Seq, int]]


class RaggedRunner:
    """``BatchGenerator``'s role for the families ``engine.ragged`` covers."""

    def __init__(self, model: Any, *, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 prefill_step_size: int = DEFAULT_PREFILL_STEP, max_running: int = 16,
                 fallback_sampler: Callable | None = None, speculative: bool = False,
                 draft_stats: DraftStats | None = None,
                 step_cost_tokens: float | None = None,
                 step_times: StepTimes | None = None):
        self.model = model
        self.times = step_times if step_times is not None else StepTimes()
        self.speculative = speculative
        self.step_cost_tokens = STEP_COST_TOKENS if step_cost_tokens is None \
            else step_cost_tokens
        self.draft_stats = draft_stats if draft_stats is not None else DraftStats()
        self.cost = StepCost()
        self.token_budget = token_budget
        self.prefill_step_size = prefill_step_size
        self.max_running = max_running
        self._fallback = fallback_sampler or greedy
        self._uid = 0
        self._prompting: deque[_Seq] = deque()  # arrival order
        self._decoding: list[_Seq] = []  # the rows of the decode batch, in order
        self._batch: list[BatchKVCache] | None = None  # their caches, one per layer
        self._speculating: list[_Seq] = []  # decoding in their own caches
        self._seqs: dict[int, _Seq] = {}

    # ---- BatchGenerator's interface ---------------------------------------------

    def insert_segments(
        self, segments: Sequence[Sequence[Sequence[int]]], max_tokens: Sequence[int],
        caches: Sequence[list[Any]] | None = None,
        all_tokens: Sequence[Sequence[int]] | None = None,
        samplers: Sequence[Callable] | None = None,
        logits_processors: Sequence[list[Callable]] | None = None,
        stop_sequences: Sequence[StopSequences] | None = None,
    ) -> list[int]:
        """Queue sequences; each prompt is its segments, computed in order."""
        uids = []
        for i, segs in enumerate(segments):
            segs = deque(list(s) for s in segs if s)
            if not segs:
                raise ValueError("a sequence needs at least one prompt token")
            if max_tokens[i] <= 0:
                raise ValueError("max_tokens must be > 0")
            cache = caches[i] if caches else make_prompt_cache(self.model)
            stops = stop_sequences[i] if stop_sequences else StopSequences()
            seq = _Seq(
                uid=self._uid, segments=segs, total=sum(len(s) for s in segs), caches=cache,
                tokens=list(all_tokens[i]) if all_tokens else [],
                max_tokens=max_tokens[i],
                sampler=(samplers[i] if samplers else None) or self._fallback,
                processors=list(logits_processors[i]) if logits_processors else [],
                matcher=stops.matcher(),
            )
            self._uid += 1
            self._seqs[seq.uid] = seq
            self._prompting.append(seq)
            uids.append(seq.uid)
        return uids

    def extract_cache(self, uids: Sequence[int]) -> dict[int, tuple[list[Any], list[int]]]:
        """(caches, tokens they hold) per sequence: a prefilling sequence's live caches,
        a decoding one's copied out of the batch."""
        out = {}
        for u in uids:
            seq = self._seqs.get(u)
            if seq is None:
                continue
            if seq.caches is not None:
                out[u] = (seq.caches, seq.tokens)
            else:
                row = self._decoding.index(seq)
                out[u] = ([c.extract(row) for c in self._batch], seq.tokens)
        return out

    def remove(self, uids: Sequence[int], return_prompt_caches: bool = False
               ) -> dict[int, tuple[list[Any], list[int]]]:
        out = self.extract_cache(uids) if return_prompt_caches else {}
        gone = set(uids)
        for u in gone:
            self._seqs.pop(u, None)
        self._prompting = deque(s for s in self._prompting if s.uid not in gone)
        self._speculating = [s for s in self._speculating if s.uid not in gone]
        keep = [i for i, s in enumerate(self._decoding) if s.uid not in gone]
        if len(keep) < len(self._decoding):
            self._decoding = [self._decoding[i] for i in keep]
            if not keep:
                self._batch = None
            else:
                for c in self._batch:
                    c.filter(keep)
        return out

    @property
    def prompt_cache_nbytes(self) -> int:
        own = sum(c.nbytes for s in self._seqs.values() if s.caches for c in s.caches)
        return own + sum(c.nbytes for c in self._batch or [])

    def close(self) -> None:
        self._seqs.clear()
        self._decoding.clear()
        self._batch = None
        self._prompting.clear()
        self._speculating.clear()

    # ---- one step -------------------------------------------------------------------

    def plan(self) -> StepPlan:
        """This step's decodes (all running sequences, a speculating one with its
        draft), then prefill chunks, within the token budget; a chunk never crosses a
        segment (checkpoint) boundary. With no stream decoding, a step takes
        ``prefill_step_size`` prompt tokens instead: on a compute-bound CPU a step's
        length is what its streams wait between two tokens, and with none waiting a
        longer step only saves per-step overhead."""
        decodes = list(self._decoding)
        running = len(decodes) + len(self._speculating)
        # What an accepted draft token saves, in tokens' cost: its share of the step's
        # own cost, and its own token. A verify emits at most len(draft) + 1 tokens.
        share = 1.0 + self.step_cost_tokens / max(running, 1)
        if self._measured():  # this machine's: a step's seconds per token emitted
            share = min(self.cost.per_emitted / max(self.cost.per_token, 1e-9), 1e3)
        verifies = [(s, s.drafting.draft(s.max_tokens - s.generated - 1, share))
                    for s in self._speculating]
        room = self.max_running - running  # prompts that may start decoding
        if not running:
            budget = self.prefill_step_size
        else:
            used = len(decodes) + sum(1 + len(d) for _, d in verifies)
            budget = max(self.token_budget - used, MIN_CHUNK)
        chunks = []
        for seq in self._prompting:
            if budget <= 0:
                break
            finishing = len(seq.segments) == 1 and len(seq.segments[0]) <= budget
            if finishing and room <= 0:
                break  # it could not decode; keep the batch within max_running
            n = min(budget, len(seq.segments[0]))
            chunks.append((seq, n))
            budget -= n
            room -= finishing
        return StepPlan(decodes, verifies, chunks)

    def next(self) -> tuple[list[PromptResponse], list[GenerationResponse]]:
        """One forward pass: a token for each decoding sequence (several for a
        speculating one whose draft is accepted) and each prompt that completes, and a
        prefill chunk for the prompts that don't yet."""
        t0 = time.perf_counter()
        plan = self.plan()
        decodes, verifies, chunks = plan.decodes, plan.verifies, plan.chunks
        if not decodes and not verifies and not chunks:
            return [], []
        times = self.times
        times.steps += 1
        t1 = time.perf_counter()
        times.seconds["draft"] += t1 - t0
        tokens = [seq.next_token for seq in decodes]
        batch = ragged.Decodes(len(decodes), self._batch) if decodes else None
        spans: list[ragged.Span] = []
        rows = list(range(len(decodes)))
        groups = [(seq, 1) for seq in decodes]  # the sampled rows, per sequence
        fed: list[tuple[_Seq, list[int]]] = [(seq, [seq.next_token]) for seq in decodes]
        for seq, draft in verifies:
            span = [seq.next_token, *draft]
            spans.append(ragged.Span(len(tokens), len(span), seq.caches))
            rows.extend(range(len(tokens), len(tokens) + len(span)))
            groups.append((seq, len(span)))
            fed.append((seq, span))
            tokens.extend(span)
        prompt_responses = []
        for seq, n in chunks:
            chunk = seq.segments[0][:n]
            spans.append(ragged.Span(len(tokens), n, seq.caches))
            fed.append((seq, chunk))
            tokens.extend(chunk)
            seq.segments[0] = seq.segments[0][n:]
            end_of_segment = not seq.segments[0]
            if end_of_segment:
                seq.segments.popleft()
            seq.done += n
            end_of_prompt = not seq.segments
            if end_of_prompt:
                rows.append(len(tokens) - 1)
                groups.append((seq, 1))
            prompt_responses.append(PromptResponse(seq.uid, (seq.done, seq.total),
                                                   end_of_segment, end_of_prompt))
        logits = ragged.forward(self.model, tokens, batch, spans, rows)
        for seq, chunk in fed:
            seq.tokens.extend(chunk)
        states = [c.state for s in spans for c in s.caches]  # chunks not sampled too
        if batch is not None:
            states += [c.state for c in batch.caches]
        if not groups:
            t2 = time.perf_counter()
            mx.eval(states)
            times.seconds["build"] += t2 - t1
            times.seconds["eval"] += time.perf_counter() - t2
            return prompt_responses, []
        new_tokens, logprobs = self._sample(groups, logits)
        t2 = time.perf_counter()
        mx.eval(new_tokens, logprobs, states)
        t3 = time.perf_counter()
        times.seconds["build"] += t2 - t1
        times.seconds["eval"] += t3 - t2
        sampled = new_tokens.tolist()
        started = [seq for seq, _ in chunks if not seq.segments]
        for seq in started:
            self._prompting.remove(seq)
        responses = self._emit_step(groups, {s.uid: d for s, d in verifies}, sampled,
                                    logprobs)
        self._start_decoding([seq for seq in started if seq.uid in self._seqs])
        self._join([seq for seq in self._speculating if not seq.drafting.on])
        t4 = time.perf_counter()
        times.seconds["emit"] += t4 - t3
        self.cost.add(len(tokens), len(spans) + (batch is not None), len(responses),
                      t4 - t0)
        self._judge_spans(verifies, responses)
        return prompt_responses, responses

    def _measured(self) -> bool:
        return MEASURED_COSTS and self.cost.ready

    def _judge_spans(self, verifies: list[tuple[_Seq, list[int]]],
                     responses: list[GenerationResponse]) -> None:
        """Speculation outside the batch must pay for its span: each verify's accepted
        tokens earn a step's seconds per emitted token, its span (a token's worth at
        least) and drafts cost what the fit says. A sequence starts with a credit of ``SPAN_CREDIT`` spans and
        joins the batch when its balance runs out (alone, it costs no span: the batch
        would be one too)."""
        if not self._measured() or not verifies:
            return
        cost = self.cost
        alone = len(self._decoding) + len(self._speculating) <= 1
        # A span costs at least a token's worth: the fit can't always tell the two
        # apart (every sequence speculating: as many spans as decode tokens).
        unit = max(cost.per_span, cost.per_token)
        per_span = 0.0 if alone else unit
        counts: dict[int, int] = {}
        for r in responses:
            counts[r.uid] = counts.get(r.uid, 0) + 1
        leave = []
        for seq, draft in verifies:
            if seq.uid not in self._seqs or seq.drafting is None:
                continue
            earned = (counts.get(seq.uid, 1) - 1) * cost.per_emitted
            spent = per_span + len(draft) * cost.per_token
            cap = SPAN_CREDIT * 4 * unit
            if seq.balance is None:
                seq.balance = SPAN_CREDIT * unit
            seq.balance = min(seq.balance + earned - spent, cap)
            if seq.balance < 0:
                leave.append(seq)
        self._join(leave)

    def _emit_step(self, groups: list[tuple[_Seq, int]], drafts: dict[int, list[int]],
                   sampled: list[int], logprobs: mx.array) -> list[GenerationResponse]:
        """The step's tokens, in row order: one per sequence, or a verify's accepted
        drafts and its sample, cut at a finish; finished sequences leave the runner."""
        responses, finished, row = [], {}, 0
        for seq, n in groups:
            draft = drafts.get(seq.uid)
            emitted = sampled[row: row + 1] if draft is None else \
                accepted(draft, sampled[row: row + n])
            for i, token in enumerate(emitted):
                r = self._emit(seq, token, logprobs, row + i)
                responses.append(r)
                if r.finish_reason is not None:
                    finished[seq.uid] = r
                    emitted = emitted[: i + 1]
                    break
            if draft is not None:
                self._trim(seq, draft, emitted)
            row += n
        if finished:  # one filter of the decode batch for all of them
            for uid, (cache, tokens) in self.remove(list(finished), True).items():
                finished[uid].prompt_cache, finished[uid].all_tokens = cache, tokens
        return responses

    def _trim(self, seq: _Seq, draft: list[int], emitted: list[int]) -> None:
        """After a verify: the cache keeps the fed token and the drafts that were
        emitted, not the last emitted token (it is fed next step) nor the rest."""
        kept = len(emitted) - 1  # drafts kept (each equals the emitted token there)
        thrown = len(draft) - kept
        if thrown:
            for c in seq.caches:
                c.trim(thrown)
            del seq.tokens[len(seq.tokens) - thrown:]
        seq.rewind = thrown  # the sampler drew len(draft)+1 positions, kept kept+1
        if draft:
            self.draft_stats.add(len(draft), kept)
        seq.drafting.update(len(draft), emitted)

    def _emit(self, seq: _Seq, token: int, logprobs: mx.array, row: int
              ) -> GenerationResponse:
        """One sampled token of ``seq``: its finish, and the token fed next step."""
        seq.generated += 1
        reason = "length" if seq.generated >= seq.max_tokens else None
        if seq.matcher.advance(token):
            reason = "stop"
        seq.next_token = token
        return GenerationResponse(seq.uid, token, logprobs, row, reason)

    def _start_decoding(self, seqs: list[_Seq]) -> None:
        """Prompts that finished prefilling: speculating ones keep their own caches,
        the others join the decode batch."""
        if not seqs:
            return
        rest = []
        for seq in seqs:
            if self.speculative and not seq.processors:
                seq.drafting = Drafting(seq.tokens + [seq.next_token])
                self._speculating.append(seq)
            else:
                rest.append(seq)
        self._join(rest)

    def _join(self, seqs: list[_Seq]) -> None:
        """Move prompts that finished prefilling into the decode batch (their K/V is
        copied once into the batch's left-padded caches, as mlx-lm's batches do)."""
        if not seqs:
            return
        merged = [BatchKVCache.merge([s.caches[i] for s in seqs])
                  for i in range(len(seqs[0].caches))]
        if self._batch is None:
            self._batch = merged
        else:
            for mine, new in zip(self._batch, merged):
                mine.extend(new)
        for s in seqs:
            s.caches = None
            s.drafting = None
            self._decoding.append(s)
        gone = {s.uid for s in seqs}
        self._speculating = [s for s in self._speculating if s.uid not in gone]
        mx.eval([c.state for c in self._batch])

    def _sample(self, groups: list[tuple[_Seq, int]], logits: mx.array
                ) -> tuple[mx.array, mx.array]:
        """As ``GenerationBatch._step``: processors per row, normalise, one batched
        sampler call when the rows share one (a sequence's verify rows go to its own
        sampler in one call, as positions ``[0, n)`` after its last kept one)."""
        if any(seq.processors for seq, _ in groups):  # one row each: never speculating
            rows = []
            for e, (seq, _) in enumerate(groups):
                row = logits[e: e + 1]
                if seq.processors:
                    context = self._context(seq)
                    for processor in seq.processors:
                        row = processor(context, row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        samplers = [seq.sampler for seq, _ in groups]
        if len(groups) > 1 and all(f is samplers[0] for f in samplers):
            return samplers[0](logprobs), logprobs  # greedy: one call for the batch
        out, row = [], 0
        for seq, n in groups:
            rows = logprobs[row: row + n]
            # ``rewind``: our samplers' second argument (sampling.make_sampler)
            out.append(seq.sampler(rows, seq.rewind) if seq.rewind else seq.sampler(rows))
            seq.rewind = 0
            row += n
        return mx.concatenate(out, axis=0), logprobs

    @staticmethod
    def _context(seq: _Seq) -> mx.array:
        """The tokens the processors see: all the sequence's tokens, fed ones included."""
        if seq.context is None:
            seq.context = TokenBuffer(seq.tokens[:-1])
        return seq.context.update_and_fetch(mx.array(seq.tokens[-1:], dtype=mx.int32))
