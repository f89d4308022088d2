"""Bounds on what one request may ask of the server, and reading a body within them.

Every count and size a client sends is bounded here, so that no single request can stall
the event loop, the engine thread or another tenant: the body (checked while it is read
and inflated), the JSON's depth and size, messages and parts, stop strings, token lists,
grammar sources. A request over a limit is a 4xx that names the limit and, where a user
could want more, the flag that raises it.
"""

from __future__ import annotations

import asyncio
import codecs
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from aiohttp import web

from blockserve.server.errors import ApiError, invalid

T = TypeVar("T")

# The app's pool for CPU work that must not run on the event loop (``offload``).
WORKERS = web.AppKey("workers", ThreadPoolExecutor)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The defaults fit the largest real clients (Claude
    Code's ~1 MB bodies, hundreds of tools, long sessions) with room to spare."""

    max_body_bytes: int = 32 << 20  # after decompression; --max-body-bytes
    body_timeout: float = 60.0  # seconds to receive a whole body; --body-timeout
    max_json_depth: int = 64
    max_messages: int = 20_000  # --max-messages
    max_content_parts: int = 50_000  # over all messages
    max_tools: int = 2_048
    max_stop: int = 64  # stop strings
    max_stop_chars: int = 512  # one stop string: the engine checks each one every token
    max_stop_token_ids: int = 256
    max_logit_bias: int = 2_048
    max_choice_options: int = 2_048  # guided_choice
    max_grammar_bytes: int = 1 << 20  # a schema, regex or choice list, as JSON
    max_template_kwargs_nodes: int = 256  # chat_template_kwargs: plain values only
    max_template_kwargs_chars: int = 16_384


def over(what: str, n: int, limit: int, param: str | None = None,
         flag: str | None = None) -> ApiError:
    """A 400 naming the limit (and the flag that raises it, if there is one)."""
    hint = f" (raise it with {flag})" if flag else ""
    return invalid(f"{what}: {n} is over this server's limit of {limit}{hint}", param=param)


def bounded(items: Any, limit: int, what: str, param: str) -> None:
    """A 400 if a list (or object) has more than ``limit`` entries."""
    if isinstance(items, (list, dict)) and len(items) > limit:
        raise over(what, len(items), limit, param)


async def read_body(request: web.Request, limits: Limits) -> bytes:
    """The body, inflated as it arrives (aiohttp stops at ``client_max_size``, so a
    compressed bomb never grows past it) and within ``body_timeout``."""
    try:
        return await asyncio.wait_for(request.read(), limits.body_timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within "
                            f"{limits.body_timeout:g} s", code="request_timeout")
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"the request body is over this server's limit of "
                            f"{limits.max_body_bytes} bytes (after decompression; raise it "
                            "with --max-body-bytes)", code="request_too_large")


def decode_json(raw: bytes, charset: str | None, limits: Limits) -> dict:
    """The body as a JSON object: a clear 400 for an unknown charset, bad bytes, bad
    JSON, numbers past Python's digit limit, nesting past ``max_json_depth`` or a
    string that isn't valid Unicode (a lone surrogate)."""
    charset = charset or "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        raise invalid(f"unknown charset {charset!r} in Content-Type")
    try:
        body = json.loads(raw.decode(charset))
    except UnicodeDecodeError as e:
        raise invalid(f"the body is not valid {charset}: {e}")
    except RecursionError:
        raise invalid("the body's JSON is nested too deeply")
    except ValueError as e:  # JSONDecodeError, and integers of over 4300 digits
        raise invalid(f"the body is not valid JSON: {e}")
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    check_tree(body, limits.max_json_depth)
    return body


def check_tree(value: Any, max_depth: int) -> None:
    """Walk the parsed body once: depth within ``max_depth``, every string encodable
    (JSON may carry lone surrogates, which no tokenizer or hash can take)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            _check_text(v)
        elif isinstance(v, (dict, list)):
            if depth >= max_depth:
                raise invalid(f"the body's JSON is nested deeper than {max_depth} levels")
            if isinstance(v, dict):
                for k, item in v.items():
                    _check_text(k)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in v)


def _check_text(s: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid("the body has a string that is not valid Unicode (a lone "
                          "surrogate escape such as \\ud800)")


def json_size(value: Any) -> int:
    """The size of a value as compact JSON, to bound grammar sources."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


async def offload(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    """Run CPU work (JSON, templates, tokenizing, grammar compiles) in the app's bounded
    pool, off the event loop: a slow request delays only itself."""
    return await asyncio.get_running_loop().run_in_executor(request.app[WORKERS], fn,
                                                            *args)
