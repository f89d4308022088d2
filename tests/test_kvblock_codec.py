"""The engine's block codec for the disk tier: exact round trips (K/V in every dtype,
state snapshots), and bytes of another model or damaged bytes refused."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import ArraysCache, RotatingKVCache

from blockserve.engine.runtime.kvblocks import CacheLayout, KVBlock, KVBlockCodec

BS = 16


def kv(layers, dtype=mx.float32, seed=0):
    a = mx.random.normal((2, layers, 2, BS, 8), key=mx.random.key(seed)).astype(dtype)
    mx.eval(a)
    return a


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_kv_round_trips_exactly(dtype):
    codec = KVBlockCodec(CacheLayout((0, 1, 2), ()), BS)
    blk = KVBlock(kv(3, dtype))
    back = codec.decode(memoryview(codec.encode(blk)))
    assert back.nbytes == blk.nbytes and back.resumable
    back.materialize()  # numpy -> MLX, as the engine thread does on first use
    assert back.kv.dtype == dtype
    assert mx.array_equal(back.kv, blk.kv).item()


def test_snapshots_round_trip_with_their_classes_and_values():
    codec = KVBlockCodec(CacheLayout((0,), (1, 2)), BS)
    conv, ssm = kv(1, seed=1)[0, 0], kv(1, seed=2)[1, 0]
    keys, values = kv(1, seed=3)[0], kv(1, seed=4)[1]
    mx.eval(conv, ssm, keys, values)
    snap = [(ArraysCache, ([conv, ssm], None, None)),
            (RotatingKVCache, (keys, values, 40, 0, 48, 40))]
    blk = KVBlock(kv(1), snap, needs_snapshot=True)
    back = codec.decode(codec.encode(blk))
    assert back.resumable and back.nbytes == blk.nbytes
    back.materialize()
    (c1, s1), (c2, s2) = back.snapshot
    assert (c1, c2) == (ArraysCache, RotatingKVCache)
    assert mx.array_equal(s1[0][0], conv).item() and mx.array_equal(s1[0][1], ssm).item()
    assert s1[1] is None and s1[2] is None
    assert mx.array_equal(s2[0], keys).item() and s2[2:] == (40, 0, 48, 40)
    # A block of such a model without a snapshot stays non-resumable.
    plain = codec.decode(codec.encode(KVBlock(kv(1), needs_snapshot=True)))
    assert not plain.resumable


def test_a_block_of_another_model_is_refused():
    data = KVBlockCodec(CacheLayout((0, 1, 2), ()), BS).encode(KVBlock(kv(3)))
    for other in (KVBlockCodec(CacheLayout((0, 1), ()), BS),  # fewer layers
                  KVBlockCodec(CacheLayout((0, 1), (2,)), BS),  # a hybrid model
                  KVBlockCodec(CacheLayout((0, 1, 2), ()), 32)):  # another block size
        with pytest.raises(ValueError):
            other.decode(data)


@pytest.mark.parametrize("cut", [0, 3, 40, -1])
def test_damaged_bytes_are_refused(cut):
    codec = KVBlockCodec(CacheLayout((0, 1), ()), BS)
    data = codec.encode(KVBlock(kv(2)))
    with pytest.raises(ValueError):
        codec.decode(data[:cut] if cut >= 0 else data + b"\0")
    with pytest.raises(ValueError):
        codec.decode(b"\xff\xff\xff\x7f" + data[4:])  # a header length past the end
