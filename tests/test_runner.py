"""The ragged runner: mixed steps (decodes riding along with prefill chunks) are exact,
bounded by the token budget, publish checkpoints, and drive processors as mlx-lm does."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator, generation_stream
from mlx_lm.models.cache import make_prompt_cache

from blockserve.engine.runtime import ragged
from blockserve.engine.models.loader import load_weights
from blockserve.engine.runtime.runner import MIN_CHUNK, RaggedRunner
from blockserve.engine.runtime.sampling import greedy, logits_processors
from blockserve.scheduler import SamplingParams
from tests.engine_harness import reference_tokens

MODELS = ["demo:tiny", "demo:tiny-llama"]
N = 10


@pytest.fixture(autouse=True)
def _stream():
    """MLX work on mlx-lm's generation stream, as mlx-lm's own generation runs: work on
    this thread's default stream can hang a later test's engine thread at its exit."""
    with mx.stream(generation_stream):
        yield


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return load_weights(request.param).model


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 131 + i * 17) % 900 + 3 for i in range(n)]


def drain(runner, steps: list | None = None) -> tuple[dict[int, list[int]], list]:
    """Run to the end: the tokens per uid, and the prompt responses in order."""
    out: dict[int, list[int]] = {}
    prompts = []
    while True:
        if steps is not None and isinstance(runner, RaggedRunner):
            plan = runner.plan()
            steps.append((len(plan.decodes), sum(n for _, n in plan.chunks)))
        p, g = runner.next()
        if not p and not g:
            return out, prompts
        prompts += p
        for r in g:
            out.setdefault(r.uid, []).append(r.token)


def test_a_long_prompt_prefills_while_others_decode_exactly(model):
    budget, step = 32, 64
    runner = RaggedRunner(model, token_budget=budget, prefill_step_size=step)
    short = [_prompt(1, 20), _prompt(2, 9), _prompt(3, 33)]
    long = _prompt(4, 300)
    uids = runner.insert_segments([[p] for p in short], max_tokens=[3 * N] * 3)
    steps: list[tuple[int, int]] = []
    p, g = runner.next()  # the short prompts start (and some decode) first
    (long_uid,) = runner.insert_segments([[long]], max_tokens=[N])
    out, _ = drain(runner, steps)
    for r in g:
        out[r.uid] = [r.token] + out.get(r.uid, [])
    for uid, prompt in zip(uids, short):
        assert out[uid] == reference_tokens(model, prompt, 3 * N)
    assert out[long_uid] == reference_tokens(model, long, N)
    mixed = [s for s in steps if s[0] and s[1]]
    assert len(mixed) >= (300 - budget) // budget  # the long prompt rode with decodes
    assert all(d + max(c - MIN_CHUNK, 0) <= budget for d, c in steps if d)
    assert all(c <= step for d, c in steps if not d)  # nobody waits: a longer step


def test_chunks_stop_at_checkpoints_and_the_cache_holds_the_prefix(model):
    runner = RaggedRunner(model, token_budget=40, prefill_step_size=40)
    prompt = _prompt(5, 100)
    (uid,) = runner.insert_segments([[prompt[:48], prompt[48:64], prompt[64:]]],
                                    max_tokens=[N])
    seen = []
    while True:
        p, g = runner.next()
        for r in p:
            if r.end_of_segment and not r.end_of_prompt:
                cache, tokens = runner.extract_cache([uid])[uid]
                assert cache[0].offset == len(tokens) == r.progress[0]
                assert tokens == prompt[: r.progress[0]]
                seen.append(r.progress[0])
        if any(r.finish_reason for r in g):
            break
    assert seen == [48, 64]


def test_a_prefix_cache_resumes_exactly(model):
    """A sequence inserted with a filled cache (a hit) gives the cold tokens."""
    prompt = _prompt(6, 70)
    cache = make_prompt_cache(model)
    model(mx.array([prompt[:48]]), cache=cache)
    mx.eval([c.state for c in cache])
    runner = RaggedRunner(model, token_budget=16, prefill_step_size=16)
    (uid,) = runner.insert_segments([[prompt[48:]]], max_tokens=[N], caches=[cache],
                                    all_tokens=[prompt[:48]])
    out, _ = drain(runner)
    assert out[uid] == reference_tokens(model, prompt, N)


def test_processors_see_what_batch_generator_shows_them(model):
    """Penalties depend on the whole context: same tokens as mlx-lm's BatchGenerator."""
    params = SamplingParams(repetition_penalty=1.6, presence_penalty=0.8,
                            logit_bias=((11, 3.0),))
    prompts = [_prompt(7, 25), _prompt(8, 60)]
    results = []
    for runner in (RaggedRunner(model, token_budget=24, prefill_step_size=24),
                   BatchGenerator(model, prefill_step_size=24)):
        uids = runner.insert_segments(
            [[p] for p in prompts], max_tokens=[2 * N] * 2, samplers=[greedy] * 2,
            logits_processors=[logits_processors(params) for _ in prompts])
        out, _ = drain(runner)
        results.append([out[u] for u in uids])
    assert results[0] == results[1]
    free = [reference_tokens(model, p, 2 * N) for p in prompts]
    assert results[0] != free  # the penalties changed something: the test can fail


def test_families_the_runner_covers():
    covered = load_weights("demo:tiny").model
    hybrid = load_weights("demo:tiny-qwen3_next").model
    assert ragged.supports(covered, make_prompt_cache(covered))
    assert not ragged.supports(hybrid, make_prompt_cache(hybrid))


@pytest.mark.parametrize("family,extra", [
    ("qwen2", {"tie_word_embeddings": False}),  # biased q/k/v projections
    ("gemma", {"head_dim": 16}),  # scaled embeddings, 1 + weight norms, GELU MLP
    ("llama", {"model_type": "mistral", "tie_word_embeddings": False}),
])
def test_other_families_match_the_model_s_own_forward(family, extra):
    """Families with no demo model: random tiny ones, the ragged forward in two chunks
    against the model's own forward of the whole prompt."""
    import importlib

    mod = importlib.import_module(f"mlx_lm.models.{family}")
    args = {"model_type": family, "hidden_size": 64, "num_hidden_layers": 2,
            "intermediate_size": 128, "num_attention_heads": 4, "rms_norm_eps": 1e-6,
            "vocab_size": 300, "num_key_value_heads": 2, **extra}
    net = mod.Model(mod.ModelArgs(**args))
    mx.eval(net.parameters())
    tokens = [(i * 37) % 300 for i in range(40)]
    ref = net(mx.array([tokens]), cache=make_prompt_cache(net))[0, -1]
    cache = make_prompt_cache(net)
    assert ragged.supports(net, cache)
    ragged.forward(net, tokens[:30], None, [ragged.Span(0, 30, cache)], [])
    got = ragged.forward(net, tokens[30:], None, [ragged.Span(0, 10, cache)], [9])[0]
    assert mx.abs(ref - got).max().item() < 1e-4
