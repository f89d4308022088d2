"""A fake generator behind ``scheduler.protocol``: scripted tokens and timing, no MLX.

Tokens are a hash of everything before them, so an output depends on the whole
context. Payloads record the tokens they were computed for, and every cached prefix
handed in is checked against the prompt: a scheduler that passes the wrong blocks
gets an error event, and tests fail.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import xxhash

from blockserve.kvpool import Namespace
from blockserve.scheduler.protocol import (
    BlocksEvent,
    ErrorEvent,
    FinishEvent,
    PreemptedEvent,
    SequenceSpec,
    TokenEvent,
)

VOCAB = 1000
EOS = 999


@dataclass
class FakePayload:
    tokens: tuple
    nbytes: int = 64
    snapshot: bool = False  # like a state-layer snapshot
    needs_snapshot: bool = False

    @property
    def resumable(self) -> bool:  # read by the pool: a hit may end here
        return self.snapshot or not self.needs_snapshot


class FakeCodec:
    """``FakePayload`` <-> bytes for the disk tier: JSON, padded to ``nbytes`` so file
    sizes look like real blocks."""

    def encode(self, p: FakePayload) -> bytes:
        meta = json.dumps({"tokens": list(p.tokens), "nbytes": p.nbytes,
                           "snapshot": p.snapshot, "needs_snapshot": p.needs_snapshot})
        return meta.encode().ljust(max(p.nbytes, len(meta) + 1), b"\0")

    def decode(self, data: bytes) -> FakePayload:
        try:
            d = json.loads(bytes(data).rstrip(b"\0"))
            return FakePayload(tuple(d["tokens"]), d["nbytes"], d["snapshot"],
                               d["needs_snapshot"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not a fake payload: {e}") from e


def next_token(context: list[int]) -> int:
    return xxhash.xxh64_intdigest(repr(context).encode()) % (VOCAB - 1)


@dataclass
class FakeGenerator:
    block_size: int = 4
    kv_bytes_per_token: int = 16
    max_context: int = 4096
    prefill_delay: float = 0.0  # seconds per computed prompt token
    token_delay: float = 0.0  # seconds per generated token
    namespace: Namespace = field(default_factory=lambda: Namespace("fake-model"))
    needs_snapshots: bool = False
    burst: int = 1  # tokens a step emits, as one list (a speculating engine's verify)

    def __post_init__(self):
        self.inserted: list[SequenceSpec] = []
        self.prefilled_tokens = 0
        self.aborted: list[str] = []
        self.preempted: list[str] = []
        self._tasks: dict[str, asyncio.Task] = {}
        self._context: dict[str, list[int]] = {}  # the tokens a sequence has computed
        self._generated: dict[str, int] = {}  # tokens generated before a preemption
        self._emit = None
        self.stage: dict[str, str] = {}  # seq id -> "prefilling", then "decoding"
        self._held: dict[str, asyncio.Event] = {}

    def hold_prefill(self, seq_id: str) -> asyncio.Event:
        """Stop ``seq_id`` inside its prefill (its checkpoints computed, the rest of
        its prompt not) until it is aborted; the event is set once it is held there."""
        self._held[seq_id] = asyncio.Event()
        return self._held[seq_id]

    # the protocol
    def start(self, emit) -> None:
        self._emit = emit

    def insert(self, spec: SequenceSpec) -> None:
        self.inserted.append(spec)
        self._tasks[spec.seq_id] = asyncio.get_running_loop().create_task(self._run(spec))

    def abort(self, seq_id: str) -> None:
        self.aborted.append(seq_id)
        self._generated.pop(seq_id, None)
        task = self._tasks.pop(seq_id, None)
        if task is not None:
            task.cancel()

    def preempt(self, seq_id: str) -> None:
        """Park a sequence as the engine does: its K/V (all but the last sampled token,
        which is never fed) comes back as blocks, and it resumes from its tokens."""
        task = self._tasks.pop(seq_id, None)
        if task is None:
            return  # it has ended
        task.cancel()
        self.preempted.append(seq_id)
        context = self._context.pop(seq_id)  # a prefix of the prompt while prefilling
        spec = next(s for s in reversed(self.inserted) if s.seq_id == seq_id)
        generated = context[len(spec.prompt):]
        self._generated[seq_id] = self._generated.get(seq_id, 0) + len(generated)
        kv = context[:-1] if generated else context
        end = len(kv) // self.block_size
        self._emit(PreemptedEvent(seq_id, kv[: end * self.block_size], 0,
                                  self._blocks(kv, 0, end), list(spec.prompt) + generated))

    def close(self) -> None:
        pass

    @property
    def active(self) -> int:
        return len(self._tasks)

    # the fake model
    def _blocks(self, tokens: list[int], first: int, end: int,
                snapshot: bool = False) -> list[FakePayload]:
        bs = self.block_size
        out = [FakePayload(tuple(tokens[i * bs : (i + 1) * bs]),
                           needs_snapshot=self.needs_snapshots) for i in range(first, end)]
        if out and snapshot:
            out[-1].snapshot = True
        return out

    async def _run(self, spec: SequenceSpec) -> None:
        bs = self.block_size
        self.stage[spec.seq_id] = "prefilling"
        try:
            expected = self._blocks(spec.prompt, 0, spec.cached_tokens // bs)
            if [p.tokens for p in spec.cached_payloads] != [p.tokens for p in expected]:
                self._emit(ErrorEvent(spec.seq_id, "cached payloads do not match the prompt"))
                return
            if self.needs_snapshots and spec.cached_payloads and \
                    not spec.cached_payloads[-1].snapshot:
                self._emit(ErrorEvent(spec.seq_id, "cached prefix ends without a snapshot"))
                return
            done = spec.cached_tokens
            self._context[spec.seq_id] = list(spec.prompt[:done])
            for cp in spec.checkpoints:
                await asyncio.sleep(self.prefill_delay * (cp.tokens - done))
                self._context[spec.seq_id] = list(spec.prompt[: cp.tokens])
                self.prefilled_tokens += cp.tokens - done
                self._emit(BlocksEvent(spec.seq_id, spec.prompt[: cp.tokens], done // bs,
                                       self._blocks(spec.prompt, done // bs, cp.tokens // bs,
                                                    snapshot=True), cp.tier))
                done = cp.tokens
            held = self._held.get(spec.seq_id)
            if held is not None:
                held.set()
                await asyncio.Event().wait()  # until aborted (cancelled)
            await asyncio.sleep(self.prefill_delay * (len(spec.prompt) - done))
            self.prefilled_tokens += len(spec.prompt) - done
            self.stage[spec.seq_id] = "decoding"
            context = list(spec.prompt)
            self._context[spec.seq_id] = context
            reason = "length"
            generated = self._generated.pop(spec.seq_id, 0) if spec.resume else 0
            step: list[TokenEvent] = []
            for _ in range(spec.sampling.max_tokens):
                if not step:  # a step computes ``burst`` tokens, sent as one delivery
                    await asyncio.sleep(self.token_delay)
                    if self._tasks.get(spec.seq_id) is not asyncio.current_task():
                        return  # preempted or aborted in the same tick
                tok = next_token(context)
                generated += 1
                if tok in spec.sampling.stop_token_ids:
                    reason = "stop"
                    break
                context.append(tok)
                step.append(TokenEvent(spec.seq_id, tok, f"<{tok}>"))
                if len(step) == self.burst:
                    self._emit(step if self.burst > 1 else step[0])
                    step = []
            if step:
                self._emit(step)
            kv_tokens = context[:-1] if reason == "length" else context
            end = len(kv_tokens) // bs
            first = done // bs
            self._emit(BlocksEvent(spec.seq_id, kv_tokens[: end * bs], first,
                                   self._blocks(kv_tokens, first, end), 0))
            self._emit(FinishEvent(spec.seq_id, reason, generated))
        finally:
            if self._tasks.get(spec.seq_id) is asyncio.current_task():
                self._tasks.pop(spec.seq_id, None)
                self._context.pop(spec.seq_id, None)


@dataclass
class ScriptedGenerator(FakeGenerator):
    """Replies with scripted text, tokenized by a real tokenizer: the server's output
    path (reasoning, tool calls) sees what a model of that family would emit. Each
    request takes the next script (the last one repeats); the reply ends with a stop."""

    tokenizer: object = None
    scripts: list = field(default_factory=list)
    # Awaited by each request before its first token (a test holds a reply there).
    first_token_gate: Callable[[], Awaitable[object]] | None = None

    async def _run(self, spec: SequenceSpec) -> None:
        bs = self.block_size
        try:
            done = spec.cached_tokens
            for cp in spec.checkpoints:
                self._emit(BlocksEvent(spec.seq_id, spec.prompt[: cp.tokens], done // bs,
                                       self._blocks(spec.prompt, done // bs, cp.tokens // bs),
                                       cp.tier))
                done = cp.tokens
            self.prefilled_tokens += len(spec.prompt) - spec.cached_tokens
            script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
            tokens = list(self.tokenizer.encode(script, add_special_tokens=False))
            tokens = tokens[: spec.sampling.max_tokens]
            if self.first_token_gate is not None:
                await self.first_token_gate()
            for i, tok in enumerate(tokens):
                await asyncio.sleep(self.token_delay)
                text = (self.tokenizer.decode(tokens[: i + 1])
                        [len(self.tokenizer.decode(tokens[:i])):])
                self._emit(TokenEvent(spec.seq_id, tok, text))
            length = len(tokens) == spec.sampling.max_tokens
            kv = list(spec.prompt) + (tokens[:-1] if length else tokens)  # what was fed
            first, end = done // bs, len(kv) // bs
            self._emit(BlocksEvent(spec.seq_id, kv[: end * bs], first,
                                   self._blocks(kv, first, end), 0))
            self._emit(FinishEvent(spec.seq_id, "length" if length else "stop",
                                   len(tokens) + (0 if length else 1)))
        finally:
            self._tasks.pop(spec.seq_id, None)
