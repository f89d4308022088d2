"""Exactness across restarts: with the disk tier, greedy output after a restart equals
mlx-lm's own generation, for cold, full, partial, multi-turn and concurrent requests, on
an attention model, a hybrid SSM model, a sliding-window model, the real default
model (SmolLM2-135M-Instruct) and a GGUF with 4-bit weights (a GPU's path, forced). A restart here is a
new pool, prefix cache and disk tier over the same directory (the engine keeps no
cache state between requests, so it is shared to save loading it again)."""

import os
import struct

import pytest
import xxhash

from blockserve.kvpool.disk import _CHECKSUM, _HEADER
from tests.engine_harness import assert_idle, make_scheduler, reference_tokens, run, run_many
from blockserve.engine.models.loader import DEFAULT_MODEL
from tests.test_exactness import BS, GGUF_4BIT, SYSTEM, _worker_and_reference, chat

N = 12


@pytest.fixture(scope="module", params=["demo:tiny-qwen3", "demo:tiny-qwen3_next",
                                        "demo:tiny-gemma3_text", DEFAULT_MODEL, GGUF_4BIT])
def engine_pair(request, tmp_path_factory):
    yield from _worker_and_reference(request.param, tmp_path_factory)


def restart(worker, path):
    """A fresh RAM cache over the disk directory, as after a process restart."""
    return make_scheduler(worker, disk_cache_dir=str(path), disk_cache_bytes=1 << 30)


async def test_exact_greedy_output_after_restarts(engine_pair, tmp_path):
    worker, ref_model = engine_pair
    tok = worker.tokenizer
    a = chat(tok, SYSTEM, "What is in the cache block of the first file?")
    b = chat(tok, SYSTEM, "Print the list of tool results, then import the model.")
    ref_a = reference_tokens(ref_model, a.tokens, N)
    ref_b = reference_tokens(ref_model, b.tokens, N)

    s1 = restart(worker, tmp_path)
    cold, out = await run(s1, a.tokens, N, checkpoints=a.checkpoints)
    assert cold == ref_a and out.usage.cached_tokens == 0
    s1.prefix.close(spill=True)

    s2 = restart(worker, tmp_path)
    assert s2.prefix.disk.stats().files > 0 and len(s2.pool) == 0
    full, out = await run(s2, a.tokens, N, checkpoints=a.checkpoints)
    assert full == ref_a
    assert out.usage.cached_tokens == (len(a.tokens) - 1) // BS * BS
    assert s2.prefix.disk.stats().hit_tokens == out.usage.cached_tokens
    partial, out = await run(s2, b.tokens, N, checkpoints=b.checkpoints)
    assert partial == ref_b
    assert out.usage.cached_tokens == a.checkpoints[0][0] // BS * BS > 0
    turn2 = chat(tok, SYSTEM, "What is in the cache block of the first file?",
                 tok.decode(full), "Then fill it.")
    ref_t2 = reference_tokens(ref_model, turn2.tokens, N)
    assert_idle(s2, worker)
    s2.prefix.close(spill=True)

    s3 = restart(worker, tmp_path)
    cold_c = chat(tok, "A different system prompt entirely.", "Hello")
    prompts = [a, b, turn2, cold_c]
    results = await run_many(s3, [p.tokens for p in prompts], N)
    refs = [ref_a, ref_b, ref_t2, reference_tokens(ref_model, cold_c.tokens, N)]
    for (tokens, _), ref in zip(results, refs):
        assert tokens == ref
    cached = [r[1].usage.cached_tokens for r in results]
    assert cached[0] > 0 and cached[1] > 0 and cached[2] > 0 and cached[3] == 0
    assert_idle(s3, worker)
    assert s3.prefix.disk.stats().damaged_files == 0
    s3.prefix.close(spill=False)


async def test_a_doctored_disk_block_changes_the_output(engine_pair, tmp_path):
    """The restart tests can fail: a block file whose K/V is another block's (with a
    valid checksum, so it verifies) is served, and the output changes."""
    worker, ref_model = engine_pair
    tok = worker.tokenizer
    a = chat(tok, SYSTEM, "What is in the cache block of the first file?")
    n = 4 * N
    ref = reference_tokens(ref_model, a.tokens, n)
    s1 = restart(worker, tmp_path)
    assert (await run(s1, a.tokens, n, checkpoints=a.checkpoints))[0] == ref
    chain = s1.prefix.prompt(s1.namespace(None), a.tokens)
    s1.prefix.close(spill=True)
    folder = os.path.join(str(tmp_path), s1.namespace(None).root_key().hex())
    by_key = {f[:32]: os.path.join(folder, f) for f in os.listdir(folder)
              if f.endswith(".kv")}
    codec = worker.block_codec()

    def read(key):
        data = open(by_key[key.hex()], "rb").read()
        n_tok, plen = _HEADER.unpack_from(data)[4], _HEADER.unpack_from(data)[8]
        start = _HEADER.size + 4 * n_tok
        return data, start, codec.decode(data[start : start + plen])

    # The last block of the hit gets block 0's K/V, keeping its own snapshot.
    data, start, last = read(chain.keys[-1])
    last.kv = read(chain.keys[0])[2].kv
    body = codec.encode(last)
    header = bytearray(data[:_HEADER.size])
    header[-8:] = struct.pack("<Q", len(body))
    new = bytes(header) + data[_HEADER.size : start] + body
    with open(by_key[chain.keys[-1].hex()], "wb") as f:
        f.write(new + xxhash.xxh3_128_digest(new))
    assert new != data[:-_CHECKSUM], "the doctored block holds its own K/V still"
    s2 = restart(worker, tmp_path)
    served, out = await run(s2, a.tokens, n)
    assert out.usage.cached_tokens == len(chain.keys) * BS
    assert s2.prefix.disk.stats().damaged_files == 0  # it verified: a valid file
    assert served != ref
    assert_idle(s2, worker)
    s2.prefix.close(spill=False)
