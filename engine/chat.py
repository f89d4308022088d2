"""Prompts from chat messages, with the checkpoints the prefix cache keeps longest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blockserve.kvpool import TIER_CONVERSATION, TIER_SYSTEM


@dataclass
class RenderedPrompt:
    tokens: list[int]
    # (token offset, tier): where the system part ends, and where the last user or
    # tool turn ends (before the assistant header). Not block-aligned.
    checkpoints: list[tuple[int, int]] = field(default_factory=list)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def render_chat(
    tokenizer: Any,
    messages: list[dict],
    tools: list[dict] | None = None,
    template_kwargs: dict | None = None,
) -> RenderedPrompt:
    """Apply the chat template, and find the checkpoint offsets by rendering prefixes
    of the conversation and matching them against the full prompt's tokens."""
    kw = dict(tools=tools, **(template_kwargs or {})) if tools else dict(template_kwargs or {})
    if not tokenizer.has_chat_template:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return RenderedPrompt(tokenizer.encode(text))

    def render(msgs: list[dict], add_generation_prompt: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(
            msgs, add_generation_prompt=add_generation_prompt, tokenize=True, **kw))

    tokens = render(messages, True)
    checkpoints: list[tuple[int, int]] = []
    n_system = 0
    while n_system < len(messages) and messages[n_system]["role"] in ("system", "developer"):
        n_system += 1
    if 0 < n_system < len(messages):
        system_end = _common_prefix(render(messages[:n_system], False), tokens)
        if system_end > 0:
            checkpoints.append((system_end, TIER_SYSTEM))
    if messages and messages[-1]["role"] in ("user", "tool"):
        turn_end = _common_prefix(render(messages, False), tokens)
        if 0 < turn_end < len(tokens):
            checkpoints.append((turn_end, TIER_CONVERSATION))
    return RenderedPrompt(tokens, checkpoints)
