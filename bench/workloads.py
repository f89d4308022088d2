"""Seeded workloads for the load generator: the same seed gives the same requests.

A workload is a list of sessions; a session is a list of turns run one after another
(each turn's messages are the history so far plus the server's previous reply plus
the turn's new message). Single-request workloads have one turn per session.
"""

from __future__ import annotations

import json
import random
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


WORKLOADS = {"shared-prefix": shared_prefix, "agent": agent_sessions, "no-sharing": no_sharing,
             "claude-code": claude_code_sessions}
