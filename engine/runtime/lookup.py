"""Prompt-lookup drafts for speculative decoding: no draft model, the sequence's own text.

A coding agent's reply mostly copies text it was given (a file rewritten with one change,
the lines around an edit, the error being fixed). So the tokens that followed the last
few generated tokens the last time they occurred in the context are a good guess for
what comes next. ``PromptLookup`` finds that occurrence (the longest match of the last
``MAX_NGRAM`` .. ``MIN_NGRAM`` tokens, the most recent one) with one vectorised
comparison over the context, and proposes up to k of the tokens after it; ``Drafting`` sizes k from the
sequence's recent acceptance and turns drafting off for text that doesn't repeat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blockserve.engine.text.chat import common_prefix

# The suffix matched: the longest from 8 tokens down to 2. Measured on recorded edit
# replies (BENCHMARKS.md): a longer match picks the right one of a file's repeated
# lines, and a one-token match proposes a wrong continuation more often than not.
MAX_NGRAM = 8
MIN_NGRAM = 2
MAX_DRAFT = 8  # tokens proposed at most: a verify of 9 tokens still costs about a step
FIRST_DRAFT = 4  # k before the sequence has shown how well its drafts fare


class PromptLookup:
    """The tokens of one sequence (prompt and output) and the draft they suggest."""

    def __init__(self, tokens: list[int] | np.ndarray):
        self._buf = np.zeros(max(64, 2 * len(tokens)), dtype=np.int64)
        self._n = 0
        self.extend(tokens)

    def __len__(self) -> int:
        return self._n

    def extend(self, tokens: list[int] | np.ndarray) -> None:
        """Append tokens the sequence now holds (amortised: the buffer doubles)."""
        n = len(tokens)
        if self._n + n > len(self._buf):
            grown = np.zeros(max(2 * len(self._buf), self._n + n), dtype=np.int64)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n: self._n + n] = tokens
        self._n += n

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the most recent earlier occurrence of the
        longest suffix (``MAX_NGRAM`` tokens down to ``MIN_NGRAM``); [] if none."""
        n, buf = self._n, self._buf
        if k <= 0 or n <= MIN_NGRAM:
            return []
        # Candidate ends: positions p < n-1 holding the last token, so a continuation
        # buf[p+1] exists and the match is not the suffix itself.
        ends = np.flatnonzero(buf[: n - 1] == buf[n - 1])
        if len(ends) == 0:
            return []
        best, best_len = ends, 1
        for length in range(2, min(MAX_NGRAM, n - 1) + 1):
            ends = ends[ends >= length - 1]
            ends = ends[buf[ends - (length - 1)] == buf[n - length]]
            if len(ends) == 0:
                break
            best, best_len = ends, length
        if best_len < MIN_NGRAM:
            return []
        start = int(best[-1]) + 1  # the most recent occurrence
        return buf[start: min(start + k, n)].tolist()


@dataclass
class DraftStats:
    """Counts for the metrics: verify steps, tokens proposed, drafts accepted."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    def add(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted


class Drafting:
    """One sequence's speculation policy.

    Each step the lookup proposes up to k tokens, and the draft keeps those worth
    verifying: the j-th draft token is accepted with probability ``rate ** j`` (the
    lookup's hit rate on this sequence, counted on every step for free, drafts or not,
    by comparing its proposal with the tokens the model emitted), and an accepted token
    saves ``share`` tokens' worth of compute (a step's own cost shared by the sequences
    running, plus its own token; ``runner``), while verifying it costs one. So a lone
    stream drafts freely, and a full batch only drafts text it copies reliably.

    k grows to ``MAX_DRAFT`` while whole drafts are accepted and shrinks to one past
    the accepted length when a draft fails part way. Every ``WINDOW`` steps that had a
    proposal, the proposals must have come true for ``MIN_SAVED`` tokens. A sequence
    that never managed it stops drafting at once, as does one with nothing proposed for
    ``MAX_IDLE`` steps in a row: it then decodes in the shared batch, as without
    speculation. One that did (it copies, then writes something new) pauses instead,
    for ``WINDOW`` steps doubling with each window in a row that fails, and stops after
    ``MAX_STRIKES`` of them.
    """

    WINDOW = 8
    MIN_SAVED = 2
    MAX_STRIKES = 3
    MAX_IDLE = 32  # steps in a row with nothing proposed, before drafting stops
    DECAY = 0.8  # weight of the hit rate's past observations, per step

    def __init__(self, tokens: list[int]):
        self.lookup = PromptLookup(tokens)
        self.k = FIRST_DRAFT
        self.on = True
        self.proposal: list[int] = []  # this step's, to score against what is emitted
        self._hits, self._tries = 1.0, 2.0  # proposed tokens that came true: a 1/2 prior
        self._window: list[int] = []  # proposed tokens that came true, each step
        self._paid = False  # some window saved enough
        self._strikes = 0  # windows in a row that didn't
        self._pause = 0  # steps left without drafting
        self._idle = 0  # steps in a row with nothing proposed

    @property
    def rate(self) -> float:
        """How often a proposed token comes true (recent steps weigh more)."""
        return self._hits / self._tries

    def worth(self, share: float) -> int:
        """Draft tokens worth verifying when an accepted token saves ``share``."""
        j, p = 0, self.rate
        while j < MAX_DRAFT and p * share > 1.0:
            j, p = j + 1, p * self.rate
        return j

    def draft(self, limit: int, share: float) -> list[int]:
        """This step's draft: the lookup's proposal of at most ``limit`` tokens (what
        the sequence may still emit), cut to the tokens worth verifying."""
        self.proposal = [] if not self.on or self._pause else \
            self.lookup.propose(min(self.k, limit))
        return self.proposal[: self.worth(share)]

    def update(self, drafted: int, emitted: list[int]) -> None:
        """After a step: how many tokens it verified, and the tokens it emitted (the
        lookup holds every token of the sequence, the sampled one not yet fed too)."""
        self.lookup.extend(emitted)
        proposal, self.proposal = self.proposal, []
        seen = min(len(proposal), len(emitted))
        hits = common_prefix(proposal, emitted)
        if seen:
            self._hits = self.DECAY * self._hits + hits
            self._tries = self.DECAY * self._tries + hits + (hits < seen)
        if self._pause:
            self._pause -= 1
            return
        accepted = min(hits, drafted)
        if drafted:
            self.k = min(2 * self.k, MAX_DRAFT) if accepted == drafted else accepted + 1
        if not proposal:  # nothing to judge: a reply's preamble, or text with no match
            self._idle += 1
            if self._idle >= self.MAX_IDLE:
                self.on = False
            return
        self._idle = 0
        # The window judges the text, not the pricing: tokens the proposal got right,
        # drafted or not (a busy batch may verify none of them yet).
        self._window.append(hits)
        if len(self._window) < self.WINDOW:
            return
        if sum(self._window) >= self.MIN_SAVED:
            self._paid, self._strikes = True, 0
        else:
            self._strikes += 1
            if not self._paid or self._strikes > self.MAX_STRIKES:
                self.on = False
            else:
                self._pause = self.WINDOW << (self._strikes - 1)
        self._window = []
