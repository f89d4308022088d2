"""Per-request samplers for ``BatchGenerator``: each sequence in a batch has its own."""

from __future__ import annotations

import logging
from typing import Callable

import llguidance as llg
import llguidance.numpy as llg_np
import mlx.core as mx
import numpy as np
import xxhash
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from blockserve.engine.text.structured import Constraint, JsonCloser
from blockserve.scheduler.protocol import SamplingParams

log = logging.getLogger(__name__)


def greedy(logprobs: mx.array, rewind: int = 0) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def _position_key(seed: int, position: int) -> mx.array:
    """The PRNG key of a seeded request's ``position``-th generated token."""
    return mx.random.key(xxhash.xxh3_64_intdigest(
        seed.to_bytes(8, "little") + position.to_bytes(8, "little")))


def make_sampler(params: SamplingParams) -> Callable[..., mx.array]:
    """Greedy when temperature is 0 (one shared function, so mlx-lm batches the call).

    Called with ``[rows, vocab]`` log probabilities, one row per generated position
    from where the last call ended, less ``rewind`` positions that call drew and the
    caller threw away (a speculative verify's rejected tail). A ``seed`` draws each
    position's token with a key of its own (the seed and the position), so a seeded
    reply depends on nothing else in the batch, and not on speculation either: a
    verify step that samples positions and then throws some away draws the same token
    at each position as plain decoding does.
    """
    if params.temperature <= 0:
        return greedy
    inv_temp = 1.0 / params.temperature
    drawn = [0]  # positions sampled so far

    def sample(logprobs: mx.array, rewind: int = 0) -> mx.array:
        if 0 < params.top_k < logprobs.shape[-1]:  # top_k >= the vocabulary: all tokens
            logprobs = apply_top_k(logprobs, params.top_k)
        if 0.0 < params.top_p < 1.0:
            logprobs = apply_top_p(logprobs, params.top_p)
        if params.min_p > 0.0:
            logprobs = apply_min_p(logprobs, params.min_p)
        scaled = logprobs * inv_temp
        if params.seed is None:
            return mx.random.categorical(scaled)
        rows = scaled.reshape(-1, scaled.shape[-1])
        first = drawn[0] - rewind
        drawn[0] = first + rows.shape[0]
        return mx.concatenate([
            mx.random.categorical(rows[i: i + 1], key=_position_key(params.seed, first + i))
            for i in range(rows.shape[0])]).reshape(scaled.shape[:-1])

    # The next position to draw: a sequence that restarts (a rebuilt batch, a resumed
    # preemption) sets it to the tokens it has, since a runner may have drawn ahead
    # (mlx-lm's BatchGenerator samples a step early) or thrown draws away.
    sample.position = drawn
    return sample


def logits_processors(params: SamplingParams) -> list[Callable]:
    """mlx-lm's processors for the request's penalties and logit bias (none if off)."""
    return make_logits_processors(
        logit_bias=dict(params.logit_bias) or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0
        else None,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )


# The log probability reported for a token that can't be sampled (masked by a grammar or
# a bias): finite, as vLLM writes it, since strict JSON has no -Infinity.
MIN_LOGPROB = -9999.0


def _finite(lp: float) -> float:
    return lp if lp > MIN_LOGPROB else MIN_LOGPROB  # NaN compares false: the floor too


def token_logprobs(logprobs: mx.array, token: int, top: int
                   ) -> tuple[float, list[tuple[int, float]] | None]:
    """The sampled token's log probability, and the ``top`` most likely tokens."""
    chosen = _finite(logprobs[token].item())
    if top <= 0:
        return chosen, None
    top = min(top, logprobs.shape[-1])
    ids = mx.argpartition(-logprobs, top - 1)[:top]
    values = logprobs[ids]
    order = mx.argsort(-values)
    return chosen, [(i, _finite(v)) for i, v in zip(ids[order].tolist(),
                                                   values[order].tolist())]


class Guard:
    """Charges an exception in a sequence's sampler or logits processors to that
    sequence: the call falls back to a harmless result for this step, and the engine
    fails the sequence after it, so its batch neighbours never see its error."""

    def __init__(self) -> None:
        self.error: str | None = None

    def sampler(self, fn: Callable[..., mx.array]) -> Callable[..., mx.array]:
        def guarded(logprobs: mx.array, rewind: int = 0) -> mx.array:
            if self.error is None:
                try:
                    return fn(logprobs, rewind) if rewind else fn(logprobs)
                except Exception as e:
                    self.error = str(e) or type(e).__name__
            return greedy(logprobs)

        return guarded

    def processor(self, fn: Callable) -> Callable:
        def guarded(tokens: mx.array, logits: mx.array) -> mx.array:
            if self.error is None:
                try:
                    return fn(tokens, logits)
                except Exception as e:
                    self.error = str(e) or type(e).__name__
            return logits

        return guarded


class GrammarProcessor:
    """A logits processor that masks a sequence's logits to the tokens its grammar
    allows next (one per sequence; constrained and free sequences share a batch).

    mlx-lm calls it once per generated token, before sampling; from the second call on,
    the context's last token is the one sampled after the previous call, so the matcher
    consumes it first. A reply in reasoning is free until its end-of-thinking tokens
    (``Constraint.reasoning``); the grammar applies to the answer after them. In JSON
    mode, when the budget nears its end, the document's shortest completion is forced
    (``closed``), so the reply still parses.
    """

    CLOSE_SLACK = 8  # tokens a single step may add to the closing text

    def __init__(self, vocab: llg.LLTokenizer, constraint: Constraint, max_tokens: int):
        self._vocab = vocab
        self._matcher = llg.LLMatcher(vocab, constraint.grammar)
        self._bits = llg_np.allocate_token_bitmask(1, vocab.vocab_size)
        self._think_end = list(constraint.think_end)
        self._thinking = constraint.reasoning == "open"  # free until ``think_end``
        # "optional": the first token may open a think block instead of the answer
        self._think_start = constraint.think_start if constraint.reasoning == "optional" \
            else None
        self._recent: list[int] = []
        self._closer = JsonCloser() if constraint.json_mode else None
        self._max_tokens = max_tokens
        self._forced: list[int] = []
        self._calls = 0
        self.closed = False  # the reply was completed early, at the end of its budget

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._calls:
            self._advance(tokens[-1].item())
        self._calls += 1
        if self._thinking:
            return logits
        allowed = self._allowed()
        if self._think_start is not None:  # the first token: the answer, or thinking
            allowed = allowed.copy()
            allowed[self._think_start] = True
        n = logits.shape[-1]
        allowed = allowed[:n]
        if len(allowed) < n:  # the model's vocabulary is padded past the tokenizer's
            allowed = np.concatenate([allowed, np.zeros(n - len(allowed), np.bool_)])
        return mx.where(mx.array(allowed), logits, -mx.inf)

    def _allowed(self) -> np.ndarray:
        if self._matcher.is_error():  # nothing valid can follow: end the reply
            return self._only(self._vocab.eos_token)
        llg_np.fill_next_token_bitmask(self._matcher, self._bits)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little").astype(np.bool_)
        if self._closer is not None and not self._matcher.is_stopped():
            remaining = self._max_tokens - (self._calls - 1)
            text = None if self.closed else self._closer.closing()
            # Tokenize the closing only near the end: it is never more tokens than bytes.
            if text is not None and remaining <= len(text.encode()) + self.CLOSE_SLACK:
                plan = self._vocab.tokenize_str(text)
                if remaining <= len(plan) + self.CLOSE_SLACK:
                    self._forced, self.closed = plan, True
            if self._forced:
                token = self._forced.pop(0)
                if allowed[token]:
                    return self._only(token)
                # The text's tokens don't fit what came before: try again next step.
                self._forced, self.closed = [], False
        return allowed

    def _only(self, token: int) -> np.ndarray:
        allowed = np.zeros(self._vocab.vocab_size, dtype=np.bool_)
        allowed[token] = True
        return allowed

    def _advance(self, token: int) -> None:
        if self._think_start is not None:
            opened, self._think_start = token == self._think_start, None
            if opened:
                self._thinking = True
                return
        if self._thinking:
            self._recent = (self._recent + [token])[-len(self._think_end):]
            self._thinking = self._recent != self._think_end
        elif not self._matcher.consume_token(token):
            log.warning("grammar: token %d was rejected (%s); ending the reply", token,
                        self._matcher.get_error())
        elif self._closer is not None:
            self._closer.feed(self._vocab.decode_bytes([token]))
