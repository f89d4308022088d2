"""Prompt-lookup drafts for speculative decoding: no draft model, the sequence's own text.

A coding agent's reply mostly copies text it was given (a file rewritten with one change,
the lines around an edit, the error being fixed). So the tokens that followed the last
few generated tokens the last time they occurred in the context are a good guess for
what comes next. ``PromptLookup`` finds that occurrence (the longest match of the last
``MAX_NGRAM`` .. ``MIN_NGRAM`` tokens, the most recent one) with one vectorised comparison over the
context, and proposes up to k of the tokens after it; ``Drafting`` sizes k from the
sequence's recent acceptance and turns drafting off for text that doesn't repeat.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

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

    k grows to ``MAX_DRAFT`` while whole drafts are accepted and shrinks to one past
    the accepted length when a draft fails part way, so a verify rarely computes many
    tokens that are thrown away. Every ``WINDOW`` drafting steps the drafts must have
    saved ``MIN_SAVED`` steps. A sequence that never managed it stops drafting at once:
    text that doesn't repeat then decodes in the shared batch, as it would without
    speculation. One that did (it copies, then writes something new) pauses instead, for
    ``WINDOW`` steps doubling with each window in a row that fails, and stops after
    ``MAX_STRIKES`` of them.
    """

    WINDOW = 8
    MIN_SAVED = 2
    MAX_STRIKES = 3

    def __init__(self, tokens: list[int]):
        self.lookup = PromptLookup(tokens)
        self.k = FIRST_DRAFT
        self.on = True
        self._window: list[int] = []  # tokens accepted at each drafting step
        self._paid = False  # some window saved enough
        self._strikes = 0  # windows in a row that didn't
        self._pause = 0  # steps left without drafting

    def draft(self, limit: int) -> list[int]:
        """The next draft, at most ``limit`` tokens (what the sequence may still emit)."""
        if not self.on or self._pause:
            return []
        return self.lookup.propose(min(self.k, limit))

    def update(self, drafted: list[int], accepted: int, emitted: list[int]) -> None:
        """After a step: its draft, how many of the draft's tokens were accepted, and
        the tokens the step emitted (the lookup holds every token of the sequence, the
        sampled one not yet fed included)."""
        self.lookup.extend(emitted)
        if self._pause:
            self._pause -= 1
            return
        if drafted:
            if accepted == len(drafted):
                self.k = min(2 * self.k, MAX_DRAFT)
            else:
                self.k = max(accepted + 1, 1)
        self._window.append(accepted)
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
