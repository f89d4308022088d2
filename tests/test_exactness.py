"""Exactness: with greedy sampling, a request served from cached blocks produces the
tokens of the same request computed cold, and of mlx-lm's own generation."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from blockserve.engine.text.chat import render_chat
from blockserve.engine.runtime.kvblocks import KVBlock
from blockserve.engine.models.loader import DEFAULT_MODEL, GGUF_4BIT_ENV, load_weights
from blockserve.engine.runtime.worker import EngineWorker
from tests.engine_harness import assert_idle, make_scheduler, reference_tokens, run, run_many

N = 12  # generated tokens per request
BS = 16


ARCHS = ["qwen3", "llama", "qwen3_next", "gemma3_text"]  # attention, hybrid SSM, sliding


# The GPU's path, proven on the CPU: a tiny GGUF (the llama demo model, written and
# converted as tests/test_gguf.py does) with its weights quantized to 4 bits, as
# ``load_model`` does on Apple silicon, forced here with BLOCKSERVE_GGUF_4BIT=1.
GGUF_4BIT = "gguf-4bit:tiny-llama"


def tiny_gguf_dir(tmp_path_factory) -> str:
    """The llama demo model as a quantized GGUF file, converted: a GGUF-sourced model
    directory, the kind whose weights the device decides."""
    from blockserve.engine.models.demo import demo_spec, ensure_demo_model
    from blockserve.engine.models.gguf import convert_gguf
    from tests.test_gguf import write_gguf

    tmp = tmp_path_factory.mktemp("gguf4")
    write_gguf(ensure_demo_model(demo_spec("tiny", "llama")), tmp / "model.gguf")
    convert_gguf(tmp / "model.gguf", tmp / "converted")
    return str(tmp / "converted")


# ... the real, trained default model (SmolLM2-135M-Instruct, from its GGUF), and a
# GGUF with the 4-bit weights a GPU gets.
MODELS = [f"demo:tiny-{a}" for a in ARCHS] + [DEFAULT_MODEL, GGUF_4BIT]


def _quantized(model) -> bool:
    return any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def _worker_and_reference(name, tmp_path_factory=None):
    """An engine worker on ``name``, and the same model loaded for mlx-lm's own
    generation on this thread by the function the engine loads with (``load_weights``),
    so on any device both hold the same weights."""
    with pytest.MonkeyPatch.context() as mp:
        if name == GGUF_4BIT:
            name = tiny_gguf_dir(tmp_path_factory)
            mp.setenv(GGUF_4BIT_ENV, "1")
        worker = EngineWorker(name, block_size=BS, max_running=8)
        ref_model = load_weights(name).model
    # Like with like: the reference's weights are quantized exactly when the engine's are.
    assert _quantized(ref_model) == worker.run_sync(lambda m: _quantized(m.model)) \
        == ("-q4g64:" in worker.namespace.model)
    if name != DEFAULT_MODEL and not name.startswith("demo:"):
        assert _quantized(ref_model)  # the forced branch really ran
    yield worker, ref_model
    worker.close()


@pytest.fixture(scope="module", params=MODELS)
def engine_pair(request, tmp_path_factory):
    yield from _worker_and_reference(request.param, tmp_path_factory)


def chat(tokenizer, system, *turns):
    msgs = [{"role": "system", "content": system}]
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return render_chat(tokenizer, msgs)


SYSTEM = ("You are a careful coding agent. Use the tools, read the files, and return "
          "the value of each function call in the list. ") * 3


async def test_cold_full_partial_and_divergent(engine_pair):
    worker, ref_model = engine_pair
    tok = worker.tokenizer
    sched = make_scheduler(worker)
    a = chat(tok, SYSTEM, "What is in the cache block of the first file?")
    b = chat(tok, SYSTEM, "Print the list of tool results, then import the model.")
    ref_a = reference_tokens(ref_model, a.tokens, N)
    ref_b = reference_tokens(ref_model, b.tokens, N)
    assert len(set(ref_a)) > N // 2, "the demo model must give varied greedy output"

    cold, out = await run(sched, a.tokens, N, checkpoints=a.checkpoints)
    assert cold == ref_a and out.usage.cached_tokens == 0
    full, out = await run(sched, a.tokens, N, checkpoints=a.checkpoints)
    assert full == ref_a
    assert out.usage.cached_tokens == (len(a.tokens) - 1) // BS * BS
    partial, out = await run(sched, b.tokens, N, checkpoints=b.checkpoints)
    assert partial == ref_b
    system_end = a.checkpoints[0][0]
    assert out.usage.cached_tokens == system_end // BS * BS > 0
    # A divergent branch: same conversation up to a point inside the user turn.
    c_tokens = a.tokens[: len(a.tokens) - 9] + tok.encode(" and the second one?")
    ref_c = reference_tokens(ref_model, c_tokens, N)
    branch, out = await run(sched, c_tokens, N)
    assert branch == ref_c
    shared = (len(a.tokens) - 9) // BS * BS
    if worker.needs_snapshots:  # resumes from the last snapshot inside the shared part
        assert system_end // BS * BS <= out.usage.cached_tokens <= shared
    else:
        assert out.usage.cached_tokens == shared
    assert_idle(sched, worker)


async def test_four_turn_conversation_hits_every_turn(engine_pair):
    worker, ref_model = engine_pair
    tok = worker.tokenizer
    sched = make_scheduler(worker)
    turns = []
    previous_len = 0
    users = ["Open the file.", "Now print each value.", "Return the list.", "Done?"]
    for i, user in enumerate(users):
        turns.append(user)
        prompt = chat(tok, SYSTEM, *turns)
        tokens, out = await run(sched, prompt.tokens, N, checkpoints=prompt.checkpoints)
        assert tokens == reference_tokens(ref_model, prompt.tokens, N)
        if i > 0:
            # Everything up to the previous reply was cached; with state layers, up to
            # the previous prompt's last full block (its snapshot).
            floor = previous_len - 1 if worker.needs_snapshots else previous_len
            assert out.usage.cached_tokens >= floor // BS * BS > 0
        previous_len = len(prompt.tokens)
        turns.append(tok.decode(tokens))
    assert_idle(sched, worker)


async def test_eight_concurrent_mixed_requests(engine_pair):
    worker, ref_model = engine_pair
    tok = worker.tokenizer
    sched = make_scheduler(worker)
    warm = chat(tok, SYSTEM, "What is in the cache block of the first file?")
    await run(sched, warm.tokens, N, checkpoints=warm.checkpoints)
    prompts = [
        warm,  # full hit
        chat(tok, SYSTEM, "What is in the cache block of the second file?"),  # partial
        chat(tok, SYSTEM, "Write a function please"),  # partial
        chat(tok, "A different system prompt entirely.", "Hello"),  # cold
        chat(tok, SYSTEM, "What is in the cache block of the first file?", "It is empty.",
             "Then fill it."),  # multi-turn
        chat(tok, SYSTEM, "Write a function please"),  # shares in flight with #2
        chat(tok, "Short.", "x"),  # cold and short
        chat(tok, SYSTEM + " Extra rules apply.", "café 日本語 🙂"),  # divergent system
    ]
    results = await run_many(sched, [p.tokens for p in prompts], N)
    for p, (tokens, _) in zip(prompts, results):
        assert tokens == reference_tokens(ref_model, p.tokens, N)
    assert sum(r[1].usage.cached_tokens for r in results) > 0
    assert_idle(sched, worker)


async def test_a_corrupted_cached_block_changes_the_output(engine_pair):
    """The exactness tests can fail: serve a prompt from a shifted cached block."""
    worker, ref_model = engine_pair
    tok = worker.tokenizer
    sched = make_scheduler(worker)
    a = chat(tok, SYSTEM, "What is in the cache block of the first file?")
    n = 4 * N  # one wrong block among nine may take a while to flip a greedy choice
    ref = reference_tokens(ref_model, a.tokens, n)
    assert (await run(sched, a.tokens, n))[0] == ref
    # Serve the last cached block with block 0's K/V (other tokens, other positions),
    # keeping its snapshot. A swap would not do: attention is invariant to the order
    # of cached entries.
    hit = sched.pool.lookup(sched.namespace(None), a.tokens, pin=False)
    last, first = hit.blocks[-1], hit.blocks[0]
    last.payload = KVBlock(first.payload.kv, last.payload.snapshot)
    served, out = await run(sched, a.tokens, n)
    assert out.usage.cached_tokens > 0
    assert served != ref
    assert_idle(sched, worker)


@pytest.fixture(scope="module")
def sliding_pair():
    yield from _worker_and_reference("demo:tiny-gemma3_text")


async def test_sliding_window_hits_before_and_after_the_window_wraps(sliding_pair):
    worker, ref_model = sliding_pair
    window = ref_model.args.sliding_window
    tok = worker.tokenizer
    sched = make_scheduler(worker)
    short_system = "You are a careful coding agent. Use the tools and read the files."
    a = chat(tok, short_system, "Open the file and print each value of the list. " * 4)
    b = chat(tok, short_system, "Write a function that returns the cache block. " * 4)
    system_end = a.checkpoints[0][0] // BS * BS
    assert 0 < system_end < window < len(a.tokens)  # the hit comes before the wrap
    await run(sched, a.tokens, N, checkpoints=a.checkpoints)
    tokens, out = await run(sched, b.tokens, N, checkpoints=b.checkpoints)
    assert out.usage.cached_tokens == system_end
    assert tokens == reference_tokens(ref_model, b.tokens, N)
    # A full hit far past the window: the rotating caches have wrapped.
    tokens, out = await run(sched, a.tokens, N, checkpoints=a.checkpoints)
    assert out.usage.cached_tokens > window
    assert tokens == reference_tokens(ref_model, a.tokens, N)
    assert_idle(sched, worker)


@pytest.fixture(scope="module")
def hybrid_pair():
    yield from _worker_and_reference("demo:tiny-qwen3_next")


async def test_hybrid_hits_come_from_the_snapshot(hybrid_pair):
    """A corrupted state snapshot changes the output: hits really resume from it."""
    worker, ref_model = hybrid_pair
    tok = worker.tokenizer
    sched = make_scheduler(worker)
    a = chat(tok, SYSTEM, "What is in the cache block of the first file?")
    ref = reference_tokens(ref_model, a.tokens, N)
    assert (await run(sched, a.tokens, N, checkpoints=a.checkpoints))[0] == ref
    hit = sched.pool.lookup(sched.namespace(None), a.tokens, pin=False)
    last = hit.blocks[-1].payload
    assert last.has_snapshot and hit.num_tokens == (len(a.tokens) - 1) // BS * BS
    zeroed = [(cls, tuple([mx.zeros_like(x) for x in v] if isinstance(v, list) else v
                          for v in state)) for cls, state in last.snapshot]
    mx.eval([x for _, state in zeroed for v in state if isinstance(v, list) for x in v])
    hit.blocks[-1].payload = KVBlock(last.kv, zeroed)
    served, out = await run(sched, a.tokens, N)
    assert out.usage.cached_tokens == hit.num_tokens
    assert served != ref
    assert_idle(sched, worker)
