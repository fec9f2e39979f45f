"""Block pools and the two-pool KVCacheManager: unit tests and hypothesis state machines."""

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from trinity.engine.kv_cache import BlockPool, KVCacheManager


# ---------------------------------------------------------------------- BlockPool
def test_block_pool_allocate_free_and_owner():
    pool = BlockPool("full", 5)
    assert (pool.num_free, pool.num_used, pool.usage) == (5, 0, 0.0)
    a = pool.allocate(2, "a")
    b = pool.allocate(3, "b")
    assert len(a) == 2 and len(b) == 3 and not set(a) & set(b)
    assert sorted(a + b) == [0, 1, 2, 3, 4]
    assert all(pool.owner(x) == "a" for x in a) and all(pool.owner(x) == "b" for x in b)
    assert (pool.num_free, pool.num_used, pool.usage) == (0, 5, 1.0)
    with pytest.raises(MemoryError, match="1 blocks wanted, 0 free"):
        pool.allocate(1, "c")
    pool.free(a, "a")
    assert pool.num_free == 2 and all(pool.owner(x) is None for x in a)
    assert pool.allocate(0, "c") == []
    assert pool.num_free == 2


def test_block_pool_rejects_foreign_free_and_double_free():
    pool = BlockPool("sliding", 3)
    a = pool.allocate(2, "a")
    with pytest.raises(RuntimeError, match=r"freed by 'b' but held by \['a'\]"):
        pool.free(a[:1], "b")
    pool.free(a, "a")
    with pytest.raises(RuntimeError, match="held by None"):
        pool.free(a[:1], "a")
    assert pool.num_free == 3


def test_block_pool_sizes():
    with pytest.raises(ValueError, match="num_blocks = -1"):
        BlockPool("full", -1)
    empty = BlockPool("full", 0)
    assert empty.usage == 0.0 and empty.num_free == 0
    assert empty.allocate(0, "x") == []
    with pytest.raises(MemoryError):
        empty.allocate(1, "x")


# ---------------------------------------------------------------------- KVCacheManager: unit
def test_manager_sizing_and_ring():
    kv = KVCacheManager(block_size=4, num_full_blocks=100, num_sliding_blocks=100, sliding_window=8)
    assert kv.ring_blocks == 3
    assert kv.blocks_for(0) == (0, 0)
    assert kv.blocks_for(1) == (1, 1)
    assert kv.blocks_for(8) == (2, 2)
    assert kv.blocks_for(9) == (3, 3)
    assert kv.blocks_for(64) == (16, 3)
    kv5 = KVCacheManager(block_size=5, num_full_blocks=10, num_sliding_blocks=10, sliding_window=16)
    assert kv5.ring_blocks == 5 and kv5.blocks_for(100) == (20, 5)
    with pytest.raises(ValueError, match="block_size = 0"):
        KVCacheManager(0, 1, 1, 8)


def test_manager_without_one_kind_of_layer():
    kv = KVCacheManager(4, 10, 10, 8, has_full_layers=True, has_sliding_layers=False)
    assert kv.sliding.num_blocks == 0 and kv.blocks_for(20) == (5, 0)
    assert kv.allocate("a", 20) and kv.tables("a").sliding == []
    kv2 = KVCacheManager(4, 10, 10, 8, has_full_layers=False, has_sliding_layers=True)
    assert kv2.full.num_blocks == 0 and kv2.blocks_for(1000) == (0, 3)
    assert kv2.fits_ever(1000) is None
    assert kv2.allocate("a", 1000) and kv2.tables("a").full == [] and len(kv2.tables("a").sliding) == 3


def test_fits_ever_gives_numbers():
    kv = KVCacheManager(block_size=4, num_full_blocks=5, num_sliding_blocks=2, sliding_window=8)
    assert kv.fits_ever(8) is None
    msg = kv.fits_ever(21)
    assert "21 tokens need 6 blocks of the full-attention pool" in msg and "5 blocks of 4 tokens" in msg
    msg = kv.fits_ever(12)  # 3 full blocks fit; the ring needs 3 sliding blocks, the pool has 2
    assert "12 tokens need 3 blocks of the sliding-window pool" in msg and "2 blocks of 4 tokens" in msg


def test_allocate_grows_never_shrinks_and_is_all_or_nothing():
    kv = KVCacheManager(block_size=4, num_full_blocks=6, num_sliding_blocks=4, sliding_window=8)
    assert kv.allocate("a", 5)
    assert (len(kv.tables("a").full), len(kv.tables("a").sliding)) == (2, 2)
    assert kv.allocate("a", 3)  # asking for less keeps what is held
    assert (len(kv.tables("a").full), len(kv.tables("a").sliding)) == (2, 2)
    assert kv.allocate("a", 40) is False  # 10 full blocks > 6: nothing changes
    assert (len(kv.tables("a").full), len(kv.tables("a").sliding)) == (2, 2)
    assert (kv.full.num_free, kv.sliding.num_free) == (4, 2)
    assert kv.allocate("b", 8)
    assert (kv.full.num_free, kv.sliding.num_free) == (2, 0)
    # b's full blocks would fit, its sliding block would not: neither pool changes
    assert kv.allocate("b", 9) is False
    assert (kv.full.num_free, kv.sliding.num_free) == (2, 0)
    assert len(kv.tables("b").full) == 2
    assert kv.tokens_capacity("a") == {"full": 8, "sliding": 8}
    assert kv.tokens_capacity("nobody") == {"full": 0, "sliding": 0}
    kv.free("a")
    kv.free("a")  # freeing twice is harmless
    kv.free("b")
    assert (kv.full.num_free, kv.sliding.num_free) == (6, 4)
    assert kv.usage() == {"full": 0.0, "sliding": 0.0}


def test_slots_addressing():
    kv = KVCacheManager(block_size=4, num_full_blocks=20, num_sliding_blocks=20, sliding_window=8)
    kv.allocate("x", 3)  # take blocks so the sequence's blocks are not 0, 1, 2
    assert kv.allocate("a", 30)
    t = kv.tables("a")
    assert [kv.layout.slot(t.full, p, False) for p in range(30)] == \
        [t.full[p // 4] * 4 + p % 4 for p in range(30)]
    # position p lives in ring entry (p // 4) % 3
    assert kv.layout.slot(t.sliding, 0, True) == kv.layout.slot(t.sliding, 12, True) == t.sliding[0] * 4
    assert kv.layout.slot(t.sliding, 13, True) == t.sliding[0] * 4 + 1
    assert kv.layout.slot(t.sliding, 29, True) == t.sliding[(29 // 4) % 3] * 4 + 1


# ---------------------------------------------------------------------- KVCacheManager: property tests
class KVCacheMachine(RuleBasedStateMachine):
    """Random allocate / free sequences for several sequences, with a model of what each should hold."""

    @initialize(block_size=st.integers(1, 6), window=st.integers(1, 24), num_full=st.integers(0, 24),
                num_sliding=st.integers(0, 16), kinds=st.sampled_from([(True, True), (True, False), (False, True)]))
    def setup(self, block_size, window, num_full, num_sliding, kinds):
        self.kv = KVCacheManager(block_size, num_full, num_sliding, window, has_full_layers=kinds[0],
                                 has_sliding_layers=kinds[1])
        self.tokens: dict[str, int] = {}  # seq -> tokens it holds room for

    def _snapshot(self):
        kv = self.kv
        holders = [{b: set(h) for b, h in pool._holders.items()} for pool in (kv.full, kv.sliding)]
        return (kv.full.num_free, kv.sliding.num_free, *holders,
                {s: (list(t.full), list(t.sliding)) for s, t in kv._tables.items() if t.full or t.sliding})

    @rule(seq=st.sampled_from(["a", "b", "c", "d"]), num_tokens=st.integers(0, 120))
    def allocate(self, seq, num_tokens):
        before = self._snapshot()
        held_before = self.tokens.get(seq, 0)
        want = max(held_before, num_tokens)
        full, sliding = self.kv.blocks_for(want)
        t = self.kv._tables.get(seq)
        have_full, have_sliding = (len(t.full), len(t.sliding)) if t else (0, 0)
        expect_ok = (full - have_full <= self.kv.full.num_free and sliding - have_sliding <= self.kv.sliding.num_free)
        ok = self.kv.allocate(seq, num_tokens)
        assert ok == expect_ok
        if ok:
            self.tokens[seq] = want
            t = self.kv.tables(seq)
            assert (len(t.full), len(t.sliding)) == (full, sliding)
        else:
            assert self._snapshot() == before  # all or nothing

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.free(seq)
        del self.tokens[seq]
        assert not self.kv.has(seq)

    @rule()
    def free_all(self):
        for seq in list(self.kv._tables):
            self.kv.free(seq)
        self.tokens.clear()
        kv = self.kv
        assert kv.full.num_free == kv.full.num_blocks and kv.sliding.num_free == kv.sliding.num_blocks
        assert kv.full._holders == {} and kv.sliding._holders == {}
        assert sorted(kv.full._free) == list(range(kv.full.num_blocks))
        assert sorted(kv.sliding._free) == list(range(kv.sliding.num_blocks))

    @invariant()
    def blocks_owned_once_and_counted(self):
        kv = self.kv
        for pool, kind in ((kv.full, "full"), (kv.sliding, "sliding")):
            owned = [(b, s) for s, t in kv._tables.items() for b in getattr(t, kind)]
            blocks = [b for b, _ in owned]
            assert len(blocks) == len(set(blocks)), f"a {kind} block is in two tables"
            assert all(0 <= b < pool.num_blocks for b in blocks)
            assert not set(blocks) & set(pool._free), f"a {kind} block is both free and owned"
            assert len(pool._free) == len(set(pool._free))
            assert pool.num_used + pool.num_free == pool.num_blocks
            assert pool.num_used == len(blocks)
            assert all(pool.owner(b) == s for b, s in owned)

    @invariant()
    def sliding_ring_and_slots(self):
        kv = self.kv
        for seq, n in self.tokens.items():
            t = kv.tables(seq)
            assert len(t.sliding) <= kv.ring_blocks
            if kv.has_full:
                assert len(t.full) * kv.block_size >= n
                slots = [kv.layout.slot(t.full, p, False) for p in range(n)]
                assert len(set(slots)) == n
                assert all(kv.full.owner(s // kv.block_size) == seq for s in slots)
            if kv.has_sliding and n:
                slots = [kv.layout.slot(t.sliding, p, True) for p in range(n)]
                assert all(kv.sliding.owner(s // kv.block_size) == seq for s in slots)
                last = slots[-kv.sliding_window:]
                assert len(set(last)) == len(last), "two of the last `window` positions share a slot"

    def teardown(self):
        if hasattr(self, "kv"):
            self.free_all()


KVCacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None, database=None,
                                            suppress_health_check=[HealthCheck.too_slow])
TestKVCacheMachine = KVCacheMachine.TestCase


@settings(max_examples=150, deadline=None, database=None)
@given(block_size=st.integers(1, 8), window=st.integers(1, 40), n=st.integers(1, 150))
def test_sliding_ring_keeps_last_window_distinct(block_size, window, n):
    """For any length, the ring gives the last `window` positions distinct slots inside the sequence's blocks,
    and holds ring_blocks = ceil(window / block_size) + 1 blocks at most."""
    kv = KVCacheManager(block_size, 0, 64, window, has_full_layers=False)
    assume(kv.fits_ever(n) is None)
    assert kv.allocate("s", n)
    table = kv.tables("s").sliding
    assert len(table) == min(math.ceil(n / block_size), kv.ring_blocks) <= math.ceil(window / block_size) + 1
    slots = [kv.layout.slot(table, p, True) for p in range(max(0, n - window), n)]
    assert len(set(slots)) == len(slots)
    assert {s // block_size for s in slots} <= set(table)
    # every window of `window` consecutive positions (what a decode at its last position reads) is distinct too
    for end in range(1, n + 1):
        w = [kv.layout.slot(table, p, True) for p in range(max(0, end - window), end)]
        assert len(set(w)) == len(w)


@settings(max_examples=150, deadline=None, database=None)
@given(block_size=st.integers(1, 8), window=st.integers(1, 40), n=st.integers(1, 150), data=st.data())
def test_slot_ranges_equal_the_slot_of_each_position(block_size, window, n, data):
    """`slots(table, lo, hi)` (a block at a time, what the runner uses for prefills) is `full_slot` /
    `sliding_slot` of each position, for any range: inside a block, across blocks, around the ring."""
    kv = KVCacheManager(block_size, 256, 256, window)  # room for the longest sequence after the other one
    kv.allocate("x", data.draw(st.integers(0, 5 * block_size)))  # the sequence's blocks do not start at 0
    assert kv.allocate("s", n)
    t = kv.tables("s")
    lo = data.draw(st.integers(0, n))
    hi = data.draw(st.integers(lo, n))
    assert kv.layout.slots(t.full, lo, hi, sliding=False) == [kv.layout.slot(t.full, p, False) for p in range(lo, hi)]
    assert kv.layout.slots(t.sliding, lo, hi, sliding=True) == [kv.layout.slot(t.sliding, p, True) for p in range(lo, hi)]
