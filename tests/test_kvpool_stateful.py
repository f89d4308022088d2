"""A hypothesis state machine over the pool: random lookups, pins, releases, inserts
and budget changes, with the pool's invariants checked after every step."""

from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blockserve.kvpool import TIERS, BlockPool, Namespace

BS = 2
NAMESPACES = [Namespace("m"), Namespace("m", "salt"), Namespace("m2")]
# A small alphabet makes shared prefixes and dedup frequent.
token_lists = st.lists(st.integers(0, 2), min_size=0, max_size=12)


@dataclass
class Tagged:
    """A payload that records what it was made for, so hits can be verified."""

    namespace: Namespace
    prefix: tuple
    nbytes: int


class PoolMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = BlockPool(BS, 600)
        self.held: list[list] = []  # pinned chains we still owe a release
        self.evicted_while_pinned = False

    @rule(ns=st.sampled_from(NAMESPACES), tokens=token_lists, tier=st.sampled_from(TIERS),
          size=st.integers(1, 150))
    def insert(self, ns, tokens, tier, size):
        before = {id(b) for chain in self.held for b in chain}
        self.pool.insert(
            ns, tokens,
            lambda i: Tagged(ns, tuple(tokens[: (i + 1) * BS]), size), tier,
        )
        self._check_pinned_survive(before)

    @rule(ns=st.sampled_from(NAMESPACES), tokens=token_lists, pin=st.booleans())
    def lookup(self, ns, tokens, pin):
        hit = self.pool.lookup(ns, tokens, pin=pin)
        assert hit.num_tokens <= max(len(tokens) - 1, 0)
        for i, p in enumerate(hit.payloads):
            # Every returned block is exactly this namespace's block for this prefix.
            assert p.namespace == ns
            assert p.prefix == tuple(tokens[: (i + 1) * BS])
        if pin and hit.blocks:
            self.held.append(hit.blocks)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        i = data.draw(st.integers(0, len(self.held) - 1))
        self.pool.release(self.held.pop(i))

    @precondition(lambda self: len(self.pool) > 0)
    @rule(data=st.data(), size=st.integers(1, 300))
    def replace_payload(self, data, size):
        blocks = self.pool.blocks()
        b = blocks[data.draw(st.integers(0, len(blocks) - 1))]
        before = {id(x) for chain in self.held for x in chain}
        old = b.payload
        if self.pool.replace_payload(b, Tagged(old.namespace, old.prefix, size)):
            assert b.nbytes == size
        self._check_pinned_survive(before)

    @rule(budget=st.integers(0, 1200))
    def set_budget(self, budget):
        before = {id(b) for chain in self.held for b in chain}
        self.pool.set_budget(budget)
        self._check_pinned_survive(before)

    @precondition(lambda self: not self.held)
    @rule()
    def reset(self):
        assert self.pool.reset()
        assert len(self.pool) == 0

    def _check_pinned_survive(self, pinned_ids):
        present = {id(b) for b in self.pool.blocks()}
        assert pinned_ids <= present, "a pinned block was evicted"

    @invariant()
    def refcounts_match_pins(self):
        owed: dict[int, int] = {}
        for chain in self.held:
            for b in chain:
                owed[id(b)] = owed.get(id(b), 0) + 1
        for b in self.pool.blocks():
            assert b.refcount >= 0
            assert b.refcount == owed.get(id(b), 0)

    @invariant()
    def counts_add_up(self):
        s = self.pool.stats()
        blocks = self.pool.blocks()
        assert s.blocks_pinned + s.blocks_cached == len(blocks) == s.blocks_stored
        assert s.blocks_pinned == sum(1 for b in blocks if b.refcount > 0)
        assert s.bytes_stored == sum(b.nbytes for b in blocks) == self.pool.nbytes
        assert s.bytes_pinned == sum(b.nbytes for b in blocks if b.refcount > 0)

    @invariant()
    def budget_holds_unless_pins_force_it(self):
        if self.pool.nbytes > self.pool.budget_bytes:
            # Only allowed if nothing could be evicted right now.
            assert not any(b.evictable for b in self.pool.blocks())

    @invariant()
    def tree_is_consistent(self):
        blocks = self.pool.blocks()
        present = {id(b) for b in blocks}
        kids: dict[int, int] = {}
        for b in blocks:
            if b.parent is not None:
                assert id(b.parent) in present, "an orphaned block"
                kids[id(b.parent)] = kids.get(id(b.parent), 0) + 1
        for b in blocks:
            assert b.children == kids.get(id(b), 0)


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPoolMachine = PoolMachine.TestCase
