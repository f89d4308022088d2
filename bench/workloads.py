"""Seeded workloads for the load generator: the same seed gives the same requests.

A workload is a list of sessions; a session is a list of turns run one after another
(each turn's messages are the history so far plus the server's previous reply plus
the turn's new message). Single-request workloads have one turn per session.
"""

from __future__ import annotations

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


@dataclass
class Session:
    system: str | None
    turns: list[Turn]
    group: int = 0
    history: list[dict] = field(default_factory=list)  # filled while running

    def messages_for(self, i: int) -> list[dict]:
        base = [{"role": "system", "content": self.system}] if self.system else []
        return base + self.history + [self.turns[i].message]

    def record_reply(self, i: int, reply: str) -> None:
        """Turn ``i`` is done: its message and the server's reply join the history."""
        self.history += [self.turns[i].message, {"role": "assistant", "content": reply}]


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


WORKLOADS = {"shared-prefix": shared_prefix, "agent": agent_sessions, "no-sharing": no_sharing}
