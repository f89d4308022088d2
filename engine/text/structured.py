"""Structured output: a request's format (a JSON schema, JSON mode, a regex, a choice, a
forced tool call) compiled into an llguidance grammar, checked against the model's
vocabulary, so that a grammar the engine can't enforce is refused before it runs.

llguidance was chosen by measuring (``bench/grammar_bench.py``, BENCHMARKS.md): on a 49K
vocabulary in a batch of 16 its masks cost about a fifth of xgrammar's or
outlines-core's per step (and a twentieth of xgrammar's at p99), it compiles a schema in
about 10 ms against their 270 and 660, and it needs no torch.

JSON is compact (``", "`` and ``": "`` separators, no free whitespace): a model that
may write whitespace forever can't be made to finish, and the separators are the ones
chat templates' ``tojson`` writes, so a tool call sent back re-renders to the tokens the
model produced. The masks themselves are applied by ``engine.sampling`` (MLX).

This module imports no MLX: the server reaches it through the frontend.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Union

import llguidance as llg

from blockserve.engine.text import regex

log = logging.getLogger(__name__)

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_PARALLEL_CALLS = 8  # a forced choice with parallel calls allows 1 to this many


class GrammarError(ValueError):
    """A format the grammar engine can't compile or enforce; the message says why."""


@dataclass(frozen=True)
class JsonFormat:
    """A JSON document of ``schema``, or any JSON object (JSON mode) when it is None."""

    schema: dict | None = None
    kind: ClassVar[str] = "json"

    @property
    def source(self) -> Any:
        return self.schema


@dataclass(frozen=True)
class RegexFormat:
    """Text that matches ``pattern`` whole."""

    pattern: str
    kind: ClassVar[str] = "regex"

    @property
    def source(self) -> Any:
        return self.pattern


@dataclass(frozen=True)
class ChoiceFormat:
    """Exactly one of ``options``."""

    options: tuple[str, ...]
    kind: ClassVar[str] = "choice"

    @property
    def source(self) -> Any:
        return list(self.options)


@dataclass(frozen=True)
class ToolCallFormat:
    """A call of the tool named ``name``, or of any of ``tools`` (several if
    ``parallel``), in the model's own call format where it has a JSON one."""

    tools: tuple[dict, ...]
    name: str | None = None
    parallel: bool = False
    kind: ClassVar[str] = "tools"

    @property
    def source(self) -> Any:
        return list(self.tools)


Format = Union[JsonFormat, RegexFormat, ChoiceFormat, ToolCallFormat]


@dataclass(frozen=True)
class Constraint:
    """A compiled format: the grammar, how it meets the model's reasoning, and whether
    the reply is a bare JSON tool call (models without a JSON call format of their own).

    ``reasoning``: "none", the grammar applies from the first token; "open", the reply
    starts inside a think block (the template opened it) and is free until
    ``think_end``; "optional", thinking was asked for, so the reply may open with
    ``think_start`` and is then free until ``think_end`` (vLLM's rule: the grammar
    applies to the answer, after the reasoning)."""

    grammar: str
    bare_tool_call: bool = False
    json_mode: bool = False  # any JSON object: closed near max_tokens (``JsonCloser``)
    reasoning: str = "none"
    think_start: int | None = None
    think_end: tuple[int, ...] = ()


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid lark string literal


class Grammars:
    """Compiles formats for one tokenizer (an mlx-lm ``TokenizerWrapper``). The engine's
    vocabulary (about 0.4 s to build for 49K tokens) is shared by the frontend, which
    checks grammars, and the engine thread, which runs them."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self._vocab: llg.LLTokenizer | None = None
        self._lock = threading.Lock()
        parser = getattr(tokenizer, "tool_parser", None)
        # Only families whose calls are {"name", "arguments"} JSON between two markers
        # can be forced in their own format; the others get a bare JSON call.
        self._native_calls = bool(
            parser is not None and parser.__module__.endswith(".json_tools")
            and tokenizer.tool_call_start and tokenizer.tool_call_end)

    def warm(self) -> None:
        """Build the vocabulary in the background, so the first constrained request
        doesn't wait for it (and the server's loop doesn't either)."""
        threading.Thread(target=lambda: self.vocab, name="blockserve-grammar-vocab",
                         daemon=True).start()

    @property
    def vocab(self) -> llg.LLTokenizer:
        with self._lock:
            if self._vocab is None:
                backend = self._tok._tokenizer.backend_tokenizer
                self._vocab = llg.LLTokenizer(backend.to_str(),
                                              eos_token=self._tok.eos_token_id)
            return self._vocab

    # ---- formats -------------------------------------------------------------

    def compile(self, fmt: Format) -> Constraint:
        """The grammar of a format; ``GrammarError`` says why one can't be enforced."""
        if isinstance(fmt, JsonFormat):
            return self.json_schema(fmt.schema)
        if isinstance(fmt, RegexFormat):
            return self.regex(fmt.pattern)
        if isinstance(fmt, ChoiceFormat):
            return self.choice(list(fmt.options))
        if isinstance(fmt, ToolCallFormat):
            return self.tool_calls(list(fmt.tools), fmt.name, fmt.parallel)
        raise GrammarError(f"unknown format {fmt!r}")

    def json_schema(self, schema: dict | None) -> Constraint:
        """Any JSON object (JSON mode) when ``schema`` is None."""
        c = self._constraint(self._json_rule(schema))
        return replace(c, json_mode=True) if schema is None else c

    def regex(self, pattern: str) -> Constraint:
        return self._constraint(f"start: /{_lark_regex(pattern)}/")

    def choice(self, options: list[str]) -> Constraint:
        return self._constraint("start: " + " | ".join(_lark_string(o) for o in options))

    def tool_calls(self, tools: list[dict], name: str | None, parallel: bool) -> Constraint:
        """A call of the named tool, or of any of ``tools`` (several if ``parallel``),
        in the model's own format where it has a JSON one."""
        schemas = []
        for t in tools:
            fn = t["function"] if isinstance(t.get("function"), dict) else t
            if name is None or fn.get("name") == name:
                params = fn.get("parameters") or {"type": "object"}
                schemas.append({"type": "object",
                                "properties": {"name": {"const": fn.get("name")},
                                               "arguments": params},
                                "required": ["name", "arguments"],
                                "additionalProperties": False})
        if not schemas:
            raise GrammarError(f"no tool named {name!r} in 'tools'")
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        if not self._native_calls:
            return replace(self._constraint(self._json_rule(schema)), bare_tool_call=True)
        start = self._marker(self._tok.tool_call_start)
        end = self._marker(self._tok.tool_call_end)
        repeat = f'("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
        lark = (f"start: call {repeat}\n"
                f'call: {start} "\\n" body "\\n" {end}\n'
                f"{self._json_rule(schema, 'body')}")
        return self._constraint(lark)

    def with_reasoning(self, c: Constraint, reasoning_open: bool, thinking: bool
                       ) -> Constraint:
        """``c`` meeting the reply's reasoning: ``reasoning_open``, the prompt ends inside
        a think block; ``thinking``, the request asked the model to think (a bare call
        can't follow a think block: its parser reads the whole reply as the call)."""
        start = getattr(self._tok, "think_start", None)
        end = getattr(self._tok, "think_end", None)
        if not (start and end):
            return c
        end_ids = tuple(self._tok.encode(end, add_special_tokens=False))
        if reasoning_open:
            return replace(c, reasoning="open", think_end=end_ids)
        start_ids = self._tok.encode(start, add_special_tokens=False)
        if thinking and not c.bare_tool_call and len(start_ids) == 1:
            return replace(c, reasoning="optional", think_start=start_ids[0],
                           think_end=end_ids)
        return c

    # ---- helpers ---------------------------------------------------------------

    @staticmethod
    def _json_rule(schema: dict | None, rule: str = "start") -> str:
        """A lark rule for JSON matching ``schema`` (None: any object)."""
        schema = {"type": "object"} if schema is None else schema
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema must be an object")
        schema = _schema_patterns(schema)
        # llguidance reads its JSON options from the schema's "x-guidance".
        extra = schema.get("x-guidance")
        schema = {**schema, "x-guidance": {**JSON_OPTIONS,
                                           **(extra if isinstance(extra, dict) else {})}}
        try:
            return f"{rule}: %json {json.dumps(schema)}"
        except (TypeError, ValueError) as e:
            raise GrammarError(f"the schema is not JSON: {e}")

    def _marker(self, text: str) -> str:
        """A lark terminal for a marker: its token where it is one special token (text
        can't spell those), else the literal text."""
        ids = self._tok.encode(text, add_special_tokens=False)
        if len(ids) == 1 and self.vocab.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return _lark_string(text)

    def _constraint(self, lark: str) -> Constraint:
        grammar = llg.LLMatcher.grammar_from_lark(lark)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.vocab)
        if is_error:
            raise GrammarError(_reason(messages[0]) if messages else "invalid grammar")
        for m in messages:
            log.warning("grammar: %s", m)
        return Constraint(grammar)


class JsonCloser:
    """Tracks a compact JSON document as it is generated, and says the shortest text
    that completes it (``closing``). JSON mode can't bound a reply (a model may write a
    string forever), so near the end of ``max_tokens`` the engine writes this text
    instead of cutting the reply off: it always parses, and still finishes as
    ``length``. The separators are ``JSON_OPTIONS``'s."""

    _LITERALS = (b"true", b"false", b"null")

    def __init__(self):
        self._stack: list[int] = []  # open containers: ord("{") or ord("[")
        self._state = "value"  # what the next byte may be
        self._is_key = False  # the open string is an object's key
        self._partial = b""  # a number or literal so far, or a \u escape's digits
        self._utf8_left = 0  # continuation bytes the open string's last character needs

    def feed(self, data: bytes) -> None:
        for b in data:
            self._byte(b)

    def closing(self) -> str | None:
        """None in the middle of a multi-byte character, which no text can complete."""
        if self._utf8_left:
            return None
        st, close = self._state, "".join("}" if c == 123 else "]"
                                         for c in reversed(self._stack))
        if st == "value":
            head = "null" if self._stack else "{}"
        elif st in ("string", "escape", "unicode"):
            head = {"string": "", "escape": "n",
                    "unicode": "0" * (4 - len(self._partial))}[st] + '"'
            head += ": null" if self._is_key else ""
        elif st == "number":
            head = "0" if self._partial[-1:] in (b"-", b"+", b".", b"e", b"E") else ""
        elif st == "literal":
            word = next(w for w in self._LITERALS if w.startswith(self._partial))
            head = word[len(self._partial):].decode()
        else:
            head = {"key_or_end": "", "value_or_end": "", "after_value": "",
                    "colon": ": null", "colon_space": " null", "key": '"": null',
                    "comma_space": ' "": null' if self._stack[-1:] == [123] else " null",
                    "done": ""}[st]
        return head + close

    def _byte(self, b: int) -> None:
        st = self._state
        if st in ("string", "escape", "unicode"):
            self._string_byte(b)
        elif st == "number" and b in b"0123456789+-.eE":
            self._partial += bytes([b])
        elif st == "literal":
            self._partial += bytes([b])
            if self._partial in self._LITERALS:
                self._value_done()
        elif st == "number":
            self._value_done()
            self._byte(b)
        elif st == "colon":
            self._state = "colon_space"
        elif st == "colon_space":
            self._state = "value"
        elif st == "comma_space":
            self._state = "key" if self._stack[-1] == 123 else "value"
        elif st == "after_value" and b in b"}]":
            self._stack.pop()
            self._value_done()
        elif st == "after_value":  # the ","
            self._state = "comma_space"
        elif b in b"}]":  # key_or_end, value_or_end: an empty container
            self._stack.pop()
            self._value_done()
        elif b == ord('"'):  # a key, or a string value
            self._is_key = st in ("key", "key_or_end")
            self._state = "string"
        elif b in b"{[":
            self._stack.append(b)
            self._state = "key_or_end" if b == 123 else "value_or_end"
        elif b in b"tfn":
            self._state, self._partial = "literal", bytes([b])
        else:  # a number's first byte
            self._state, self._partial = "number", bytes([b])

    def _string_byte(self, b: int) -> None:
        st = self._state
        if st == "escape":
            self._state = "unicode" if b == ord("u") else "string"
            self._partial = b""
        elif st == "unicode":
            self._partial += bytes([b])
            if len(self._partial) == 4:
                self._state = "string"
        elif self._utf8_left:
            self._utf8_left -= 1
        elif b >= 0xC0:  # a multi-byte character starts
            self._utf8_left = 1 if b < 0xE0 else 2 if b < 0xF0 else 3
        elif b == ord("\\"):
            self._state = "escape"
        elif b == ord('"'):
            if self._is_key:
                self._state = "colon"
            else:
                self._value_done()

    def _value_done(self) -> None:
        self._partial = b""
        self._state = "after_value" if self._stack else "done"


def _reason(message: str) -> str:
    """llguidance's error without its position and grammar excerpt: the first line and
    the lines that say ``error:``."""
    lines = [ln.strip() for ln in message.strip().splitlines()]
    kept = [lines[0]] + [ln for ln in lines[1:] if ln.startswith("error:")]
    return re.sub(r"^at \d+\(\d+\): ", "", " ".join(kept))


def _lark_regex(pattern: str) -> str:
    """A regex (Python's syntax) as a lark regex literal: translated (``regex``: no
    bare slash is left), anchors dropped (the grammar spans the whole reply)."""
    pattern = _translate(pattern)
    if pattern.startswith("^"):
        pattern = pattern[1:]
    if pattern.endswith("$"):  # an escaped $ is \x{24} by now
        pattern = pattern[:-1]
    return pattern


def _translate(pattern: str) -> str:
    try:
        return regex.translate(pattern)
    except regex.RegexError as e:
        raise GrammarError(str(e))


_SCHEMA_DATA = {"const", "default", "examples", "enum"}  # values, not schemas
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions",
                "dependentSchemas"}


def _schema_patterns(schema: Any) -> Any:
    """``schema`` with every ``pattern`` translated as a regex is (``_lark_regex``)."""
    if isinstance(schema, list):
        return [_schema_patterns(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "pattern" and isinstance(v, str):
            out[k] = _translate(v)
        elif k in _SCHEMA_MAPS and isinstance(v, dict):  # name -> schema
            out[k] = {name: _schema_patterns(s) for name, s in v.items()}
        else:
            out[k] = v if k in _SCHEMA_DATA else _schema_patterns(v)
    return out
