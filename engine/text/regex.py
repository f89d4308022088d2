"""Python's regex syntax (what clients write: ``re``, JavaScript and JSON Schema agree on
the common part) in llguidance's (Rust's ``regex-syntax``).

The pattern is first checked by Python's ``re``: what it refuses is refused. Then every
escape ``re`` accepts is written in a form the two read alike: an escaped punctuation
character (``\\/``, ``\\<``, ``\\-``) or a literal slash becomes ``\\x{..}`` (Rust reads
``\\<`` as a word start, and lark ends a regex at a bare slash), octal and ``\\N{name}``
escapes become ``\\x{..}``, ``\\Z`` becomes ``\\z``, ``{,n}`` becomes ``{0,n}``, a literal
``{`` is escaped, a ``[``, ``&`` or ``~`` inside a class is escaped (Rust reads nested
classes and set operations there), and comments ``(?#...)`` are dropped. What
llguidance can't express (lookarounds, backreferences, word boundaries, atomic groups,
possessive quantifiers, conditionals, the ASCII and locale flags) is refused with a
message naming the construct.
"""

from __future__ import annotations

import re
import unicodedata
import warnings

_OCTAL = "01234567"
_HEX = "0123456789abcdefABCDEF"
_CLASS_ESCAPES = "dDsSwW"
_CONTROL_ESCAPES = "afnrtv"
_QUANTIFIER = re.compile(r"\{(\d*)(,?)(\d*)\}")


class RegexError(ValueError):
    """A pattern Python's ``re`` refuses, or a construct the grammar engine can't
    enforce; the message names it."""


def _hex(code: int) -> str:
    return "\\x{%X}" % code


def _unsupported(what: str, text: str) -> RegexError:
    return RegexError(f"{what} ({text!r}) can't be enforced by the grammar engine")


def translate(pattern: str) -> str:
    """``pattern`` (Python's syntax) in llguidance's; ``RegexError`` names what can't be."""
    try:
        with warnings.catch_warnings():  # "possible nested set": a literal [, translated
            warnings.simplefilter("ignore", FutureWarning)
            re.compile(pattern)
    except re.error as e:
        raise RegexError(f"not a valid regular expression: {e}") from None
    except (OverflowError, RecursionError, ValueError) as e:
        raise RegexError(f"not a valid regular expression: {e}") from None
    return _Translator(pattern).run()


class _Translator:
    def __init__(self, pattern: str):
        self.p = pattern
        self.i = 0
        self.out: list[str] = []
        self.after_quantifier = False  # a possessive '+' would come next

    def run(self) -> str:
        p = self.p
        while self.i < len(p):
            c = p[self.i]
            quantified = False
            if c == "\\":
                self.out.append(self._escape(in_class=False))
            elif c == "[":
                self._class()
            elif c == "(":
                self._group()
                self.after_quantifier = False
                continue
            elif c == "{":
                m = _QUANTIFIER.match(p, self.i)
                if m and (m.group(1) or m.group(3)) and not (
                        m.group(1) and not m.group(2) and m.group(3)):
                    lo, comma, hi = m.groups()
                    self.out.append("{%s%s%s}" % (lo or "0", comma, hi))
                    self.i = m.end()
                    quantified = True
                else:
                    self.out.append("\\{")
                    self.i += 1
            elif c == "}":
                self.out.append("\\}")
                self.i += 1
            elif c in "*+?":
                if c == "+" and self.after_quantifier:
                    raise _unsupported("a possessive quantifier", p[max(0, self.i - 1):
                                                                     self.i + 1])
                if c == "?" and self.after_quantifier:  # lazy: fine
                    self.out.append(c)
                    self.i += 1
                    self.after_quantifier = False
                    continue
                self.out.append(c)
                self.i += 1
                quantified = True
            elif c == "/":
                self.out.append(_hex(ord("/")))
                self.i += 1
            else:
                self.out.append(c)
                self.i += 1
            self.after_quantifier = quantified
        return "".join(self.out)

    # ---- pieces ----------------------------------------------------------------

    def _escape(self, in_class: bool) -> str:
        """The escape at ``self.i`` (a backslash), in Rust's syntax; moves past it."""
        p, i = self.p, self.i
        d = p[i + 1]
        self.i = i + 2
        if d == "0" or (in_class and d in _OCTAL):
            j = self.i
            while j < min(i + 4, len(p)) and p[j] in _OCTAL:  # up to three digits
                j += 1
            self.i = j
            return _hex(int(p[i + 1:j], 8))
        if d.isdigit():  # \1..\99, or a three-digit octal escape
            if d in _OCTAL and p[i + 2: i + 3] and p[i + 2] in _OCTAL and \
                    p[i + 3: i + 4] and p[i + 3] in _OCTAL:
                self.i = i + 4
                return _hex(int(p[i + 1:i + 4], 8))
            j = self.i
            while j < len(p) and j < i + 3 and p[j].isdigit():
                j += 1
            raise _unsupported("a backreference", p[i:j])
        if d in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[d]
            digits = p[self.i:self.i + width]
            self.i += width
            return _hex(int(digits, 16))
        if d == "N":
            end = p.index("}", self.i)
            name = p[self.i + 1:end]
            self.i = end + 1
            return _hex(ord(unicodedata.lookup(name)))
        if d == "b":
            if in_class:
                return _hex(8)  # a backspace, inside a class
            raise _unsupported("a word boundary", "\\b")
        if d == "B":
            raise _unsupported("a non-word-boundary", "\\B")
        if d == "Z":
            return "\\z"
        if d == "A" or d in _CLASS_ESCAPES or d in _CONTROL_ESCAPES:
            return "\\" + d
        return _hex(ord(d))  # an escaped character that is itself: \/ \- \. \<

    def _class(self) -> None:
        p = self.p
        self.out.append("[")
        self.i += 1
        if p[self.i] == "^":
            self.out.append("^")
            self.i += 1
        if p[self.i] == "]":  # a leading ] is literal
            self.out.append("\\]")
            self.i += 1
        while p[self.i] != "]":
            c = p[self.i]
            if c == "\\":
                self.out.append(self._escape(in_class=True))
                continue
            if c in "[&~/":
                self.out.append(_hex(ord(c)))
            elif c == "-" and p[self.i + 1: self.i + 2] == "-":  # Rust's set difference
                self.out.append(_hex(ord(c)))
            else:
                self.out.append(c)
            self.i += 1
        self.out.append("]")
        self.i += 1

    def _group(self) -> None:
        p, i = self.p, self.i
        if not p.startswith("(?", i):
            self.out.append("(")
            self.i += 1
            return
        rest = p[i + 2:]
        for prefix, what in (("=", "a lookahead"), ("!", "a negative lookahead"),
                             ("<=", "a lookbehind"), ("<!", "a negative lookbehind"),
                             ("P=", "a backreference"), (">", "an atomic group"),
                             ("(", "a conditional group")):
            if rest.startswith(prefix):
                raise _unsupported(what, "(?" + prefix)
        if rest.startswith("#"):  # a comment: dropped
            self.i = p.index(")", i) + 1
            return
        if rest.startswith(":") or rest.startswith("P<") or rest.startswith("<"):
            end = i + 2 + (1 if rest.startswith(":") else rest.index(">") + 1)
            self.out.append(p[i:end])
            self.i = end
            return
        m = re.match(r"([a-zA-Z]*)(?:-([a-zA-Z]*))?([:)])", rest)
        if m is None:  # re.compile accepted it: pass it on as it is
            self.out.append("(?")
            self.i += 2
            return
        on, off, close = m.group(1), m.group(2) or "", m.group(3)
        for flag, what in (("a", "the ASCII flag"), ("L", "the locale flag")):
            if flag in on + off:
                raise _unsupported(what, f"(?{on}{'-' + off if off else ''}{close}")
        on = on.replace("u", "")
        flags = on + ("-" + off if off else "")
        self.i = i + 2 + m.end()
        if not flags:  # only (?u): Unicode is the default
            self.out.append("(?:" if close == ":" else "")
            return
        self.out.append(f"(?{flags}{close}")
