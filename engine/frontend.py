"""The model-facing half of the HTTP layer: names, chat templates, tokenization, and
the output parsers of the model's family.

The server gets one of these from the composition root and needs nothing else from the
engine, so it never touches MLX.
"""

from __future__ import annotations

from blockserve.engine.chat import RenderedPrompt, render_chat
from blockserve.engine.output import CONTENT, REASONING, Markers, OutputParser


class TokenizerFrontend:
    def __init__(self, model_names: list[str], tokenizer, model_path: str):
        if not model_names:
            raise ValueError("a served model needs at least one name")
        self.model_names = list(model_names)  # what clients may call it; the first is shown
        self.model_path = model_path  # where its weights and tokenizer live
        self._tok = tokenizer
        self._markers = Markers.of(tokenizer)

    @property
    def model_id(self) -> str:
        return self.model_names[0]

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    template_kwargs: dict | None = None,
                    continue_final: bool = False) -> RenderedPrompt:
        return render_chat(self._tok, messages, tools, template_kwargs, continue_final)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, tokens: list[int]) -> str:
        return self._tok.decode(tokens)

    def output_parser(self, tools: list[dict] | None = None, parse_tools: bool = False,
                      reasoning_open: bool = False, structured: bool = True) -> OutputParser:
        """A parser for one request's output; ``structured=False`` passes text through."""
        if not structured:
            return OutputParser(Markers())
        return OutputParser(self._markers, tools, parse_tools,
                            state=REASONING if reasoning_open else CONTENT)
