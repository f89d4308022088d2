"""The narrow protocol between the scheduler and a generator (the MLX engine, or a fake).

The scheduler sends a ``SequenceSpec`` per admitted request and may abort it. The
generator runs on its own thread and reports back through one ``emit`` callback with
the events below. Payloads are opaque here: the generator makes them and reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Union

from blockserve.kvpool import Namespace


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings; never part of the streamed text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # mlx-lm's logits processors, per request in the batch (0 / 1.0 / () mean off)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False  # report each token's log probability
    top_logprobs: int = 0  # and this many most likely alternatives
    skip_special_tokens: bool = True
    # Structured output: a compiled format the tokens must follow (opaque here; the
    # engine's ``engine.structured.Constraint``).
    constraint: Any = None


@dataclass(frozen=True)
class Checkpoint:
    """Publish the blocks of ``prompt[:tokens]`` (block-aligned) as soon as computed."""

    tokens: int
    tier: int


@dataclass
class SequenceSpec:
    seq_id: str
    prompt: list[int]
    cached_tokens: int  # prompt[:cached_tokens] is covered by cached_payloads
    cached_payloads: list[Any]  # one per cached block, in order
    checkpoints: list[Checkpoint]  # strictly inside (cached_tokens, len(prompt))
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # A preempted sequence comes back: ``prompt`` is its prompt and the tokens it had
    # generated, ``sampling.max_tokens`` what is left; the generator resumes the
    # sequence it parked (its sampler, detokenizer and stop state go on).
    resume: bool = False


@dataclass
class TokenEvent:
    """One generated token and the text it completes (may be empty: UTF-8 or a
    possible stop string is still pending)."""

    seq_id: str
    token: int
    text: str
    logprob: float | None = None  # when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class BlocksEvent:
    """Full blocks computed by a sequence: ``payloads[i]`` is block ``first_block + i``
    of ``tokens`` (the whole token prefix these blocks belong to)."""

    seq_id: str
    tokens: list[int]
    first_block: int
    payloads: list[Any]
    tier: int


@dataclass
class FinishEvent:
    seq_id: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int  # every generated token, a stop token included, preempted or not
    text: str = ""  # held-back text released at the end
    stop_string: str | None = None  # the stop string that ended generation, if one did


@dataclass
class ErrorEvent:
    seq_id: str
    message: str


@dataclass
class PreemptedEvent:
    """The sequence is parked to free memory (``Generator.preempt``): ``payloads`` are
    blocks ``first_block..`` of ``tokens`` (what its K/V held), for the prefix cache;
    it resumes from ``resume`` (its prompt and every token it generated)."""

    seq_id: str
    tokens: list[int]
    first_block: int
    payloads: list[Any]
    resume: list[int]


@dataclass
class EngineFailedEvent:
    """The generator can't go on (its thread died): every request ends, and the process
    should exit so that a supervisor restarts it."""

    message: str
    seq_id: str = ""


EngineEvent = Union[TokenEvent, BlocksEvent, FinishEvent, ErrorEvent, PreemptedEvent,
                    EngineFailedEvent]


class Generator(Protocol):
    """What the scheduler needs from a model runner."""

    namespace: Namespace  # model identity, the root of block keys
    block_size: int
    kv_bytes_per_token: int  # K/V of one position: the memory budget counts in these
    max_context: int
    # Models with state layers (SSM, sliding window) resume a prefix only from a block
    # that carries a snapshot (its payload is ``resumable``, which the pool checks), so
    # the scheduler also checkpoints the prompt's last full block for them.
    needs_snapshots: bool

    def start(self, emit: Callable[[EngineEvent], None]) -> None:
        """Begin running; ``emit`` may be called from any thread, with one event or a
        list of them (a step's, in order)."""

    def insert(self, spec: SequenceSpec) -> None: ...

    def abort(self, seq_id: str) -> None:
        """Drop the sequence (running or parked); events already emitted for it may
        still arrive."""

    def preempt(self, seq_id: str) -> None:
        """Park the sequence and free its K/V, answering with a ``PreemptedEvent``
        (nothing if it has already ended); ``insert`` with ``resume`` brings it back."""

    def close(self) -> None: ...
