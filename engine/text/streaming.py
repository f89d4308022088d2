"""Streaming text: incremental detokenization and stop strings that span tokens."""

from __future__ import annotations

from typing import Any, Sequence


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas, correct for multi-byte UTF-8.

    Decodes a short window (a few tokens of context plus the new ones) rather than the
    whole sequence, and holds text back while it ends in an incomplete character
    (U+FFFD), as vLLM and TGI do.
    """

    def __init__(self, tokenizer: Any, context: int = 4, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens whose text has been emitted
        self._context = context

    def add(self, token: int) -> str:
        self._ids.append(token)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""  # an incomplete character: wait for more bytes
        delta = full_text[len(prefix_text) :]
        self._read = len(self._ids)
        self._prefix = max(0, self._read - self._context)
        return delta

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._read = len(self._ids)
        return full_text[len(prefix_text) :]

    def _decode(self, ids: Sequence[int]) -> str:
        return (self._tok.decode(list(ids), skip_special_tokens=self._skip_special)
                if ids else "")


class StopStringFilter:
    """Finds stop strings in streamed text, even when they span several deltas.

    ``push`` returns the text that is safe to emit: anything that could still be the
    start of a stop string is held back. Once a stop string is seen, ``stopped`` is
    set and the text from the stop string on is dropped.
    """

    def __init__(self, stops: Sequence[str]):
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._buf = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._buf += text
        found = [(i, s) for s in self._stops if (i := self._buf.find(s)) >= 0]
        if found:
            cut, self.matched = min(found)
            self.stopped = True
            out, self._buf = self._buf[:cut], ""
            return out
        # Hold back the longest tail that is a proper prefix of some stop string.
        keep = 0
        for n in range(min(self._hold, len(self._buf)), 0, -1):
            tail = self._buf[-n:]
            if any(s.startswith(tail) for s in self._stops):
                keep = n
                break
        out = self._buf[: len(self._buf) - keep]
        self._buf = self._buf[len(self._buf) - keep :]
        return out

    def flush(self) -> str:
        out, self._buf = ("" if self.stopped else self._buf), ""
        return out
