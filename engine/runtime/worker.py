"""The batch thread: one thread owns the runner (ours, ``engine.runner``, for the families
it covers; mlx-lm's ``BatchGenerator`` for the rest) and runs every MLX call.

MLX streams and ``BatchGenerator`` are not thread-safe, so the scheduler never calls
them directly: it queues commands (insert, abort), and this thread reports tokens,
computed blocks, finishes and errors through the ``emit`` callback.

Fault isolation: a failure caused by one sequence fails that sequence alone. Its sampler
and logits processors run under a guard that charges an exception to it; a batch step
that still raises fails the sequences that could have caused it (those inserted since
the last good step, or still prefilling), with their own error, and rebuilds the batch
for the others from their prompt and the tokens they generated, so their streams go on.

Preemption: the scheduler may park a sequence to keep the memory limit. Its computed
blocks go back in a ``PreemptedEvent`` and its state (sampler, detokenizer, stop
strings, grammar) waits here; an insert with ``resume`` restarts it from the blocks
the prefix cache still has, as a failed batch's survivors restart.

Memory: after load the worker measures the weights, the runtime's resident bytes and a
step's activations (``engine.runtime.memory``), and keeps ``memory`` current (the
running K/V as allocated, MLX's counters) for the scheduler's budget.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Union

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import make_prompt_cache

from blockserve.engine.models.loader import LoadedModel, load_model
from blockserve.engine.runtime import blas, memory
from blockserve.engine.runtime.kvblocks import (
    KVBlockCodec,
    blocks_from_cache,
    cache_from_blocks,
)
from blockserve.engine.runtime.lookup import DraftStats
from blockserve.engine.runtime.ragged import supports as ragged_supports
from blockserve.engine.runtime.runner import DEFAULT_TOKEN_BUDGET, RaggedRunner, StepTimes
from blockserve.engine.runtime.sampling import (
    GrammarProcessor,
    Guard,
    greedy,
    logits_processors,
    make_sampler,
    token_logprobs,
)
from blockserve.engine.text.structured import Grammars
from blockserve.engine.text.streaming import IncrementalDetokenizer, StopStringFilter
from blockserve.kvpool import TIER_GENERATED, Namespace
from blockserve.scheduler.protocol import (
    BlocksEvent,
    EngineEvent,
    EngineFailedEvent,
    ErrorEvent,
    FinishEvent,
    PreemptedEvent,
    SequenceSpec,
    TokenEvent,
)

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    spec: SequenceSpec
    detok: IncrementalDetokenizer
    stops: StopStringFilter
    checkpoints: dict[int, int]  # prompt offset -> tier, still to publish
    published_blocks: int  # blocks [0, published_blocks) are in the pool or cached
    sampler: Callable
    processors: list[Callable]
    stop_ids: frozenset[int]
    guard: Guard
    grammar: GrammarProcessor | None = None
    position: list[int] | None = None  # a seeded sampler's next position (make_sampler)
    generated: int = 0  # every generated token, a stop token included
    tokens: list[int] = field(default_factory=list)  # generated tokens fed to the model


@dataclass(frozen=True)
class _Insert:
    spec: SequenceSpec


@dataclass(frozen=True)
class _Abort:
    seq_id: str


@dataclass(frozen=True)
class _Preempt:
    seq_id: str


@dataclass(frozen=True)
class _Call:
    """Run ``fn`` on the engine thread; its result (or error) goes to ``done``."""

    fn: Callable[[LoadedModel], object]
    done: queue.Queue


@dataclass(frozen=True)
class _Close:
    pass


_Command = Union[_Insert, _Abort, _Preempt, _Call, _Close]

MEMORY_REFRESH_SECONDS = 0.02  # how often a busy engine recounts its running K/V


def default_prompt_concurrency() -> int:
    """Prompts prefilled together. On the CPU a batch of prompts is no faster than the
    same prompts one by one (the work is compute-bound, and rows of unequal length are
    padded), so batching only delays every prompt to the end of the slowest: one at a
    time gives the shortest mean time to first token there (BENCHMARKS.md). A GPU has
    parallelism to spare, so it batches, as mlx-lm does."""
    return 1 if mx.default_device() == mx.cpu else 8


# "ragged": our runner, one forward per step within a token budget (engine.runner);
# "batch": mlx-lm's BatchGenerator; "auto": ragged where the model family allows.
RUNNERS = ("auto", "ragged", "batch")


class EngineWorker:
    """Implements ``scheduler.protocol.Generator`` on a real mlx-lm model."""

    def __init__(
        self,
        model: str | None = None,
        *,
        block_size: int = 16,
        max_running: int = 16,
        prefill_batch_size: int | None = None,
        prefill_step_size: int = 256,
        revision: str | None = None,
        runner: str = "auto",
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        speculative: bool = True,
    ):
        if runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}")
        self._runner = runner
        self._speculative = speculative
        self.draft_stats = DraftStats()  # read by /metrics; kept across batch rebuilds
        self.step_times = StepTimes()  # likewise: where a step's time goes
        self._token_budget = token_budget
        self.block_size = block_size
        self._model_name = model
        self._revision = revision
        self.max_running = max_running
        self._prefill_batch_size = prefill_batch_size or default_prompt_concurrency()
        self._prefill_step_size = prefill_step_size
        self._commands: queue.Queue = queue.Queue()
        self.memory = memory.EngineMemory()  # measured on the engine thread
        self._stopped = False  # the thread has ended: no command will be read again
        self._stop_lock = threading.Lock()  # orders a call's put against the thread's end
        self._emit: Callable[[EngineEvent], None] | None = None
        self._pending: list[EngineEvent] | None = None  # a step's events, sent as one
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="blockserve-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            # Let the thread finish its MLX teardown first: a process that exits while a
            # thread is still inside MLX aborts (134) instead of reporting the error.
            self._thread.join()
            raise self._load_error
        m = self.loaded
        self.namespace = Namespace(m.identity)
        self.kv_bytes_per_token = m.kv_bytes_per_token
        self.max_context = m.max_context
        self.vocab_size = m.vocab_size
        self.tokenizer = m.tokenizer
        self.grammars = Grammars(m.tokenizer)  # shared with the frontend, which checks
        self.grammars.warm()
        self.needs_snapshots = m.layout.needs_snapshots

    # ---- the Generator protocol (any thread) ----------------------------------

    def start(self, emit: Callable[[EngineEvent], None]) -> None:
        self._emit = emit  # the engine thread reads it on its next event

    def insert(self, spec: SequenceSpec) -> None:
        self._commands.put(_Insert(spec))

    def abort(self, seq_id: str) -> None:
        self._commands.put(_Abort(seq_id))

    def preempt(self, seq_id: str) -> None:
        self._commands.put(_Preempt(seq_id))

    def block_codec(self) -> KVBlockCodec:
        """Block payloads <-> bytes, for the disk tier (``kvpool.DiskTier``)."""
        return KVBlockCodec(self.loaded.layout, self.block_size)

    def describe_backend(self) -> str:
        """The device and BLAS in use, for the start-up log."""
        if self.runner == "ragged":
            lookup = "on" if self._speculative else "off"
            return (f"backend {mx.default_device()}, BLAS {blas.active_blas}, ragged runner: "
                    f"decodes and prefill chunks in one forward, {self._token_budget} tokens "
                    f"a step while streams decode, {self._prefill_step_size} while none does; "
                    f"prompt-lookup speculation {lookup}")
        why = ("; prompt-lookup speculation off: it runs in the ragged runner, which does "
               "not cover this model's caches" if self._speculative else "")
        return (f"backend {mx.default_device()}, BLAS {blas.active_blas}, BatchGenerator, "
                f"prompts prefilled {self._prefill_batch_size} at a time{why}")

    def close(self) -> None:
        if self._thread.is_alive():
            self._commands.put(_Close())
            self._thread.join()

    def run_sync(self, fn: Callable[[LoadedModel], object]) -> object:
        """Run ``fn(loaded_model)`` on the engine thread and wait (tests, tools)."""
        done: queue.Queue = queue.Queue()
        with self._stop_lock:
            if self._stopped:
                raise RuntimeError("the engine thread has stopped")
            self._commands.put(_Call(fn, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    # ---- the engine thread ----------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # the scheduler fails everything; the process exits
            log.exception("the engine thread died")
            self._send(EngineFailedEvent(f"{type(e).__name__}: {e}"))
        finally:
            self._refuse_calls()
            mx.clear_streams()  # MLX needs this at the end of every thread that used it

    def _refuse_calls(self) -> None:
        """No command is read after this: a caller waiting on ``run_sync`` gets an error
        instead of waiting forever."""
        with self._stop_lock:
            self._stopped = True
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Call):
                cmd.done.put((False, RuntimeError("the engine thread has stopped")))

    def _serve(self) -> None:
        try:
            self.loaded = load_model(self._model_name, self._revision)
            self.runner = self._runner_kind()
            self._measure()
        except BaseException as e:  # reported to the constructor's caller
            self._load_error = e
            self._ready.set()
            return
        wired = memory.wire_model_memory()
        self._ready.set()
        try:
            self._loop()
        finally:
            memory.restore_wired_limit(wired)

    def _measure(self) -> None:
        """The weights, what the process holds besides them, and a step's activations."""
        m = self.memory
        m.weights_bytes = memory.weights_bytes(self.loaded.model)
        m.baseline_bytes = max(memory.resident_bytes() - m.weights_bytes, 0)
        m.activation = memory.measure_activations(self.loaded.model,
                                                  min(self.step_tokens, 128))

    @property
    def step_tokens(self) -> int:
        """The most tokens one forward computes."""
        return max(self._prefill_step_size, self._token_budget)

    def activation_reserve(self, max_context: int) -> int:
        """Bytes to keep for the largest step at ``max_context`` positions (measured)."""
        return max(self.memory.activation.peak(self.step_tokens, max_context),
                   self.memory.step_peak_bytes)

    def _loop(self) -> None:
        stream = mx.default_stream(mx.default_device())
        self._seqs: dict[int, _Sequence] = {}
        self._uids: dict[str, int] = {}
        self._parked: dict[str, _Sequence] = {}  # preempted, waiting to resume
        self._fresh: set[int] = set()  # inserted since the last good step
        self._memory_due = 0.0
        self._bg = self._new_batch_generator(stream)
        running = True
        while running:
            block = not self._seqs
            while True:
                try:
                    cmd = self._commands.get(block=block)
                except queue.Empty:
                    break
                block = False
                if isinstance(cmd, _Close):
                    running = False
                    break
                self._handle(cmd, stream)
            if running and self._seqs:
                before = mx.get_active_memory()
                mx.reset_peak_memory()
                try:
                    with mx.stream(stream):
                        self._step()
                except Exception as e:
                    log.exception("batch step failed")
                    with mx.stream(stream):
                        self._recover(e, stream)
                self._note_memory(mx.get_peak_memory() - before)
        self._bg.close()
        self._seqs.clear()
        self._parked.clear()
        del self._bg
        mx.synchronize(stream)

    def _note_memory(self, step_peak: int, force: bool = False) -> None:
        """Keep ``memory`` current: the step's peak every step, the running K/V (a walk
        over the caches) at most every ``MEMORY_REFRESH_SECONDS``."""
        m = self.memory
        m.step_peak_bytes = max(m.step_peak_bytes, step_peak)
        now = time.monotonic()
        if not force and now < self._memory_due:
            return
        self._memory_due = now + MEMORY_REFRESH_SECONDS
        m.kv_bytes = self._bg.prompt_cache_nbytes if self._seqs else 0
        m.mlx_active, m.mlx_cache = mx.get_active_memory(), mx.get_cache_memory()
        m.mlx_peak = max(m.mlx_peak, mx.get_peak_memory())

    def _runner_kind(self) -> str:
        """The runner this model gets: ragged where ``engine.ragged`` covers it."""
        ok = ragged_supports(self.loaded.model, make_prompt_cache(self.loaded.model))
        if self._runner == "ragged" and not ok:
            raise ValueError(f"{self.loaded.model_id}: the ragged runner does not cover "
                             "this model family")
        return "ragged" if ok and self._runner != "batch" else "batch"

    def _new_batch_generator(self, stream) -> BatchGenerator | RaggedRunner:
        if self.runner == "ragged":
            # The step's token budget: decode tokens first, prefill chunks fill the rest.
            return RaggedRunner(self.loaded.model, token_budget=self._token_budget,
                                prefill_step_size=self._prefill_step_size,
                                max_running=self.max_running,
                                speculative=self._speculative, draft_stats=self.draft_stats,
                                step_times=self.step_times)
        return BatchGenerator(
            self.loaded.model,
            completion_batch_size=self.max_running,
            prefill_batch_size=self._prefill_batch_size,
            prefill_step_size=self._prefill_step_size,
            stream=stream,
        )

    def _send(self, event: EngineEvent) -> None:
        if self._pending is not None:  # inside a step: delivered with the others
            self._pending.append(event)
            return
        self._deliver(event)

    def _deliver(self, event: EngineEvent | list[EngineEvent]) -> None:
        """One cross-thread call: an event, or a step's events in order."""
        if self._emit is None:
            return
        t0 = time.perf_counter()
        try:
            self._emit(event)
        except RuntimeError:  # the listener's loop has closed: nobody is left to tell
            log.debug("dropped events: the scheduler's loop is closed")
        self.step_times.seconds["events"] += time.perf_counter() - t0

    def _handle(self, cmd: _Command, stream) -> None:
        if isinstance(cmd, _Insert):
            try:
                with mx.stream(stream):
                    self._insert(cmd.spec)
            except Exception as e:
                log.exception("insert failed")
                self._send(ErrorEvent(cmd.spec.seq_id, f"could not start generation: {e}"))
        elif isinstance(cmd, _Abort):
            self._parked.pop(cmd.seq_id, None)
            uid = self._uids.get(cmd.seq_id)
            if uid is not None:
                self._drop(uid)
        elif isinstance(cmd, _Preempt):
            uid = self._uids.get(cmd.seq_id)
            if uid is not None:  # else it has ended: its finish is on the way
                try:
                    with mx.stream(stream):
                        self._preempt(uid)
                except Exception as e:
                    log.exception("preempt failed")
                    self._fail(uid, f"generation failed: {e}")
        elif isinstance(cmd, _Call):
            try:
                with mx.stream(stream):
                    cmd.done.put((True, cmd.fn(self.loaded)))
            except Exception as e:
                cmd.done.put((False, e))

    def _insert(self, spec: SequenceSpec) -> None:
        if spec.resume:
            self._resume(spec)
            return
        bs = self.block_size
        n_prompt = len(spec.prompt)
        if not 0 <= spec.cached_tokens < n_prompt:
            raise ValueError("a sequence must leave at least one prompt token to compute")
        if spec.cached_tokens != len(spec.cached_payloads) * bs:
            raise ValueError("cached_tokens must equal the cached blocks' tokens")
        p = spec.sampling
        stop_ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            stop_ids |= self.loaded.eos_token_ids
        guard = Guard()
        processors = logits_processors(p)
        grammar = None
        if p.constraint is not None:  # last: the penalties never revive a masked token
            grammar = GrammarProcessor(self.grammars.vocab, p.constraint, p.max_tokens)
            processors.append(grammar)
        sampler = make_sampler(p)
        seq = _Sequence(
            spec=spec,
            detok=IncrementalDetokenizer(self.loaded.tokenizer,
                                         skip_special_tokens=p.skip_special_tokens),
            stops=StopStringFilter(p.stop),
            checkpoints={c.tokens: c.tier for c in spec.checkpoints
                         if spec.cached_tokens < c.tokens < n_prompt and c.tokens % bs == 0},
            published_blocks=spec.cached_tokens // bs,
            # Greedy is one shared function, so mlx-lm batches it; it can't fail.
            sampler=sampler if sampler is greedy else guard.sampler(sampler),
            processors=[guard.processor(f) for f in processors],
            stop_ids=frozenset(stop_ids),
            guard=guard,
            grammar=grammar,
            position=getattr(sampler, "position", None),
        )
        self._start(seq)

    def _resume(self, spec: SequenceSpec) -> None:
        """A preempted sequence comes back, with the cached blocks of its prompt and
        generated tokens that the prefix cache still has."""
        seq = self._parked.pop(spec.seq_id, None)
        if seq is None:
            raise ValueError("no preempted sequence to resume")
        if list(spec.prompt) != list(seq.spec.prompt) + seq.tokens:
            raise ValueError("a resumed sequence must continue from its own tokens")
        seq.spec = replace(seq.spec, cached_tokens=spec.cached_tokens,
                           cached_payloads=spec.cached_payloads)
        seq.checkpoints = {t: tier for t, tier in seq.checkpoints.items()
                           if t > spec.cached_tokens}
        seq.published_blocks = max(seq.published_blocks, spec.cached_tokens // self.block_size)
        self._start(seq)

    def _preempt(self, uid: int) -> None:
        """Park a sequence: its K/V leaves the batch, its full blocks go to the prefix
        cache, and its state waits for ``_resume``."""
        seq = self._seqs[uid]
        cache, tokens = self._bg.remove([uid], return_prompt_caches=True)[uid]
        del self._seqs[uid]
        self._uids.pop(seq.spec.seq_id, None)
        self._fresh.discard(uid)
        tokens = list(tokens)
        end = len(tokens) // self.block_size
        first = min(seq.published_blocks, end)
        payloads = blocks_from_cache(cache, first, end, self.block_size, self.loaded.layout,
                                     len(tokens) % self.block_size == 0)
        seq.published_blocks = max(seq.published_blocks, end)
        self._parked[seq.spec.seq_id] = seq
        del cache
        self._note_memory(0, force=True)  # the scheduler reads it on the event
        self._send(PreemptedEvent(seq.spec.seq_id, tokens[: end * self.block_size], first,
                                  payloads, list(seq.spec.prompt) + seq.tokens))

    def _start(self, seq: _Sequence) -> None:
        """Put a sequence into the batch: its cached blocks, then the rest of its prompt
        and the tokens it already generated (when a failed batch is rebuilt, or a
        preempted sequence resumes), cut at the checkpoints still to publish."""
        spec = seq.spec
        tokens = list(spec.prompt) + seq.tokens
        if seq.position is not None:
            seq.position[0] = len(seq.tokens)  # it samples the next of its own tokens
        cache = cache_from_blocks(spec.cached_payloads, make_prompt_cache(self.loaded.model),
                                  self.loaded.layout)
        cuts = [spec.cached_tokens, *sorted(seq.checkpoints), len(tokens)]
        segments = [tokens[a:b] for a, b in zip(cuts, cuts[1:])]
        (uid,) = self._bg.insert_segments(
            [segments],
            max_tokens=[spec.sampling.max_tokens - len(seq.tokens)],
            caches=[cache],
            all_tokens=[tokens[: spec.cached_tokens]],
            samplers=[seq.sampler],
            logits_processors=[seq.processors],
            stop_sequences=[StopSequences([[t] for t in sorted(seq.stop_ids)] or None)],
        )
        self._uids[spec.seq_id] = uid
        self._seqs[uid] = seq
        self._fresh.add(uid)

    def _drop(self, uid: int) -> _Sequence:
        """Take a sequence out of the batch and out of every index (an abort, a failure)."""
        seq = self._seqs.pop(uid)
        self._uids.pop(seq.spec.seq_id, None)
        self._fresh.discard(uid)
        try:
            self._bg.remove([uid])
        except Exception:  # a broken batch: the next failed step rebuilds it
            log.exception("could not remove sequence %s from the batch", seq.spec.seq_id)
        return seq

    def _fail(self, uid: int, message: str) -> None:
        """End one sequence with its own error; the rest of the batch goes on."""
        self._send(ErrorEvent(self._drop(uid).spec.seq_id, message))

    def _recover(self, error: Exception, stream) -> None:
        """A step raised: fail the sequences that may have caused it, with its error, and
        rebuild the batch for the others (they resume where they were)."""
        suspects = {uid for uid, seq in self._seqs.items()
                    if uid in self._fresh or (not seq.tokens and not seq.generated)}
        if not suspects:  # nobody new: nothing tells the culprit apart
            suspects = set(self._seqs)
        own = f"generation failed: {error}"
        # Several suspects: the error may be another's, so it isn't shown to them.
        message = own if len(suspects) == 1 else (
            "generation failed in a batch step together with other new requests; retry")
        survivors = [seq for uid, seq in self._seqs.items() if uid not in suspects]
        for uid in suspects:
            seq = self._seqs[uid]
            self._send(ErrorEvent(seq.spec.seq_id, message))
        self._seqs.clear()
        self._uids.clear()
        self._fresh.clear()
        try:
            self._bg.close()
        except Exception:
            log.exception("closing the failed batch")
        self._bg = self._new_batch_generator(stream)
        for seq in survivors:
            try:
                self._start(seq)
            except Exception as e:
                log.exception("could not resume a sequence after a failed step")
                self._send(ErrorEvent(seq.spec.seq_id, f"generation failed: {e}"))
        if survivors:
            log.info("batch rebuilt: %d sequences resumed, %d failed", len(survivors),
                     len(suspects))

    def _step(self) -> None:
        times = self.step_times
        t0 = time.perf_counter()
        prompt_responses, gen_responses = self._bg.next()
        t1 = time.perf_counter()
        if self.runner != "ragged":  # BatchGenerator: its step is one phase
            times.steps += 1
            times.seconds["forward"] += t1 - t0
        sent = times.seconds["events"]
        self._pending = []
        try:
            self._handle_responses(prompt_responses, gen_responses)
        finally:
            pending, self._pending = self._pending, None
            if pending:  # one delivery per step, even when a sequence failed in it
                self._deliver(pending if len(pending) > 1 else pending[0])
            times.seconds["engine"] += (time.perf_counter() - t1
                                        - (times.seconds["events"] - sent))

    def _handle_responses(self, prompt_responses, gen_responses) -> None:
        self._fresh.clear()  # the step went through: the new sequences are in
        for r in prompt_responses:
            seq = self._seqs.get(r.uid)
            if seq is None or not r.end_of_segment or r.end_of_prompt:
                continue
            done = seq.spec.cached_tokens + r.progress[0]
            tier = seq.checkpoints.pop(done, None)
            if tier is not None:
                cache, tokens = self._bg.extract_cache([r.uid])[r.uid]
                self._publish(seq, cache, list(tokens), tier, snapshot=True)
        finished_by_string: list[int] = []
        ended = {}  # the runner's finish caches: it has already let these sequences go
        for r in gen_responses:  # a speculating sequence may have several in a row
            if r.finish_reason is not None:
                ended[r.uid] = (r.prompt_cache, r.all_tokens)
            seq = self._seqs.get(r.uid)
            if seq is None or r.uid in finished_by_string:
                continue
            if seq.guard.error is not None:  # its sampler or a processor raised
                self._fail(r.uid, f"generation failed: {seq.guard.error}")
                continue
            try:
                if self._token(seq, r):
                    finished_by_string.append(r.uid)
            except Exception as e:  # this sequence's text or finish: it fails alone
                log.exception("sequence %s failed", seq.spec.seq_id)
                self._fail(r.uid, f"generation failed: {e}")
        if finished_by_string:
            # A stop string may end a sequence on a token the runner also finished (its
            # last allowed one, or before a stop token later in the same step).
            caches = self._bg.remove([u for u in finished_by_string if u not in ended],
                                     return_prompt_caches=True)
            caches.update((u, ended[u]) for u in finished_by_string if u in ended)
            for uid in finished_by_string:
                cache, tokens = caches[uid]
                self._finish(self._seqs[uid], uid, cache, tokens, "stop")

    def _token(self, seq: _Sequence, r) -> bool:
        """Report one generated token; True if a stop string ended the sequence."""
        seq.generated += 1
        if r.finish_reason == "stop":  # a stop token: its text is not part of the reply
            self._finish(seq, r.uid, r.prompt_cache, r.all_tokens, "stop")
            return False
        seq.tokens.append(r.token)
        text = seq.stops.push(seq.detok.add(r.token))
        event = TokenEvent(seq.spec.seq_id, r.token, text)
        p = seq.spec.sampling
        if p.logprobs:
            event.logprob, event.top_logprobs = token_logprobs(r.logprobs, r.token,
                                                               p.top_logprobs)
        self._send(event)
        if seq.stops.stopped:
            return True
        if r.finish_reason == "length":
            self._finish(seq, r.uid, r.prompt_cache, r.all_tokens, "length")
        return False

    def _finish(self, seq: _Sequence, uid: int, cache, tokens, reason: str) -> None:
        """Publish the sequence's remaining full blocks, then report the finish with
        the text still held back (an incomplete character, a possible stop string)."""
        tail = seq.stops.push(seq.detok.flush()) + seq.stops.flush()
        if seq.grammar is not None and seq.grammar.closed:
            reason = "length"  # completed early because the budget ran out
        # State layers describe all the tokens, so a snapshot fits only an aligned end.
        aligned = len(tokens) % self.block_size == 0
        self._publish(seq, cache, list(tokens), TIER_GENERATED, snapshot=aligned)
        del self._seqs[uid]
        self._uids.pop(seq.spec.seq_id, None)
        self._fresh.discard(uid)
        self._send(FinishEvent(seq.spec.seq_id, reason, seq.generated, tail,
                               seq.stops.matched))

    def _publish(self, seq: _Sequence, cache, tokens: list[int], tier: int,
                 snapshot: bool) -> None:
        end = len(tokens) // self.block_size
        if end <= seq.published_blocks:
            return
        payloads = blocks_from_cache(cache, seq.published_blocks, end, self.block_size,
                                     self.loaded.layout, snapshot)
        self._send(BlocksEvent(seq.spec.seq_id, tokens[: end * self.block_size],
                               seq.published_blocks, payloads, tier))
        seq.published_blocks = end
