"""The model-facing half of the HTTP layer: chat templates and tokenization.

The server gets one of these from the command line and needs nothing else from the
engine, so it never touches MLX.
"""

from __future__ import annotations

from engine.chat import RenderedPrompt, render_chat


class TokenizerFrontend:
    def __init__(self, model_id: str, tokenizer, max_context: int):
        self.model_id = model_id
        self.max_context = max_context
        self._tok = tokenizer

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> RenderedPrompt:
        return render_chat(self._tok, messages, tools, template_kwargs)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))
