"""The model-facing half of the HTTP layer: names, chat templates, tokenization, and
the output parsers of the model's family.

The server gets one of these from the composition root and needs nothing else from the
engine, so it never touches MLX.
"""

from __future__ import annotations


from blockserve.engine.text.chat import RenderedPrompt, render_chat
from blockserve.engine.text.output import (
    CONTENT,
    REASONING,
    TOOL,
    Markers,
    OutputParser,
    ReplySpec,
    json_call,
)
from blockserve.engine.text.structured import Constraint, Format, Grammars


class TokenizerFrontend:
    def __init__(self, model_names: list[str], tokenizer, model_path: str,
                 grammars: Grammars | None = None, vocab_size: int | None = None):
        if not model_names:
            raise ValueError("a served model needs at least one name")
        # Token ids a client may send: the model's vocabulary (its logits' width).
        self.vocab_size = vocab_size or len(tokenizer.vocab)
        self.model_names = list(model_names)  # what clients may call it; the first is shown
        self.model_path = model_path  # where its weights and tokenizer live
        self._tok = tokenizer
        self._markers = Markers.of(tokenizer)
        self._grammars = grammars or Grammars(tokenizer)

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

    def constrain(self, fmt: Format, reasoning_open: bool = False,
                  thinking: bool = False) -> Constraint:
        """Compile a format. ``reasoning_open``: the prompt ends inside a think block;
        ``thinking``: the request asked for thinking, which may come before the
        constrained answer. Raises ``GrammarError`` (a ValueError) with the reason it
        can't be enforced."""
        g = self._grammars
        return g.with_reasoning(g.compile(fmt), reasoning_open, thinking)

    def output_parser(self, spec: ReplySpec) -> OutputParser:
        """A parser for one request's output, as ``spec`` says (raw text passes through;
        a bare call is read whole, after the reasoning if a think block is open)."""
        if not spec.structured:
            return OutputParser(Markers())
        opened = REASONING if spec.reasoning_open else None
        if spec.bare_tool_call:
            markers = Markers(self._markers.think_start, self._markers.think_end,
                              tool_start="", tool_parser=json_call)
            return OutputParser(markers, spec.tools, True, after_reasoning=TOOL,
                                state=opened or TOOL)
        return OutputParser(self._markers, spec.tools, spec.parse_tools,
                            state=opened or CONTENT)
