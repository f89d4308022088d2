"""Engine pieces on their own: text streaming, stop strings, sampling, chat checkpoints,
and blocks that own their memory."""

import gc

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import load

from blockserve.engine.text.chat import render_chat
from blockserve.engine.models.demo import demo_spec, ensure_demo_model, parse_demo_id
from blockserve.engine.runtime.kvblocks import CacheLayout, blocks_from_cache, cache_from_blocks
from blockserve.engine.models.loader import resolve
from blockserve.engine.runtime.sampling import greedy, make_sampler
from blockserve.engine.text.streaming import IncrementalDetokenizer, StopStringFilter
from blockserve.kvpool import TIER_CONVERSATION, TIER_SYSTEM
from blockserve.scheduler import SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    return load(resolve("demo:tiny")[1])[1]


def test_detokenizer_streams_multibyte_utf8_exactly(tokenizer):
    # Characters the demo tokenizer never saw in training are split into bytes.
    text = "Hello café, 漢字 and 🚀🦀 emoji: ψß привет Ωμέγα!"
    ids = tokenizer.encode(text)
    # Byte-level BPE splits some characters across tokens: the stream must hold them.
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the test needs a split character"
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids) == text


def test_detokenizer_flushes_an_incomplete_tail(tokenizer):
    ids = tokenizer.encode("🚀")
    detok = IncrementalDetokenizer(tokenizer)
    out = "".join(detok.add(i) for i in ids[:-1])
    assert out == ""
    assert detok.flush() == tokenizer.decode(ids[:-1])


@pytest.mark.parametrize("chunks, stops, expect", [
    (["Hello wor", "ld STO", "P more"], ["STOP"], "Hello world "),
    (["a", "b", "c", "d"], ["bc"], "a"),
    (["xS", "T", "x"], ["STOP"], "xSTx"),  # a near-miss is released
    (["abc"], [], "abc"),
    (["one</", "tool>", "two"], ["</tool>", "<x"], "one"),
])
def test_stop_strings_spanning_chunks(chunks, stops, expect):
    f = StopStringFilter(stops)
    out = "".join(f.push(c) for c in chunks) + f.flush()
    assert out == expect
    assert f.stopped == any(s in "".join(chunks) for s in stops)


def test_stop_filter_never_emits_a_possible_stop_prefix():
    f = StopStringFilter(["<|end|>"])
    assert f.push("text <|en") == "text "
    assert f.push("d") == ""
    assert f.push("|> tail") == "" and f.stopped and f.matched == "<|end|>"


def _logits(seed=0, vocab=50):
    mx.random.seed(seed)
    x = mx.random.normal((1, vocab)) * 3
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def test_samplers_greedy_seeded_and_filtered():
    lp = _logits()
    assert make_sampler(SamplingParams(temperature=0)) is greedy
    a = make_sampler(SamplingParams(temperature=1.0, seed=7))
    b = make_sampler(SamplingParams(temperature=1.0, seed=7))
    c = make_sampler(SamplingParams(temperature=1.0, seed=8))
    seq_a = [a(lp).item() for _ in range(20)]
    assert seq_a == [b(lp).item() for _ in range(20)]
    assert seq_a != [c(lp).item() for _ in range(20)]
    assert len(set(seq_a)) > 1  # really sampling
    top1 = make_sampler(SamplingParams(temperature=1.0, top_k=1, seed=1))
    assert {top1(lp).item() for _ in range(10)} == {greedy(lp).item()}
    tight = make_sampler(SamplingParams(temperature=1.0, top_p=0.01, seed=1))
    assert {tight(lp).item() for _ in range(10)} == {greedy(lp).item()}
    minp = make_sampler(SamplingParams(temperature=1.0, min_p=0.99, seed=1))
    assert {minp(lp).item() for _ in range(10)} == {greedy(lp).item()}


def test_chat_checkpoints_mark_system_and_last_turn(tokenizer):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "List files"}]
    r = render_chat(tokenizer, msgs)
    (sys_end, t1), (turn_end, t2) = r.checkpoints
    assert (t1, t2) == (TIER_SYSTEM, TIER_CONVERSATION)
    text = tokenizer.decode(r.tokens)
    assert tokenizer.decode(r.tokens[:sys_end]).endswith("You are terse.<|im_end|>\n")
    assert tokenizer.decode(r.tokens[:turn_end]).endswith("List files<|im_end|>\n")
    assert text[len(tokenizer.decode(r.tokens[:turn_end])):] == "<|im_start|>assistant\n"
    # An assistant-final conversation has no conversation checkpoint.
    r2 = render_chat(tokenizer, msgs[:3])
    assert [t for _, t in r2.checkpoints] == [TIER_SYSTEM]


def test_blocks_own_their_memory():
    layers, heads, dim, tokens = 2, 2, 8, 4096
    cache = []
    for _ in range(layers):
        c = KVCache()
        c.state = (mx.random.normal((1, heads, tokens, dim)),
                   mx.random.normal((1, heads, tokens, dim)), tokens)
        cache.append(c)
    mx.eval([c.keys for c in cache] + [c.values for c in cache])
    layout = CacheLayout.of(cache)
    blocks = blocks_from_cache(cache, 0, 2, 16, layout)
    assert all(b.nbytes == 2 * layers * heads * 16 * dim * 4 for b in blocks)
    rebuilt = cache_from_blocks(blocks, [KVCache() for _ in range(layers)], layout)
    assert mx.array_equal(rebuilt[1].keys, cache[1].keys[:, :, :32])
    assert mx.array_equal(rebuilt[0].values, cache[0].values[:, :, :32])
    del rebuilt, c
    gc.collect()
    before = mx.get_active_memory()
    del cache
    gc.collect()
    freed = before - mx.get_active_memory()
    # The big buffers are gone: the blocks kept copies, not views.
    assert freed >= 2 * layers * heads * tokens * dim * 4 * 0.99


def test_demo_ids_and_cached_builds(tmp_path):
    assert parse_demo_id("demo:bench-llama@3") == demo_spec("bench", "llama", 3)
    assert parse_demo_id("mlx-community/Qwen3-0.6B-4bit") is None
    with pytest.raises(ValueError, match="unknown demo size"):
        parse_demo_id("demo:huge")
    spec = demo_spec("tiny", "llama", seed=5)
    p1 = ensure_demo_model(spec, tmp_path)
    mtime = (p1 / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(spec, tmp_path) == p1  # cached: not rebuilt
    assert (p1 / "model.safetensors").stat().st_mtime_ns == mtime


def test_openblas_is_preloaded_when_present():
    from blockserve.engine.runtime.blas import active_blas, find_openblas

    if find_openblas() is None:
        pytest.skip("no OpenBLAS on this machine")
    assert active_blas.startswith("OpenBLAS")
