"""Seeded workloads for the load generator: the same seed gives the same requests.

A workload is a list of sessions; a session is a list of turns run one after another
(each turn's messages are the history so far plus the server's previous reply plus
the turn's new message). Single-request workloads have one turn per session.
"""

from __future__ import annotations

import json
import keyword
import random
import re
from dataclasses import dataclass, field
from typing import Callable

_WORDS = ("the cache block model token server request reply tool result file code "
          "function return value list print import class agent turn prefix memory batch "
          "stream query system user error path line test build run config module data "
          "index table read write open close start stop parse format check update").split()


@dataclass
class Turn:
    message: dict  # appended to the history before this turn's request
    max_tokens: int
    # A recorded trace's assistant turn (e.g. a tool call) before ``message``: replayed
    # instead of the server's reply to the previous turn.
    replayed: dict | None = None
    temperature: float = 0.0  # sent with the request: greedy unless a workload says so


@dataclass
class Session:
    system: str | None
    turns: list[Turn]
    group: int = 0
    tools: list[dict] | None = None  # sent with every request (OpenAI's shape)
    history: list[dict] = field(default_factory=list)  # filled while running

    def messages_for(self, i: int) -> list[dict]:
        base = [{"role": "system", "content": self.system}] if self.system else []
        turn = self.turns[i]
        return base + self.history + ([turn.replayed] if turn.replayed else []) + [turn.message]

    def record_reply(self, i: int, reply: str) -> None:
        """Turn ``i`` is done: its messages and the server's reply join the history (a
        replayed trace replaces that reply with its own next assistant turn)."""
        turn = self.turns[i]
        self.history += ([turn.replayed] if turn.replayed else []) + [turn.message]
        nxt = self.turns[i + 1] if i + 1 < len(self.turns) else None
        if nxt is None or nxt.replayed is None:
            self.history.append({"role": "assistant", "content": reply})


@dataclass
class Workload:
    name: str
    sessions: list[Session]

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


Trim = Callable[[str, int], str]  # cut text to about n tokens with the target's tokenizer


def random_text(rng: random.Random, n_tokens: int, trim: Trim | None = None) -> str:
    # Words of this vocabulary are ~1-2 tokens: make enough, then trim to n tokens.
    text = " ".join(rng.choice(_WORDS) for _ in range(n_tokens + 8))
    return trim(text, n_tokens) if trim else " ".join(text.split()[:n_tokens])


def shared_prefix(groups: int = 4, prompts_per_group: int = 8, system_tokens: int = 1024,
                  question_tokens: int = 32, output_tokens: int = 32, seed: int = 0,
                  trim: Trim | None = None) -> Workload:
    """G groups x P prompts; each group shares one system prompt (SGLang's
    generated-shared-prefix). Requests are shuffled, as real arrivals would be."""
    rng = random.Random(seed)
    systems = [random_text(rng, system_tokens, trim) for _ in range(groups)]
    sessions = [Session(systems[g], [Turn({"role": "user",
                                          "content": random_text(rng, question_tokens, trim)},
                                         output_tokens)], group=g)
                for g in range(groups) for _ in range(prompts_per_group)]
    rng.shuffle(sessions)
    return Workload(f"shared-prefix {groups}x{prompts_per_group}", sessions)


def agent_sessions(sessions: int = 4, turns: int = 4, system_tokens: int = 1024,
                   task_tokens: int = 48, tool_tokens: int = 96, output_tokens: int = 32,
                   seed: int = 1, trim: Trim | None = None) -> Workload:
    """N sessions x T turns sharing one system prompt; every turn after the first sends
    the whole history, the previous reply, and a new tool result."""
    rng = random.Random(seed)
    system = random_text(rng, system_tokens, trim)
    out = []
    for i in range(sessions):
        ts = [Turn({"role": "user", "content": f"Task {i}: " + random_text(rng, task_tokens, trim)},
                   output_tokens)]
        ts += [Turn({"role": "user", "content": "Tool result: " + random_text(rng, tool_tokens, trim)},
                    output_tokens) for _ in range(turns - 1)]
        out.append(Session(system, ts, group=i))
    return Workload(f"agent {sessions}x{turns}", out)


def no_sharing(requests: int = 32, prompt_tokens: int = 512, output_tokens: int = 32,
               seed: int = 2, trim: Trim | None = None) -> Workload:
    """Unrelated prompts: prefix caching can't help, and must not hurt."""
    rng = random.Random(seed)
    return Workload(f"no-sharing x{requests}", [
        Session(None, [Turn({"role": "user",
                             "content": f"{i} " + random_text(rng, prompt_tokens, trim)},
                            output_tokens)], group=i)
        for i in range(requests)])


_TOOL_NAMES = ("Read", "Write", "Edit", "MultiEdit", "Bash", "BashOutput", "KillShell", "Glob",
               "Grep", "LS", "NotebookRead", "NotebookEdit", "WebFetch", "WebSearch",
               "TodoWrite", "Task", "ExitPlanMode", "SlashCommand", "AskUser", "Skill",
               "ListMcpResources", "ReadMcpResource", "Monitor", "ToolSearch")


def _tool(rng: random.Random, name: str, tokens: int, trim: Trim | None) -> dict:
    """An OpenAI-style tool whose description and schema are about ``tokens`` long."""
    params = {f"{w}_{j}": {"type": rng.choice(["string", "integer", "boolean"]),
                           "description": random_text(rng, 12, trim)}
              for j, w in enumerate(rng.sample(_WORDS, 4))}
    return {"type": "function", "function": {
        "name": name, "description": random_text(rng, max(tokens - 120, 16), trim),
        "parameters": {"type": "object", "properties": params,
                       "required": list(params)[:2]}}}


def claude_code_sessions(sessions: int = 1, turns: int = 6, system_tokens: int = 18000,
                         tools: int = 24, tool_tokens: int = 250, result_tokens: int = 400,
                         output_tokens: int = 32, seed: int = 3,
                         trim: Trim | None = None) -> Workload:
    """A Claude-Code-shaped replay: one long system prompt and a list of ``tools``
    tools shared by every session; a task, then turns of (the trace's tool call, its
    result). The system prompt and tools are ~``system_tokens`` in all."""
    rng = random.Random(seed)
    tool_list = [_tool(rng, _TOOL_NAMES[i % len(_TOOL_NAMES)] + ("" if i < 24 else str(i)),
                       tool_tokens, trim) for i in range(tools)]
    system = random_text(rng, max(system_tokens - tools * tool_tokens, 64), trim)
    out = []
    for i in range(sessions):
        ts = [Turn({"role": "user", "content": f"Task {i}: " + random_text(rng, 64, trim)},
                   output_tokens)]
        for t in range(1, turns):
            tool = rng.choice(tool_list)["function"]
            call_id = f"call_{i}_{t}"
            args = {k: random_text(rng, 6, trim) for k in list(tool["parameters"]["properties"])[:2]}
            ts.append(Turn(
                {"role": "tool", "tool_call_id": call_id,
                 "content": random_text(rng, result_tokens, trim)},
                output_tokens,
                replayed={"role": "assistant", "content": "", "tool_calls": [{
                    "id": call_id, "type": "function",
                    "function": {"name": tool["name"], "arguments": json.dumps(args)}}]}))
        out.append(Session(system, ts, group=i, tools=tool_list))
    return Workload(f"claude-code {sessions}x{turns}", out)


# The edit workload's source files: a few kinds of functions (and classes) that call one
# another, with docstrings, loops and returns, so a reply that copies the file copies code.
_NOUNS = [w for w in _WORDS if w != "the" and not keyword.iskeyword(w)]
_SEP = "\n\n\n"  # between top-level blocks, as PEP 8 has it
Funcs = dict[str, list[str]]  # a kind's function names, in the order defined
_APPROX_TOKEN = re.compile(r"\s*(?:\w+|[^\w\s])")  # a word or a symbol: ~ a BPE token


def _approx_trim(text: str, n: int) -> str:
    """``text`` cut to about ``n`` tokens without a tokenizer (a word or symbol each)."""
    end = 0
    for i, m in enumerate(_APPROX_TOKEN.finditer(text)):
        if i == n:
            break
        end = m.end()
    return text[:end]


def _a(word: str) -> str:
    """The word with its article, so docstrings read as English."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _read_fn(rng: random.Random, name: str, a: str, b: str, funcs: Funcs) -> list[str]:
    return [f"def {name}(path: str) -> list[dict]:",
            f'    """Read the {a} rows of the JSON file at path (those with {_a(b)})."""',
            "    if not os.path.exists(path):",
            "        return []",
            "    with open(path) as f:",
            "        data = json.load(f)",
            f'    return [row for row in data.get("{a}", []) if row.get("{b}")]']


def _filter_fn(rng: random.Random, name: str, a: str, b: str, funcs: Funcs) -> list[str]:
    return [f"def {name}(rows: list[dict], limit: int = {rng.choice((8, 16, 32, 64))}"
            ") -> list[dict]:",
            f'    """Check each {a} row for {_a(b)}, keeping at most limit of them."""',
            "    out = []",
            "    for row in rows:",
            "        if len(out) >= limit:",
            "            break",
            f'        if not row.get("{b}"):',
            "            continue",
            f'        row["{a}"] = row.get("{a}", 0) + 1',
            "        out.append(row)",
            "    return out"]


def _count_fn(rng: random.Random, name: str, a: str, b: str, funcs: Funcs) -> list[str]:
    return [f'def {name}(rows: list[dict], key: str = "{a}") -> dict[str, int]:',
            f'    """Count the {b} rows by the value of their key."""',
            "    counts: dict[str, int] = {}",
            "    for row in rows:",
            '        value = str(row.get(key, ""))',
            "        counts[value] = counts.get(value, 0) + 1",
            "    return counts"]


def _format_fn(rng: random.Random, name: str, a: str, b: str, funcs: Funcs) -> list[str]:
    return [f"def {name}(row: dict) -> str:",
            f'    """One line of text for {_a(a)} row."""',
            f'    name = row.get("name", "{a}")',
            f'    size = row.get("{b}", 0)',
            f'    return f"{{name}}: {{size}} {b} items"']


def _sort_fn(rng: random.Random, name: str, a: str, b: str, funcs: Funcs) -> list[str]:
    return [f"def {name}(rows: list[dict], reverse: bool = False) -> list[dict]:",
            f'    """The {a} rows ordered by their {b}, largest first when reverse."""',
            f'    keyed = [(row.get("{b}", 0), i, row) for i, row in enumerate(rows)]',
            "    keyed.sort(reverse=reverse)",
            "    return [row for _, _, row in keyed]"]


def _write_fn(rng: random.Random, name: str, a: str, b: str, funcs: Funcs) -> list[str]:
    return [f"def {name}(path: str, rows: list[dict]) -> int:",
            f'    """Write the {a} rows to the JSON file at path; how many were written."""',
            '    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)',
            '    with open(path, "w") as f:',
            f'        json.dump({{"{a}": rows, "{b}": len(rows)}}, f, indent=2)',
            "    return len(rows)"]


def _pipeline_fn(rng: random.Random, name: str, a: str, b: str, funcs: Funcs) -> list[str]:
    read, check, count, fmt = (rng.choice(funcs[k]) for k in ("read", "filter", "count",
                                                               "format"))
    return [f"def {name}(path: str, limit: int = {rng.choice((16, 32, 128))}) -> str:",
            f'    """Run the {a} {b}: read, check, count and format the rows at path."""',
            f"    rows = {read}(path)",
            f"    rows = {check}(rows, limit)",
            f'    counts = {count}(rows, "{b}")',
            f"    lines = [{fmt}(row) for row in rows]",
            '    lines.append(f"{len(counts)} distinct values")',
            '    return "\\n".join(lines)']


def _class(rng: random.Random, name: str, a: str, b: str, funcs: Funcs) -> list[str]:
    read, check, fmt = (rng.choice(funcs[k]) for k in ("read", "filter", "format"))
    return [f"class {name}:",
            f'    """{_a(a).capitalize()} {b}: the rows read from its path, at most limit."""',
            "",
            f"    def __init__(self, path: str, limit: int = {rng.choice((64, 256))}):",
            "        self.path = path",
            "        self.limit = limit",
            "        self.rows: list[dict] = []",
            "",
            "    def load(self) -> int:",
            '        """Read the rows from the path; how many were kept."""',
            f"        self.rows = {check}({read}(self.path), self.limit)",
            "        return len(self.rows)",
            "",
            "    def add(self, row: dict) -> None:",
            f'        """Add one {b} row, dropping the oldest past the limit."""',
            "        self.rows.append(row)",
            "        if len(self.rows) > self.limit:",
            "            self.rows.pop(0)",
            "",
            "    def lines(self) -> list[str]:",
            f'        """The rows as text, one line per {a}."""',
            f"        return [{fmt}(row) for row in self.rows]"]


# kind: (verbs its functions' names start with, its template)
_KINDS = {"read": (("read", "open", "load", "query"), _read_fn),
          "filter": (("check", "parse", "update", "select"), _filter_fn),
          "count": (("index", "count", "group"), _count_fn),
          "format": (("format", "render", "print"), _format_fn),
          "sort": (("sort", "order", "rank"), _sort_fn),
          "write": (("write", "save", "dump"), _write_fn),
          "pipeline": (("run", "build", "start", "stream"), _pipeline_fn),
          "class": ((), _class)}


def _block(rng: random.Random, kind: str, funcs: Funcs, used: list[str]) -> tuple[str, str]:
    """(a new top-level function or class of ``kind``, its name); names are unique."""
    verbs, make = _KINDS[kind]
    while True:
        a, b = rng.sample(_NOUNS, 2)
        name = a.title() + b.title() if kind == "class" else f"{rng.choice(verbs)}_{a}_{b}"
        if name not in used:
            break
    used.append(name)
    funcs.setdefault(kind, []).append(name)
    return "\n".join(make(rng, name, a, b, funcs)), name


def _python_file(rng: random.Random, n_tokens: int, trim: Trim | None
                 ) -> tuple[str, str, list[tuple[int, str, str]]]:
    """(file name, a Python module of whole top-level blocks, at most ``n_tokens`` long,
    its functions as (offset, kind, name))."""
    a, b = rng.sample(_NOUNS, 2)
    header = "\n".join([f'"""The {a} {b} module: read, check, count and format {a} rows."""',
                        "", "from __future__ import annotations", "", "import json", "import os"])
    consts = "\n".join(f"DEFAULT_{w.upper()}_{v.upper()} = {rng.choice((4, 16, 512, 4096))}"
                       for w, v in zip(rng.sample(_NOUNS, 3), rng.sample(_NOUNS, 3)))
    blocks: list[tuple[str, str, str]] = [(header, "", ""), (consts, "", "")]
    funcs: Funcs = {}
    used: list[str] = []
    kinds = ["read", "filter", "count", "format"]
    rng.shuffle(kinds)  # one of each first: pipelines and classes call them
    cut = trim or _approx_trim
    approx, target = 0, n_tokens * 3 // 2
    while True:
        while approx < target:
            kind = kinds.pop(0) if kinds else rng.choice(
                ["read", "filter", "count", "format", "sort", "write", "pipeline", "pipeline",
                 "class"])
            text, name = _block(rng, kind, funcs, used)
            blocks.append((text, kind, name))
            approx += len(_APPROX_TOKEN.findall(text))
        whole = _SEP.join(t for t, _, _ in blocks) + "\n"
        budget = len(cut(whole, n_tokens).rstrip())
        if budget < len(whole.rstrip()):  # cut short: there is enough
            break
        target *= 2  # the tokenizer packs code tighter than the estimate: make more
    kept, end, defs = [], 0, []
    for text, kind, name in blocks:
        start = end + (len(_SEP) if kept else 0)
        if defs and start + len(text) > budget:  # one function at least
            break
        if kind and kind != "class":
            defs.append((start, kind, name))
        kept.append(text)
        end = start + len(text)
    return f"{a}_{b}.py", _SEP.join(kept) + "\n", defs


def _rename(rng: random.Random, src: str, defs: list[tuple[int, str, str]], within: float
            ) -> tuple[str, str]:
    """(a function of ``src`` defined in its first ``within`` fraction, so the change
    comes early in the reply; a new name for it that ``src`` doesn't use)."""
    early = [d for d in defs if d[0] <= within * len(src)] or defs[:1]
    _, kind, old = rng.choice(early)
    verb, rest = old.split("_", 1)
    for v in rng.sample(_KINDS[kind][0], len(_KINDS[kind][0])):
        if v != verb and f"{v}_{rest}" not in src:
            return old, f"{v}_{rest}"
    return old, f"{old}_{rng.choice(_NOUNS)}"


def edit_sessions(requests: int = 4, file_tokens: int = 1500, output_tokens: int = 400,
                  seed: int = 4, trim: Trim | None = None) -> Workload:
    """Each request sends its own Python file of ~``file_tokens`` and asks for it back
    with one function renamed, greedy: replies that copy their prompt, the case of
    prompt-lookup speculation."""
    rng = random.Random(seed)
    out = []
    for i in range(requests):
        name, src, defs = _python_file(rng, file_tokens, trim)
        old, new = _rename(rng, src, defs, min(1.0, output_tokens / file_tokens) / 2)
        msg = (f"Here is `{name}`:\n\n```python\n{src}```\n\nRewrite the whole file with one "
               f"change: rename the function `{old}` to `{new}`, in its definition and "
               "every call. Reply with the complete file only, in one code block.")
        out.append(Session(None, [Turn({"role": "user", "content": msg}, output_tokens,
                                       temperature=0.0)], group=i))
    return Workload(f"edit x{requests}", out)


def overhead_streams(streams: int = 16, prompt_tokens: int = 32, output_tokens: int = 256,
                     seed: int = 6, trim: Trim | None = None) -> Workload:
    """``streams`` short unrelated prompts, ``output_tokens`` each, greedy, all at once:
    with a near-free model (``demo:tiny``) the server's own work per step decides the
    throughput (issue 33)."""
    rng = random.Random(seed)
    return Workload(f"overhead x{streams}", [
        Session(None, [Turn({"role": "user",
                             "content": f"{i} " + random_text(rng, prompt_tokens, trim)},
                            output_tokens, temperature=0.0)], group=i)
        for i in range(streams)])


WORKLOADS = {"shared-prefix": shared_prefix, "agent": agent_sessions, "no-sharing": no_sharing,
             "claude-code": claude_code_sessions, "edit": edit_sessions,
             "overhead": overhead_streams}
