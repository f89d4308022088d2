"""The output parser: a model's raw text split into reasoning, content and tool calls.

One parser per request, fed the streamed text deltas. Three states (content, reasoning,
tool call), switched by the markers mlx-lm's ``TokenizerWrapper`` knows for the model
family (``think_start``/``think_end``, ``tool_call_start``/``tool_call_end``); the text of
a call goes to the family's parser from ``mlx_lm.tool_parsers``. A marker split across
deltas is held back until it is whole, so the result does not depend on where the
tokens fall. A call cut off by the end of generation, or that fails to parse, comes back
as the text it was.

Newlines at the edges of a segment are the template's, not the reply's: a Qwen3-style
template writes ``<think>\n{reasoning}\n</think>\n\n{content}\n<tool_call>``. They are
trimmed, so the reply re-rendered in the next turn's history gives the tokens the model
produced, and the next turn's prompt hits the cache through them.

This module imports no MLX: the server uses its parsers through the frontend.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

CONTENT, REASONING, TOOL = "content", "reasoning", "tool_call"


@dataclass
class Delta:
    """A piece of output: ``kind`` is content or reasoning (with ``text``), or
    tool_call (with ``name`` and ``arguments``, a JSON object string)."""

    kind: str
    text: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class ReplySpec:
    """How one reply's text is parsed: tool calls (``tools``, and whether to parse them),
    whether it starts inside a think block, whether it is split at all (chat) or raw text
    (completions), and whether it is one bare JSON call (forced by a grammar on a model
    without a JSON call format of its own). ``include_reasoning``: False drops the
    reasoning from what the client gets."""

    tools: list[dict] | None = None
    parse_tools: bool = False
    reasoning_open: bool = False
    structured: bool = True
    bare_tool_call: bool = False
    include_reasoning: bool = True


@dataclass(frozen=True)
class Markers:
    """The model family's output markers (None where it has none)."""

    think_start: str | None = None
    think_end: str | None = None
    tool_start: str | None = None
    tool_end: str | None = None  # "" or None: a call runs to the end of the reply
    tool_parser: Callable[[str, Any], Any] | None = None

    @classmethod
    def of(cls, tokenizer: Any) -> Markers:
        """The markers of an mlx-lm ``TokenizerWrapper``."""
        return cls(getattr(tokenizer, "think_start", None),
                   getattr(tokenizer, "think_end", None),
                   getattr(tokenizer, "tool_call_start", None),
                   getattr(tokenizer, "tool_call_end", None),
                   getattr(tokenizer, "tool_parser", None))


def json_call(text: str, tools: Any = None) -> dict:
    """A bare call, ``{"name": ..., "arguments": {...}}``: what a grammar forces on a
    model that has no JSON call format of its own."""
    return json.loads(text)


def _held(buf: str, markers: list[str]) -> int:
    """Length of the longest tail of ``buf`` that could start one of ``markers``."""
    for n in range(min(len(buf), max((len(m) for m in markers), default=1) - 1), 0, -1):
        tail = buf[-n:]
        if any(m.startswith(tail) for m in markers):
            return n
    return 0


@dataclass
class OutputParser:
    markers: Markers
    tools: list[dict] | None = None  # the request's tools, for parsers that use schemas
    parse_tools: bool = True  # False: tool_choice "none", or no tools given
    state: str = CONTENT
    after_reasoning: str = CONTENT  # TOOL: the reply is a bare call (a forced choice)
    calls: int = 0  # tool calls emitted
    _buf: str = ""
    _tool_text: list[str] = field(default_factory=list)
    _lstrip: bool = False  # a marker was just crossed: drop the next segment's newlines
    _before_call: str = ""  # newlines trimmed before a call, put back if it stays text

    def __post_init__(self):
        self._lstrip = self.state != CONTENT  # a reply that opens inside a block
        m = self.markers
        self._think = bool(m.think_start and m.think_end)
        self._tools_on = bool(self.parse_tools and m.tool_start and m.tool_parser)

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        out: list[Delta] = []
        while self._step(out):
            pass
        return out

    def finish(self, truncated: bool = False) -> list[Delta]:
        """The rest, at the end of generation; ``truncated``: it hit max_tokens."""
        out: list[Delta] = []
        rest, self._buf = self._buf, ""
        if self.state == TOOL:
            text = "".join(self._tool_text) + rest
            self._tool_text = []
            if not self.markers.tool_end and not truncated:
                self._emit_call(text, out)  # the family ends a call with the reply
            else:
                self._emit_raw_call(text, out)
        else:
            self._emit(self.state, rest if self.state == CONTENT else rest.rstrip("\n"), out)
        self.state = CONTENT
        return out

    # ---- the state machine ----------------------------------------------------

    def _step(self, out: list[Delta]) -> bool:
        """Consume what can be decided in the buffer; True if a marker was crossed."""
        m, buf = self.markers, self._buf
        if self.state == CONTENT:
            starts = []
            if self._think:
                starts.append((m.think_start, REASONING))
            if self._tools_on:
                starts.append((m.tool_start, TOOL))
            found = [(buf.find(s), s, st) for s, st in starts if buf.find(s) >= 0]
            if found:
                i, marker, new_state = min(found)
                text = buf[:i].rstrip("\n")
                self._emit(CONTENT, text, out)
                self._before_call = buf[len(text):i]
                self._buf = buf[i + len(marker):]
                self.state, self._lstrip = new_state, True
                return True
            keep = _held(buf, [s for s, _ in starts])
        elif self.state == REASONING:
            i = buf.find(m.think_end)
            if i >= 0:
                self._emit(REASONING, buf[:i].rstrip("\n"), out)
                self._buf = buf[i + len(m.think_end):]
                self.state, self._lstrip = self.after_reasoning, True
                return True
            keep = _held(buf, [m.think_end])
        else:  # TOOL
            i = buf.find(m.tool_end) if m.tool_end else -1
            if i >= 0:
                text = "".join(self._tool_text) + buf[:i]
                self._tool_text = []
                self._buf = buf[i + len(m.tool_end):]
                self.state, self._lstrip = CONTENT, True
                self._emit_call(text, out)
                return True
            keep = _held(buf, [m.tool_end]) if m.tool_end else 0
            self._tool_text.append(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False
        end = len(buf) - keep
        while end and buf[end - 1] == "\n":  # trailing newlines wait for what follows
            end -= 1
        self._emit(self.state, buf[:end], out)
        self._buf = buf[end:]
        return False

    def _emit(self, kind: str, text: str, out: list[Delta]) -> None:
        if self._lstrip:
            text = text.lstrip("\n")
            self._lstrip = not text
        if not text:
            return
        if out and out[-1].kind == kind and kind != TOOL:
            out[-1].text += text
        else:
            out.append(Delta(kind, text))

    def _emit_call(self, text: str, out: list[Delta]) -> None:
        m = self.markers
        try:
            parsed = m.tool_parser(text, self.tools)
            calls = parsed if isinstance(parsed, list) else [parsed]
            deltas = []
            for c in calls:
                args = c.get("arguments", {})
                if isinstance(args, str):
                    args = json.loads(args) if args.strip() else {}
                if not isinstance(c.get("name"), str) or not isinstance(args, dict):
                    raise ValueError("a tool call needs a name and an object of arguments")
                deltas.append(Delta(TOOL, name=c["name"],
                                    arguments=json.dumps(args, ensure_ascii=False)))
        except Exception as e:  # any parser failure: the call stays text
            log.warning("a tool call did not parse (%s: %s); returning it as text",
                        type(e).__name__, e)
            self._emit_raw_call(text + (m.tool_end or ""), out)
            return
        out.extend(deltas)
        self.calls += len(deltas)

    def _emit_raw_call(self, text: str, out: list[Delta]) -> None:
        """A call that stays text: as the model wrote it, trimmed newlines included."""
        self._lstrip = False
        self._emit(CONTENT, self._before_call + self.markers.tool_start + text, out)
