"""Unit tests for kvpool: keys, lookup, pins, insert, tiers, eviction, budget, stats."""

from dataclasses import dataclass

import pytest

import blockserve.kvpool.hashing
from blockserve.kvpool import (
    TIER_CONVERSATION,
    TIER_GENERATED,
    TIER_SYSTEM,
    BlockPool,
    Namespace,
    chain_keys,
)

BS = 4
NS = Namespace("model-a")


@dataclass
class FakePayload:
    """Stands in for a block's KV arrays; remembers which tokens it was made for."""

    tokens: tuple
    nbytes: int = 100


def payloads_for(tokens, nbytes=100):
    return lambda i: FakePayload(tuple(tokens[i * BS : (i + 1) * BS]), nbytes)


def fill(pool, tokens, ns=NS, tier=TIER_GENERATED, nbytes=100):
    return pool.insert(ns, tokens, payloads_for(tokens, nbytes), tier)


def test_keys_chain_over_parent_and_namespace():
    toks = list(range(12))
    keys = chain_keys(NS, toks, BS)
    assert len(keys) == 3 and len(set(keys)) == 3
    # A key depends on everything before it: change token 0, every key changes.
    other = chain_keys(NS, [99] + toks[1:], BS)
    assert all(a != b for a, b in zip(keys, other))
    # Same block tokens at a different position give a different key.
    assert chain_keys(NS, toks[4:8], BS)[0] != keys[1]
    assert chain_keys(Namespace("model-a", "salt"), toks, BS)[0] != keys[0]
    assert chain_keys(Namespace("model-b"), toks, BS)[0] != keys[0]
    # Extras (e.g. image hashes) are part of the key.
    assert chain_keys(NS, toks, BS, extra=b"x") != keys
    # The partial tail is never keyed.
    assert chain_keys(NS, toks + [1, 2], BS) == keys


def test_lookup_pins_and_payloads_follow_the_chain():
    pool = BlockPool(BS, 10_000)
    toks = list(range(13))
    res = fill(pool, toks)
    assert len(res.new_keys) == 3 and res.deduplicated == 0
    hit = pool.lookup(NS, toks)
    assert hit.num_tokens == 12
    assert [p.tokens for p in hit.payloads] == [tuple(toks[i : i + 4]) for i in (0, 4, 8)]
    assert all(b.refcount == 1 for b in hit.blocks)
    assert pool.stats().blocks_pinned == 3
    pool.release(hit.blocks)
    assert pool.stats().blocks_pinned == 0
    with pytest.raises(ValueError):
        pool.release(hit.blocks)


def test_full_hit_still_leaves_a_token_to_compute():
    pool = BlockPool(BS, 10_000)
    toks = list(range(12))
    fill(pool, toks)
    hit = pool.lookup(NS, toks, pin=False)
    assert hit.num_tokens == 8  # not 12: the last token must be computed
    assert pool.lookup(NS, toks + [5], pin=False).num_tokens == 12
    assert pool.lookup(NS, toks[:1], pin=False).num_tokens == 0
    assert pool.lookup(NS, [], pin=False).num_tokens == 0


def test_divergent_branch_shares_only_the_common_blocks():
    pool = BlockPool(BS, 10_000)
    a = list(range(16))
    b = a[:8] + [100 + t for t in range(8)]
    fill(pool, a)
    res = fill(pool, b)
    assert res.deduplicated == 2 and len(res.new_keys) == 2
    assert len(pool) == 6
    hit = pool.lookup(NS, b + [0], pin=False)
    assert [p.tokens for p in hit.payloads] == [tuple(b[i : i + 4]) for i in range(0, 16, 4)]
    # A third branch diverging inside block 2 hits the first two blocks only.
    c = a[:9] + [7] * 8
    assert pool.lookup(NS, c, pin=False).num_tokens == 8


def test_other_salt_or_model_never_hits():
    pool = BlockPool(BS, 10_000)
    toks = list(range(12))
    fill(pool, toks, ns=Namespace("m", "tenant-1"))
    assert pool.lookup(Namespace("m", "tenant-1"), toks + [0], pin=False).num_tokens == 12
    assert pool.lookup(Namespace("m", "tenant-2"), toks + [0], pin=False).num_tokens == 0
    assert pool.lookup(Namespace("m"), toks + [0], pin=False).num_tokens == 0
    assert pool.lookup(Namespace("m2", "tenant-1"), toks + [0], pin=False).num_tokens == 0


def test_forced_collision_never_returns_a_wrong_block(monkeypatch):
    monkeypatch.setattr(blockserve.kvpool.hashing, "digest", lambda data: b"\0" * 16)
    pool = BlockPool(BS, 10_000)
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    fill(pool, a)
    assert len(pool) == 1  # every key collides: only one block can live
    # Same tokens in block 0 of another namespace: the namespace check refuses it.
    assert pool.lookup(Namespace("other"), a + [0], pin=False).num_tokens == 0
    # Different tokens, same (constant) key: the token check refuses it.
    assert pool.lookup(NS, [9, 9, 9, 9, 0], pin=False).num_tokens == 0
    # Block 1 of a chain whose tokens equal block 0's: the parent check refuses it.
    assert pool.lookup(NS, [1, 2, 3, 4, 1, 2, 3, 4, 0], pin=False).num_tokens == 4
    # Inserting colliding content keeps the resident block and stores nothing.
    res = fill(pool, [9, 9, 9, 9])
    assert res.new_keys == [] and res.refused == 1
    assert pool.lookup(NS, a + [0], pin=False).payloads[0].tokens == (1, 2, 3, 4)
    assert pool.stats().collisions >= 3


def test_insert_dedups_and_takes_the_highest_tier():
    pool = BlockPool(BS, 10_000)
    toks = list(range(8))
    fill(pool, toks, tier=TIER_SYSTEM)
    res = fill(pool, toks + [8, 9, 10, 11], tier=TIER_GENERATED)
    assert res.deduplicated == 2 and len(res.new_keys) == 1
    tiers = [b.tier for b in pool.lookup(NS, toks + [8, 9, 10, 11, 0], pin=False).blocks]
    assert tiers == [TIER_SYSTEM, TIER_SYSTEM, TIER_GENERATED]
    fill(pool, toks + [8, 9, 10, 11], tier=TIER_CONVERSATION)
    tiers = [b.tier for b in pool.lookup(NS, toks + [8, 9, 10, 11, 0], pin=False).blocks]
    assert tiers == [TIER_SYSTEM, TIER_SYSTEM, TIER_CONVERSATION]
    s = pool.stats()
    assert (s.inserted_blocks, s.deduplicated_blocks) == (3, 5)


def test_payload_callable_is_called_only_for_new_blocks():
    pool = BlockPool(BS, 10_000)
    toks = list(range(12))
    fill(pool, toks[:8])
    asked = []
    pool.insert(NS, toks, lambda i: asked.append(i) or FakePayload(()))
    assert asked == [2]


def test_eviction_order_is_tier_then_age():
    pool = BlockPool(BS, 300)  # room for three 100-byte blocks
    sys_chain = [1, 1, 1, 1]
    conv_chain = [2, 2, 2, 2]
    old_tail = [3, 3, 3, 3]
    fill(pool, sys_chain, tier=TIER_SYSTEM)
    fill(pool, conv_chain, tier=TIER_CONVERSATION)
    fill(pool, old_tail, tier=TIER_GENERATED)
    # A fourth block evicts the generated tail first, although it is the newest.
    fill(pool, [4, 4, 4, 4], tier=TIER_GENERATED)
    assert pool.lookup(NS, old_tail + [0], pin=False).num_tokens == 0
    # Among tier 0, the least recently used goes first.
    fill(pool, [5, 5, 5, 5], tier=TIER_GENERATED)
    assert pool.lookup(NS, [4, 4, 4, 4, 0], pin=False).num_tokens == 0
    # A stream of one-off tier-0 requests never flushes the checkpoints.
    for t in range(6, 40):
        fill(pool, [t] * 4, tier=TIER_GENERATED)
    assert pool.lookup(NS, sys_chain + [0], pin=False).num_tokens == 4
    assert pool.lookup(NS, conv_chain + [0], pin=False).num_tokens == 4
    # Within a tier, a recent lookup refreshes age.
    fill(pool, [50] * 4, tier=TIER_CONVERSATION)  # evicts the tier-0 block
    pool.lookup(NS, conv_chain + [0], pin=False)  # conv_chain is now newer than [50]
    fill(pool, [51] * 4, tier=TIER_CONVERSATION)
    assert pool.lookup(NS, conv_chain + [0], pin=False).num_tokens == 4
    assert pool.lookup(NS, [50] * 4 + [0], pin=False).num_tokens == 0
    s = pool.stats()
    assert s.evictions[TIER_GENERATED] == 2 + 34 + 1 and s.evictions[TIER_CONVERSATION] == 1
    assert s.evictions[TIER_SYSTEM] == 0


def test_parent_is_kept_while_its_children_are_cached():
    pool = BlockPool(BS, 300)
    chain = list(range(12))  # three blocks, root tier 0 and oldest
    fill(pool, chain, tier=TIER_GENERATED)
    fill(pool, [7] * 4, tier=TIER_SYSTEM)  # over budget: the leaf of the chain goes
    blocks = {b.tokens for b in pool.blocks()}
    assert (0, 1, 2, 3) in blocks and (4, 5, 6, 7) in blocks
    assert (8, 9, 10, 11) not in blocks
    for b in pool.blocks():
        if b.parent is not None:
            assert b.parent.key in pool


def test_pinned_blocks_are_never_evicted_and_insert_refuses_cleanly():
    pool = BlockPool(BS, 200)
    a = [1] * 4 + [2] * 4
    fill(pool, a)
    hit = pool.lookup(NS, a + [0])  # pins both
    res = fill(pool, [3] * 8)
    assert res.new_keys == [] and res.refused == 2
    assert len(pool) == 2 and pool.nbytes == 200
    pool.release(hit.blocks)
    res = fill(pool, [3] * 8)
    assert len(res.new_keys) == 2 and pool.nbytes == 200
    s = pool.stats()
    assert s.refused_blocks == 2 and s.blocks_pinned == 0


def test_an_oversized_payload_is_refused():
    pool = BlockPool(BS, 50)
    res = fill(pool, [1] * 4, nbytes=100)
    assert res.refused == 1 and len(pool) == 0


def test_set_budget_evicts_down_to_it():
    pool = BlockPool(BS, 1000)
    for t in range(10):
        fill(pool, [t] * 4)
    hit = pool.lookup(NS, [0] * 5)
    pool.set_budget(300)
    assert pool.nbytes == 300
    assert pool.lookup(NS, [0] * 5, pin=False).num_tokens == 4  # pinned, kept
    pool.set_budget(0)
    assert pool.nbytes == 100  # only the pinned block remains
    pool.release(hit.blocks)
    pool.set_budget(0)
    assert pool.nbytes == 0 and len(pool) == 0


def test_reset_is_refused_while_anything_is_pinned():
    pool = BlockPool(BS, 10_000)
    fill(pool, list(range(8)))
    hit = pool.lookup(NS, list(range(9)))
    assert pool.reset() is False and len(pool) == 2
    pool.release(hit.blocks)
    assert pool.reset() is True and len(pool) == 0 and pool.nbytes == 0
    assert pool.stats().lookups == 1  # counters are monotonic across a flush


def test_stats_count_queries_hits_and_states():
    pool = BlockPool(BS, 10_000)
    fill(pool, list(range(8)))
    hit = pool.lookup(NS, list(range(10)))
    pool.lookup(NS, [9] * 6)
    s = pool.stats()
    assert (s.lookups, s.queried_tokens, s.hit_tokens) == (2, 16, 8)
    assert s.hit_rate == 0.5
    assert (s.blocks_pinned, s.blocks_cached, s.blocks_stored) == (2, 0, 2)
    assert (s.bytes_pinned, s.bytes_cached) == (200, 0)
    pool.release(hit.blocks)
    s = pool.stats()
    assert (s.blocks_pinned, s.blocks_cached, s.bytes_cached) == (0, 2, 200)


def test_cached_prefix_blocks_has_no_side_effects():
    pool = BlockPool(BS, 10_000)
    fill(pool, list(range(8)))
    assert pool.cached_prefix_blocks(NS, list(range(9))) == 2
    s = pool.stats()
    assert s.lookups == 0 and s.blocks_pinned == 0


def test_kvpool_imports_no_mlx():
    import subprocess
    import sys

    code = "import sys, kvpool; assert not any(m.startswith('mlx') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_insert_after_a_pinned_hit_resumes_the_chain():
    pool = BlockPool(BS, 10_000)
    toks = list(range(20))
    fill(pool, toks[:8], tier=TIER_GENERATED)
    hit = pool.lookup(NS, toks)
    res = pool.insert(NS, toks, payloads_for(toks), TIER_CONVERSATION, pinned_prefix=hit.blocks)
    assert res.deduplicated == 2 and len(res.new_keys) == 3
    assert res.new_keys == chain_keys(NS, toks, BS)[2:]
    assert [b.tier for b in hit.blocks] == [TIER_CONVERSATION] * 2
    pool.release(hit.blocks)
    with pytest.raises(ValueError):  # an unpinned "prefix" is a caller bug
        pool.insert(NS, toks, payloads_for(toks), pinned_prefix=hit.blocks)


def test_a_missing_payload_ends_the_insert_there():
    pool = BlockPool(BS, 10_000)
    toks = list(range(16))
    res = pool.insert(NS, toks, lambda i: None if i == 2 else FakePayload(()))
    assert len(res.new_keys) == 2 and res.refused == 2 and len(pool) == 2


def test_replace_payload_keeps_byte_accounting_and_budget():
    pool = BlockPool(BS, 300)
    fill(pool, list(range(8)))
    fill(pool, [9] * 4)
    hit = pool.lookup(NS, list(range(9)))
    b = hit.blocks[-1]
    assert pool.replace_payload(b, FakePayload((4, 5, 6, 7), nbytes=150))
    assert len(pool) == 2  # the unpinned [9]*4 block made room for the 50 more bytes
    assert pool.nbytes == 250 and b.payload.nbytes == 150
    assert pool.stats().bytes_pinned == 250
    assert not pool.replace_payload(b, FakePayload((), nbytes=1000))  # can't fit
    pool.release(hit.blocks)
    assert pool.stats().bytes_pinned == 0 and pool.nbytes == 250
