"""The target model's tokenizer, for the load generator: to size random prompts in
tokens and to count a workload's distinct prefix tokens.

Either a local Hugging Face tokenizer (``--tokenizer PATH``), or the server's own
vLLM-style ``/tokenize`` and ``/detokenize`` endpoints, which blockserve serves. Neither
loads MLX, so the load generator runs on any machine.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Protocol


class BenchTokenizer(Protocol):
    def render(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a chat prompt (and its tools), with the assistant header."""

    def trim(self, text: str, n: int) -> str:
        """``text`` cut to its first ``n`` tokens."""


class LocalTokenizer:
    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return list(self._tok.apply_chat_template(messages, tools=tools,
                                                  add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))

    def trim(self, text: str, n: int) -> str:
        return self._tok.decode(self._tok.encode(text, add_special_tokens=False)[:n])


class ServerTokenizer:
    """The server's tokenizer over HTTP (blocking calls: run them off the event loop)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.model = model
        self.api_key = api_key

    def _post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self.model:
            body = {"model": self.model, **body}
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), headers)
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        body = {"messages": messages, "add_generation_prompt": True}
        if tools:
            body["tools"] = tools
        return self._post("/tokenize", body)["tokens"]

    def trim(self, text: str, n: int) -> str:
        ids = self._post("/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]
        return self._post("/detokenize", {"tokens": ids[:n]})["prompt"]


def open_tokenizer(url: str, path: str | None = None, model: str | None = None,
                   api_key: str | None = None) -> BenchTokenizer:
    """A local tokenizer if ``path`` is given, else the server's."""
    return LocalTokenizer(path) if path else ServerTokenizer(url, model, api_key)
