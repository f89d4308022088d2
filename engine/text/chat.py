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
    reasoning_open: bool = False  # the prompt ends inside a think block (the reply
    # starts in reasoning, as when a template opens the assistant turn with <think>)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (also the drafts a verify keeps)."""
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
    continue_final: bool = False,
) -> RenderedPrompt:
    """Apply the chat template, and find the checkpoint offsets by rendering prefixes
    of the conversation and matching them against the full prompt's tokens.
    ``continue_final`` continues the last (assistant) message instead of opening a new
    turn (vLLM's ``continue_final_message``)."""
    kw = dict(tools=tools, **(template_kwargs or {})) if tools else dict(template_kwargs or {})
    if not tokenizer.has_chat_template:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return RenderedPrompt(tokenizer.encode(text if continue_final else
                                               text + "assistant: "))

    def render(msgs: list[dict], add_generation_prompt: bool, **extra) -> list[int]:
        return list(tokenizer.apply_chat_template(
            msgs, add_generation_prompt=add_generation_prompt, tokenize=True, **kw, **extra))

    if continue_final:
        tokens = render(messages, False, continue_final_message=True)
    else:
        tokens = render(messages, True)
    checkpoints: list[tuple[int, int]] = []
    n_system = 0
    while n_system < len(messages) and messages[n_system]["role"] in ("system", "developer"):
        n_system += 1
    if 0 < n_system < len(messages):
        system_end = common_prefix(render(messages[:n_system], False), tokens)
        if system_end > 0:
            checkpoints.append((system_end, TIER_SYSTEM))
    if not continue_final and messages and messages[-1]["role"] in (
            "user", "tool", "system", "developer"):
        turn_end = common_prefix(render(messages, False), tokens)
        if 0 < turn_end < len(tokens):
            checkpoints.append((turn_end, TIER_CONVERSATION))
    return RenderedPrompt(tokens, checkpoints, _ends_in_reasoning(tokenizer, tokens))


def _ends_in_reasoning(tokenizer: Any, tokens: list[int]) -> bool:
    """Whether the prompt's last think marker opens a block (mlx-lm's server rule)."""
    if not getattr(tokenizer, "has_thinking", False):
        return False
    tail = tokens[-16:]  # a template opens the block at the very end, if at all
    start = tokenizer.rfind_think_start(tail)
    return start >= 0 and start > tokenizer.rfind_think_end(tail)
