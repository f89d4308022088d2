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
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import mlx.core as mx
from mlx_lm.generate import StopSequences
from mlx_lm.models.cache import BatchKVCache, KVCache, TokenBuffer, make_prompt_cache

from blockserve.engine.runtime import ragged
from blockserve.engine.runtime.sampling import greedy

log = logging.getLogger(__name__)

DEFAULT_TOKEN_BUDGET = 64  # per step while streams decode; BENCHMARKS.md, the step grid
DEFAULT_PREFILL_STEP = 256  # per step while none does: nobody waits on a longer step
MIN_CHUNK = 16  # prefill tokens a step always takes, so decodes never starve a prompt


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
    logprobs: mx.array
    finish_reason: str | None
    prompt_cache: list[Any] | None = None  # on a finish: the caches...
    all_tokens: list[int] | None = None  # ...and the tokens they hold


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


class RaggedRunner:
    """``BatchGenerator``'s role for the families ``engine.ragged`` covers."""

    def __init__(self, model: Any, *, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 prefill_step_size: int = DEFAULT_PREFILL_STEP, max_running: int = 16,
                 fallback_sampler: Callable | None = None):
        self.model = model
        self.token_budget = token_budget
        self.prefill_step_size = prefill_step_size
        self.max_running = max_running
        self._fallback = fallback_sampler or greedy
        self._uid = 0
        self._prompting: deque[_Seq] = deque()  # arrival order
        self._decoding: list[_Seq] = []  # the rows of the decode batch, in order
        self._batch: list[BatchKVCache] | None = None  # their caches, one per layer
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

    # ---- one step -------------------------------------------------------------------

    def plan(self) -> tuple[list[_Seq], list[tuple[_Seq, int]]]:
        """This step's decodes (all running sequences), then prefill chunks, within
        the token budget; a chunk never crosses a segment (checkpoint) boundary. With
        no stream decoding, a step takes ``prefill_step_size`` prompt tokens instead:
        on a compute-bound CPU a step's length is what its streams wait between two
        tokens, and with none waiting a longer step only saves per-step overhead."""
        decodes = list(self._decoding)
        room = self.max_running - len(decodes)  # prompts that may start decoding
        if not decodes:
            budget = self.prefill_step_size
        else:
            budget = max(self.token_budget - len(decodes), MIN_CHUNK)
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
        return decodes, chunks

    def next(self) -> tuple[list[PromptResponse], list[GenerationResponse]]:
        """One forward pass: a token for each decoding sequence and each prompt that
        completes, and a prefill chunk for the prompts that don't yet."""
        decodes, chunks = self.plan()
        if not decodes and not chunks:
            return [], []
        tokens = [seq.next_token for seq in decodes]
        batch = ragged.Decodes(len(decodes), self._batch) if decodes else None
        spans: list[ragged.Span] = []
        rows = list(range(len(decodes)))
        sampled = list(decodes)
        fed: list[tuple[_Seq, list[int]]] = [(seq, [seq.next_token]) for seq in decodes]
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
                sampled.append(seq)
            prompt_responses.append(PromptResponse(seq.uid, (seq.done, seq.total),
                                                   end_of_segment, end_of_prompt))
        logits = ragged.forward(self.model, tokens, batch, spans, rows)
        for seq, chunk in fed:
            seq.tokens.extend(chunk)
        states = [c.state for s in spans for c in s.caches]  # chunks not sampled too
        if batch is not None:
            states += [c.state for c in batch.caches]
        if not sampled:
            mx.eval(states)
            return prompt_responses, []
        new_tokens, logprobs = self._sample(sampled, logits)
        mx.eval(new_tokens, logprobs, states)
        started = [seq for seq, _ in chunks if not seq.segments]
        for seq in started:
            self._prompting.remove(seq)
        responses = self._responses(sampled, new_tokens.tolist(), logprobs)
        self._join([seq for seq in started if seq.uid in self._seqs])
        return prompt_responses, responses

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
            self._decoding.append(s)
        mx.eval([c.state for c in self._batch])

    def _sample(self, seqs: list[_Seq], logits: mx.array) -> tuple[mx.array, mx.array]:
        """As ``GenerationBatch._step``: processors per row, normalise, one batched
        sampler call when the rows share one."""
        if any(s.processors for s in seqs):
            rows = []
            for e, seq in enumerate(seqs):
                row = logits[e: e + 1]
                if seq.processors:
                    context = self._context(seq)
                    for processor in seq.processors:
                        row = processor(context, row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        samplers = [s.sampler for s in seqs]
        if all(f is samplers[0] for f in samplers):
            return samplers[0](logprobs), logprobs
        return mx.concatenate([f(logprobs[e: e + 1]) for e, f in enumerate(samplers)],
                              axis=0), logprobs

    @staticmethod
    def _context(seq: _Seq) -> mx.array:
        """The tokens the processors see: all the sequence's tokens, fed ones included."""
        if seq.context is None:
            seq.context = TokenBuffer(seq.tokens[:-1])
        return seq.context.update_and_fetch(mx.array(seq.tokens[-1:], dtype=mx.int32))

    def _responses(self, seqs: list[_Seq], tokens: list[int], logprobs: mx.array
                   ) -> list[GenerationResponse]:
        out = []
        finished = {}
        for e, (seq, token) in enumerate(zip(seqs, tokens)):
            seq.generated += 1
            reason = "length" if seq.generated >= seq.max_tokens else None
            if seq.matcher.advance(token):
                reason = "stop"
            r = GenerationResponse(seq.uid, token, logprobs[e], reason)
            seq.next_token = token
            if reason is not None:
                finished[seq.uid] = r
            out.append(r)
        if finished:  # one filter of the decode batch for all of them
            for uid, (cache, tokens_) in self.remove(list(finished), True).items():
                finished[uid].prompt_cache, finished[uid].all_tokens = cache, tokens_
        return out
