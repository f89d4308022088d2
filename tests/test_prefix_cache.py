"""The request-level prefix cache verbs (``kvpool.PrefixCache``) with fake payloads: no
MLX, no event loop, no disk."""

import pytest

from blockserve.kvpool import (
    TIER_CONVERSATION,
    TIER_GENERATED,
    TIER_SYSTEM,
    BlockPool,
    Namespace,
    PrefixCache,
    Scope,
    hittable_blocks,
)
from tests.fakes import FakePayload

BS = 4
NS = Namespace("fake-model")


def make(budget=1 << 20, **kw):
    return PrefixCache(BlockPool(BS, budget), **kw)


def payloads(tokens, first=0, snapshot_last=False):
    out = [FakePayload(tuple(tokens[i * BS : (i + 1) * BS]))
           for i in range(first, len(tokens) // BS)]
    if out and snapshot_last:
        out[-1].snapshot = True
    return out


def test_the_hittable_rule_leaves_one_token_to_compute():
    assert [hittable_blocks(n, BS) for n in (0, 1, 4, 5, 8, 9)] == [0, 0, 0, 1, 1, 2]
    cache = make()
    assert len(cache.prompt(NS, list(range(8))).keys) == 1  # 8 tokens: block 2 would be all
    assert len(cache.prompt(NS, list(range(9))).keys) == 2


def test_acquire_publish_release_round_trip():
    cache = make()
    prompt = list(range(1, 19))  # 18 tokens, 4 hittable blocks
    a = cache.prompt(NS, prompt)
    assert cache.cached(a) == 0
    assert cache.acquire(a) == [] and a.hit_tokens == 0
    assert cache.publish(a, prompt[:16], 0, payloads(prompt[:16]), TIER_GENERATED) is False
    cache.release(a)
    b = cache.prompt(NS, prompt)
    assert cache.cached(b) == 4
    cache.acquire(b)
    assert b.hit_tokens == 16 and cache.stats().blocks_pinned == 4
    assert [p.tokens for p in b.hit.payloads] == [tuple(prompt[i:i + 4]) for i in range(0, 16, 4)]
    cache.release(b)
    cache.release(b)  # idempotent
    assert cache.stats().blocks_pinned == 0


def test_acquire_aligns_marks_inside_the_uncached_part():
    cache = make()
    prompt = list(range(30))
    c = cache.prompt(NS, prompt)
    cps = cache.acquire(c, [(3, TIER_SYSTEM), (9, TIER_SYSTEM), (10, TIER_CONVERSATION),
                           (29, TIER_GENERATED), (32, TIER_SYSTEM)])
    # 3 aligns to 0 (not > the hit); 9 and 10 both to 8 (highest tier); 32 is past the end.
    assert cps == [(8, TIER_SYSTEM), (28, TIER_GENERATED)]
    assert len(c.promised) == 7  # blocks 0..6, up to the last checkpoint
    cache.release(c)
    assert c.promised == [] and not cache._inflight


def test_inflight_sharing_waits_for_the_promised_blocks():
    cache = make()
    prompt = list(range(100, 120))
    a, b = cache.prompt(NS, prompt), cache.prompt(NS, prompt + [7, 7])
    cache.acquire(a, [(16, TIER_SYSTEM)])
    assert cache.cached(b) is None and b.waited  # a computes b's next blocks
    assert cache.publish(a, prompt[:16], 0, payloads(prompt[:16]), TIER_SYSTEM) is True
    assert cache.cached(b) == 4
    cache.acquire(b)
    assert b.shared and b.hit_tokens == 16
    cache.release(a)
    cache.release(b)


def test_without_sharing_nobody_waits():
    cache = make(share_inflight=False)
    prompt = list(range(20))
    a, b = cache.prompt(NS, prompt), cache.prompt(NS, prompt)
    cache.acquire(a, [(16, TIER_SYSTEM)])
    assert cache.cached(b) == 0
    cache.release(a)


def test_a_released_owner_frees_its_promises_for_others():
    cache = make()
    prompt = list(range(20))
    a, b = cache.prompt(NS, prompt), cache.prompt(NS, prompt)
    cache.acquire(a, [(16, TIER_SYSTEM)])
    assert cache.cached(b) is None
    cache.release(a)  # aborted before computing anything
    assert cache.cached(b) == 0


def test_a_hit_on_a_snapshot_model_ends_on_a_snapshot():
    cache = make()
    prompt = list(range(21))
    a = cache.prompt(NS, prompt)
    cache.acquire(a)
    blocks = payloads(prompt[:20])
    for p in blocks:
        p.needs_snapshot = True
    blocks[2].snapshot = True  # a checkpoint at 12 tokens
    cache.publish(a, prompt[:20], 0, blocks, TIER_GENERATED)
    cache.release(a)
    b = cache.prompt(NS, prompt)
    cache.acquire(b)
    assert b.hit_tokens == 12
    cache.release(b)


def _two_tenants(cache):
    t1 = Namespace("fake-model", "tenant:aaaa")
    t2 = Namespace("fake-model", "tenant:bbbb\0salt:x")
    for ns in (t1, t2):
        c = cache.prompt(ns, list(range(9)))
        cache.acquire(c)
        cache.publish(c, list(range(8)), 0, payloads(list(range(8))), TIER_GENERATED)
        cache.release(c)
    return t1, t2


def test_scoped_stats_and_reset_touch_one_tenant_only():
    cache = make()
    t1, t2 = _two_tenants(cache)
    c = cache.prompt(t2, list(range(9)))
    cache.acquire(c)  # a hit for tenant b
    cache.release(c)
    b_scope = Scope(salt="tenant:bbbb")
    sb, sa = cache.stats(b_scope), cache.stats(Scope(salt="tenant:aaaa"))
    assert sb.blocks_stored == 2 and sa.blocks_stored == 2
    assert sb.hit_tokens == 8 and sa.hit_tokens == 0
    assert sb.queried_tokens == 18 and sa.queried_tokens == 9
    assert cache.stats().blocks_stored == 4
    assert cache.reset(b_scope) is True
    assert cache.stats(b_scope).blocks_stored == 0 and cache.stats().blocks_stored == 2
    a = cache.prompt(t1, list(range(9)))
    assert cache.cached(a) == 2  # tenant a's chain is whole


def test_a_scoped_reset_is_refused_only_by_pins_in_its_scope():
    cache = make()
    t1, _ = _two_tenants(cache)
    held = cache.prompt(t1, list(range(9)))
    cache.acquire(held)
    assert cache.reset(Scope(salt="tenant:aaaa")) is False
    assert cache.reset(Scope(salt="tenant:bbbb")) is True
    assert cache.reset() is False
    cache.release(held)
    assert cache.reset() is True and len(cache.pool) == 0


@pytest.mark.parametrize("scope,covered", [
    (Scope(), [True, True, True, True]),
    (Scope(model="m2"), [False, False, True, False]),
    (Scope(salt="tenant:a"), [False, True, False, False]),  # not tenant "ab"'s
])
def test_scope_covers(scope, covered):
    nss = [Namespace("m1"), Namespace("m1", "tenant:a\0salt:z"), Namespace("m2", "x"),
           Namespace("m1", "tenant:ab")]
    assert [scope(ns) for ns in nss] == covered


def test_per_namespace_counters_are_bounded(monkeypatch):
    """Salts come from requests: a flood of distinct salts can't grow the pool's tables."""
    import blockserve.kvpool.pool as pool_module

    monkeypatch.setattr(pool_module, "MAX_COUNTED_NAMESPACES", 8)
    cache = make()
    for i in range(50):
        c = cache.prompt(Namespace("fake-model", f"salt-{i}"), list(range(9)))
        cache.acquire(c)
        cache.release(c)
    assert len(cache.pool._ns_counters) == 8
    assert cache.stats(Scope(salt="salt-49")).lookups == 1
    assert cache.stats(Scope(salt="salt-0")).lookups == 0  # forgotten, not wrong
    assert cache.stats().lookups == 50
