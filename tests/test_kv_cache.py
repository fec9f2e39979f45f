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
def held(table):
    """The block indices a table holds a block for."""
    return {j for j, b in enumerate(table) if b >= 0}


def test_manager_sizing_and_window_blocks():
    kv = KVCacheManager(block_size=4, num_full_blocks=100, num_sliding_blocks=100, sliding_window=8)
    assert kv.window_blocks == 3  # 8 positions touch 3 blocks of 4 at most
    assert kv.blocks_for(0) == (0, 0)
    assert kv.blocks_for(1) == (1, 1)
    assert kv.blocks_for(8) == (2, 2)
    assert kv.blocks_for(9) == (3, 3)
    assert kv.blocks_for(64) == (16, 6)  # at a step's peak: 3 kept for its first query, 3 new for its last window
    kv5 = KVCacheManager(block_size=5, num_full_blocks=10, num_sliding_blocks=10, sliding_window=16)
    assert kv5.window_blocks == 4 and kv5.blocks_for(100) == (20, 8)
    with pytest.raises(ValueError, match="block_size = 0"):
        KVCacheManager(0, 1, 1, 8)


def test_a_decoding_sequence_holds_its_window_and_lets_go_of_the_rest():
    kv = KVCacheManager(block_size=4, num_full_blocks=100, num_sliding_blocks=100, sliding_window=8)
    assert kv.allocate("a", 1)
    seen = []
    for n in range(2, 60):
        assert kv.allocate("a", n)  # a decode step at position n - 1
        t = kv.tables("a")
        assert len(t.full) == len(t.sliding) == math.ceil(n / 4) and -1 not in t.full
        # the blocks of positions n - 8 .. n - 1 (what the query at n - 1 sees), nothing else
        assert held(t.sliding) == {p // 4 for p in range(max(0, n - 8), n)}
        seen.append(len(held(t.sliding)))
    assert max(seen) == kv.window_blocks and min(seen[10:]) == 2
    assert kv.sliding.num_used == seen[-1]  # let go blocks are free again
    assert kv.tokens_capacity("a") == {"full": 60, "sliding": seen[-1] * 4}


def test_manager_without_one_kind_of_layer():
    kv = KVCacheManager(4, 10, 10, 8, has_full_layers=True, has_sliding_layers=False)
    assert kv.sliding.num_blocks == 0 and kv.blocks_for(20) == (5, 0)
    assert kv.allocate("a", 20) and kv.tables("a").sliding == []
    kv2 = KVCacheManager(4, 10, 10, 8, has_full_layers=False, has_sliding_layers=True)
    assert kv2.full.num_blocks == 0 and kv2.blocks_for(1000) == (0, 6)
    assert kv2.fits_ever(1000) is None
    assert kv2.allocate("a", 1000) and kv2.tables("a").full == []
    # one chunk: blocks for its last window only (without prefix caching nothing reads the others)
    t = kv2.tables("a").sliding
    assert len(t) == 250 and held(t) == {248, 249} and kv2.sliding.num_used == 2


def test_fits_ever_gives_numbers():
    kv = KVCacheManager(block_size=4, num_full_blocks=5, num_sliding_blocks=2, sliding_window=8)
    assert kv.fits_ever(8) is None
    msg = kv.fits_ever(21)
    assert "21 tokens need 6 blocks of the full-attention pool" in msg and "5 blocks of 4 tokens" in msg
    msg = kv.fits_ever(12)  # 3 full blocks fit; a step may need 3 sliding blocks, the pool has 2
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
    before = list(kv.tables("b").sliding)
    # b's chunk to 16: its full blocks would fit; it lets go of its block 0 but needs 2 new sliding blocks: neither
    # pool changes, block 0 included
    assert kv.allocate("b", 16) is False
    assert (kv.full.num_free, kv.sliding.num_free) == (2, 0)
    assert len(kv.tables("b").full) == 2 and kv.tables("b").sliding == before
    assert kv.sliding.owner(before[0]) == "b"
    assert kv.allocate("b", 9) is False  # a decode at position 8 sees positions 1..8: blocks 0-2
    assert kv.tokens_capacity("a") == {"full": 8, "sliding": 8}
    assert kv.tokens_capacity("nobody") == {"full": 0, "sliding": 0}
    kv.free("a")
    kv.free("a")  # freeing twice is harmless
    assert kv.allocate("b", 12) and held(kv.tables("b").sliding) == {0, 1, 2}
    # a decode at position 12 sees 5..12: b lets go of block 0 and holds blocks 1-3, in a pool with one block free
    assert kv.sliding.num_free == 1 and kv.allocate("b", 13)
    t = kv.tables("b")
    assert t.sliding[0] == -1 and held(t.sliding) == {1, 2, 3} and kv.sliding.num_free == 1
    assert t.sliding[1] == before[1]  # an entry keeps its block until it is let go
    kv.free("b")
    assert (kv.full.num_free, kv.sliding.num_free) == (6, 4)
    assert kv.usage() == {"full": 0.0, "sliding": 0.0}


def test_slots_addressing():
    kv = KVCacheManager(block_size=4, num_full_blocks=20, num_sliding_blocks=20, sliding_window=8)
    kv.allocate("x", 3)  # take blocks so the sequence's blocks are not 0, 1, 2
    assert kv.allocate("a", 30)
    t = kv.tables("a")
    # position p lives in entry p // 4 of either table; the sliding table holds the last window's blocks only
    assert [kv.layout.slot(t.full, p) for p in range(30)] == [t.full[p // 4] * 4 + p % 4 for p in range(30)]
    assert t.sliding[:5] == [-1] * 5 and held(t.sliding) == {5, 6, 7}
    assert kv.layout.slot(t.sliding, 22) == t.sliding[5] * 4 + 2
    assert kv.layout.slot(t.sliding, 29) == t.sliding[7] * 4 + 1


# ---------------------------------------------------------------------- KVCacheManager: property tests
def needed_blocks(layout, start: int, end: int) -> set[int]:
    """The sliding blocks a step computing start..end-1 holds: those from its first query's window on that it held
    already, and those of its last `window` positions."""
    return ({*range(layout.first_block(start, True), layout.num_blocks(start))}
            | {*range(layout.first_block(end - 1, True), layout.num_blocks(end))})


class KVCacheMachine(RuleBasedStateMachine):
    """Random allocate / free sequences for several sequences, with a model of what each should hold."""

    @initialize(block_size=st.integers(1, 6), window=st.integers(1, 24), num_full=st.integers(0, 24),
                num_sliding=st.integers(0, 16), kinds=st.sampled_from([(True, True), (True, False), (False, True)]))
    def setup(self, block_size, window, num_full, num_sliding, kinds):
        self.kv = KVCacheManager(block_size, num_full, num_sliding, window, has_full_layers=kinds[0],
                                 has_sliding_layers=kinds[1])
        self.tokens: dict[str, int] = {}  # seq -> tokens it holds room for
        self.starts: dict[str, int] = {}  # seq -> the first position of its last step

    def _snapshot(self):
        kv = self.kv
        holders = [{b: set(h) for b, h in pool._holders.items()} for pool in (kv.full, kv.sliding)]
        return (kv.full.num_free, kv.sliding.num_free, *holders,
                {s: (list(kv.tables(s).full), list(kv.tables(s).sliding)) for s in self.tokens})

    @rule(seq=st.sampled_from(["a", "b", "c", "d"]), num_tokens=st.integers(0, 120))
    def allocate(self, seq, num_tokens):
        kv, before = self.kv, self._snapshot()
        start = self.tokens.get(seq, 0)
        if seq in self.tokens and num_tokens <= start:  # asking for less keeps what is held
            assert kv.allocate(seq, num_tokens) and self._snapshot() == before
            return
        t = kv.tables(seq)
        need_full = kv.layout.num_blocks(num_tokens) - len(t.full) if kv.has_full else 0
        keep = needed_blocks(kv.layout, start, num_tokens) if kv.has_sliding else set()
        room = kv.sliding.num_free + len(held(t.sliding) - keep)  # what it lets go of counts
        expect_ok = need_full <= kv.full.num_free and len(keep - held(t.sliding)) <= room
        ok = kv.allocate(seq, num_tokens)
        assert ok == expect_ok
        if ok:
            self.tokens[seq], self.starts[seq] = num_tokens, start
            t = kv.tables(seq)
            assert len(t.full) == kv.blocks_for(num_tokens)[0] and -1 not in t.full
            assert held(t.sliding) == keep
            assert len(t.sliding) == (kv.layout.num_blocks(num_tokens) if kv.has_sliding else 0)
        else:
            assert self._snapshot() == before  # all or nothing

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.free(seq)
        del self.tokens[seq], self.starts[seq]
        assert not self.kv.has(seq)

    @rule()
    def free_all(self):
        for seq in list(self.tokens):
            self.kv.free(seq)
        self.tokens.clear()
        self.starts.clear()
        kv = self.kv
        assert kv.full.num_free == kv.full.num_blocks and kv.sliding.num_free == kv.sliding.num_blocks
        assert kv.full._holders == {} and kv.sliding._holders == {}
        assert sorted(kv.full._free) == list(range(kv.full.num_blocks))
        assert sorted(kv.sliding._free) == list(range(kv.sliding.num_blocks))

    @invariant()
    def blocks_owned_once_and_counted(self):
        kv = self.kv
        for pool, kind in ((kv.full, "full"), (kv.sliding, "sliding")):
            owned = [(b, s) for s in self.tokens for b in getattr(kv.tables(s), kind) if b >= 0]
            blocks = [b for b, _ in owned]
            assert len(blocks) == len(set(blocks)), f"a {kind} block is in two tables"
            assert all(0 <= b < pool.num_blocks for b in blocks)
            assert not set(blocks) & set(pool._free), f"a {kind} block is both free and owned"
            assert len(pool._free) == len(set(pool._free))
            assert pool.num_used + pool.num_free == pool.num_blocks
            assert pool.num_used == len(blocks)
            assert all(pool.owner(b) == s for b, s in owned)

    @invariant()
    def windows_and_slots(self):
        kv = self.kv
        for seq, n in self.tokens.items():
            t = kv.tables(seq)
            if kv.has_full:
                assert len(t.full) * kv.block_size >= n
                slots = [kv.layout.slot(t.full, p) for p in range(n)]
                assert len(set(slots)) == n
                assert all(kv.full.owner(s // kv.block_size) == seq for s in slots)
            if kv.has_sliding and n:
                assert len(held(t.sliding)) <= kv.blocks_for(n)[1]
                # what the last step's queries see of the cache: its first query's context, its last window
                s = self.starts[seq]
                seen = [*range(kv.layout.context_start(s, True), s), *range(max(s, n - kv.sliding_window), n)]
                slots = [kv.layout.slot(t.sliding, p) for p in seen]
                assert all(kv.sliding.owner(x // kv.block_size) == seq for x in slots)
                assert len(set(slots)) == len(slots), "two positions share a slot"

    def teardown(self):
        if hasattr(self, "kv"):
            self.free_all()


KVCacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None, database=None,
                                            suppress_health_check=[HealthCheck.too_slow])
TestKVCacheMachine = KVCacheMachine.TestCase


@settings(max_examples=150, deadline=None, database=None)
@given(block_size=st.integers(1, 8), window=st.integers(1, 40), n=st.integers(1, 150), data=st.data())
def test_sliding_tables_hold_what_their_queries_see(block_size, window, n, data):
    """Computed in random chunks, a sequence holds at each step blocks for its first query's context and its last
    `window` positions, distinct slots; at most `blocks_for` at a step, `window_blocks` in a decode."""
    kv = KVCacheManager(block_size, 0, 64, window, has_full_layers=False)
    assume(kv.fits_ever(n) is None)
    start = 0
    while start < n:
        end = min(n, start + data.draw(st.integers(1, 2 * window + block_size)))
        assert kv.allocate("s", end)
        table = kv.tables("s").sliding
        assert len(held(table)) <= kv.blocks_for(end)[1]
        if end == start + 1:
            assert len(held(table)) <= kv.window_blocks <= math.ceil(window / block_size) + 1
        seen = [*range(kv.layout.context_start(start, True), start), *range(max(start, end - window), end)]
        slots = [kv.layout.slot(table, p) for p in seen]
        assert len(set(slots)) == len(slots) and all(kv.sliding.owner(x // block_size) == "s" for x in slots)
        start = end


@settings(max_examples=150, deadline=None, database=None)
@given(block_size=st.integers(1, 8), window=st.integers(1, 40), n=st.integers(1, 150), data=st.data())
def test_slot_ranges_equal_the_slot_of_each_position(block_size, window, n, data):
    """`slots(table, lo, hi)` (a block at a time, what the runner uses for prefills) is `slot` of each position, for
    any range: inside a block, across blocks, in the full table and in the sliding table's last window."""
    kv = KVCacheManager(block_size, 256, 256, window)  # room for the longest sequence after the other one
    kv.allocate("x", data.draw(st.integers(0, 5 * block_size)))  # the sequence's blocks do not start at 0
    assert kv.allocate("s", n)
    t = kv.tables("s")
    lo = data.draw(st.integers(0, n))
    hi = data.draw(st.integers(lo, n))
    assert kv.layout.slots(t.full, lo, hi) == [kv.layout.slot(t.full, p) for p in range(lo, hi)]
    lo, hi = max(lo, n - window), max(hi, n - window)
    assert kv.layout.slots(t.sliding, lo, hi) == [kv.layout.slot(t.sliding, p) for p in range(lo, hi)]
