"""Automatic prefix caching: the KV manager's shared blocks, and the engine's outputs with hits.

The manager tests drive `KVCacheManager` the way the scheduler and runner do (allocate, writes, register) with a
model of what every slot holds, so a block that is adopted, evicted, let go behind a window or taken again is
checked by its contents. The engine tests compare the log-probabilities of what a
cached run generates with the whole-sequence forward of the same tokens.
"""

import random

import pytest
import torch
from engine_helpers import assert_pools_free, random_prompts, reference_logprobs, tiny_model
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from trinity.engine import LLM, SamplingParams
from trinity.engine.kv_cache import KVCacheManager, extend_block_keys
from trinity.engine.request import Sequence
from trinity.engine.block_tables import WorkerBlockTables
from trinity.engine.step import StepInput


def held_entries(table):
    return {j for j, b in enumerate(table) if b >= 0}


def keys_of(tokens, block_size, n=None):
    return extend_block_keys([], lambda lo, hi: tokens[lo:hi], block_size, len(tokens) // block_size if n is None else n)


class Driver:
    """The scheduler's and runner's use of the manager, with every slot's contents modelled: a slot holds
    `tuple(tokens[:p + 1])` once position p of a sequence with those tokens was written there. Reads and writes
    go through the worker's copy of the tables, kept only from the manager's changes (`take_changes`), as the
    runner keeps them; that copy is checked against the manager's own tables (every entry that holds a block), and
    every slot read or written must be in a block the sequence holds."""

    def __init__(self, kv: KVCacheManager):
        self.kv = kv
        self.slots = {"full": {}, "sliding": {}}
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        # the runner's tables, on the CPU (the device table is the host table)
        self.worker = WorkerBlockTables(max_num_seqs=64, max_blocks=1024, device=torch.device("cpu"),
                                        scratch_blocks={})

    def sync_worker(self):
        self.kv.fill_for_cache()  # the scheduler's end of a step's allocations
        changes, freed = self.kv.take_changes()
        self.worker.apply(StepInput(tables=changes, freed=freed))
        for seq in self.worker.row:
            held = self.kv.tables(seq)
            full, sliding = self.worker.entries(seq, "full"), self.worker.entries(seq, "sliding")
            assert full == held.full, f"worker's full table of {seq}"
            assert len(sliding) == len(held.sliding), f"worker's sliding table of {seq}"
            assert all(w == h for w, h in zip(sliding, held.sliding) if h >= 0), f"worker's sliding table of {seq}"

    def admit(self, seq, tokens, n, use_cache=True, within_step=False):
        """A waiting sequence's first step: adopt what the cache has, then compute n tokens (fewer if the hit
        leaves fewer). Returns the tokens taken from the cache, or None when blocks ran out. `within_step`: only
        the allocation, inside a step whose other allocations the caller makes, then runs (`run(seq, n)`)."""
        kv = self.kv
        keys = keys_of(tokens, kv.block_size, (len(tokens) - 1) // kv.block_size)
        prefix = keys[:kv.cached_prefix(keys)] if use_cache else []
        start = len(prefix) * kv.block_size
        if not kv.allocate(seq, start + min(n, len(tokens) - start), prefix):
            return None
        self.tokens[seq], self.computed[seq] = tokens, start
        if not within_step:
            self.run(seq, min(n, len(tokens) - start))
        return start

    def step(self, seq, n):
        ok = self.kv.allocate(seq, self.computed[seq] + n)
        if ok:
            self.run(seq, n)
        return ok

    def run(self, seq, n):
        """Read the context as the runner does (checked against the model), then write, then register."""
        kv, bs = self.kv, self.kv.block_size
        s, tokens = self.computed[seq], self.tokens[seq]
        self.sync_worker()
        for pool in ("full", "sliding"):
            if not (kv.has_full if pool == "full" else kv.has_sliding):
                continue
            sliding = pool == "sliding"
            table = self.worker.entries(seq, pool)
            holders = getattr(kv, pool).holders
            lo = kv.layout.context_start(s, sliding)  # what the step's first query sees of the cache
            for p, slot in zip(range(lo, s), kv.layout.slots(table, lo, s)):
                assert seq in holders(slot // bs), f"{pool} context of {seq} at {p} in a block it does not hold"
                assert self.slots[pool].get(slot) == tuple(tokens[:p + 1]), f"{pool} context of {seq} at {p}"
            # the runner writes the positions of the step whose block it holds, which must include what later
            # queries see (every position in the full pool)
            written = [p for p in range(s, s + n) if table[p // bs] >= 0]
            assert set(written) >= set(range(max(s, s + n - kv.sliding_window) if sliding else s, s + n))
            for p in written:
                slot = kv.layout.slot(table, p)
                assert seq in holders(slot // bs)
                self.slots[pool][slot] = tuple(tokens[:p + 1])
        self.computed[seq] = s + n
        done = (s + n) // bs
        kv.register(seq, keys_of(tokens, bs, done), done)

    def free(self, seq):
        self.kv.free(seq)
        del self.tokens[seq], self.computed[seq]

    def check_cached_blocks(self, all_tokens):
        """Every registered block holds exactly the tokens its key names."""
        kv, bs = self.kv, self.kv.block_size
        named = {}
        for tokens in all_tokens:
            for j, k in enumerate(keys_of(tokens, bs)):
                named[k] = (tokens, j)
        for pool_name in ("full", "sliding"):
            pool = getattr(kv, pool_name)
            for block, key in pool._key_of.items():
                tokens, j = named[key]
                for o in range(bs):
                    assert self.slots[pool_name].get(block * bs + o) == tuple(tokens[:j * bs + o + 1])


# ---------------------------------------------------------------------- keys
def test_block_keys_name_the_whole_prefix():
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    b = [9, 9, 9, 9, 5, 6, 7, 8]  # the same second block after a different first one
    ka, kb = keys_of(a, 4), keys_of(b, 4)
    assert len(ka) == 2 and len(set(ka)) == 2 and all(len(k) == 32 for k in ka)
    assert ka[1] != kb[1] and ka[0] != kb[0]
    assert keys_of(a + [1, 2, 3, 4], 4)[:2] == ka
    grown = extend_block_keys(list(ka[:1]), lambda lo, hi: a[lo:hi], 4, 2)  # extended in place, from the last key
    assert grown == ka
    assert keys_of([1, 2, 3, 5], 4) != keys_of([1, 2, 3, 4], 4)


def test_sequence_token_ranges_cross_the_prompt_output_boundary():
    seq = Sequence("s", "r", 0, [5, 6, 7], SamplingParams(), max_tokens=4, output_token_ids=[8, 9])
    every = seq.all_token_ids
    for lo in range(6):
        for hi in range(lo, 6):
            assert seq.token_ids_between(lo, hi) == every[lo:hi]


# ---------------------------------------------------------------------- the manager
def test_hit_adopts_blocks_of_both_pools_and_shares_them():
    kv = KVCacheManager(block_size=4, num_full_blocks=20, num_sliding_blocks=20, sliding_window=8,
                        prefix_caching=True)  # a hit needs the last 2 blocks in the sliding pool
    d = Driver(kv)
    tokens = list(range(100, 122))  # 22 tokens: 5 whole blocks
    assert d.admit("a", tokens, 22) == 0
    full_a, sliding_a = list(kv.tables("a").full), list(kv.tables("a").sliding)
    # the chunk's last window needs blocks 3-5; blocks 0-2, which no later query sees, were written for the cache
    # (and let go once registered)
    assert (kv.full.num_cached, kv.sliding.num_cached) == (5, 5)
    assert sliding_a[:3] == [-1] * 3 and kv.sliding.num_used == 3
    assert d.admit("b", tokens + [7], 23) == 20  # 5 blocks cached; the window tail (blocks 3, 4) in the sliding pool
    tb = kv.tables("b")
    assert tb.full[:5] == full_a[:5] and tb.full[5] != full_a[5]
    assert tb.sliding[:3] == [-1] * 3 and tb.sliding[3:5] == sliding_a[3:5] and tb.sliding[5] != sliding_a[5]
    assert kv.full.holders(full_a[0]) == {"a", "b"} and kv.full.holders(tb.full[5]) == {"b"}
    used = kv.full.num_used
    d.free("a")
    assert kv.full.num_used == used - 1  # only a's partial last block was a's alone
    d.free("b")
    assert kv.full.num_free == kv.full.num_blocks and kv.full._holders == {} and kv.sliding._holders == {}
    assert kv.full.num_cached == 5  # cached blocks stay, evictable
    d.check_cached_blocks([tokens + [7]])


def test_an_empty_table_looked_at_before_admission_adopts_like_none():
    kv = KVCacheManager(block_size=4, num_full_blocks=20, num_sliding_blocks=20, sliding_window=8,
                        prefix_caching=True)
    d = Driver(kv)
    tokens = list(range(100, 122))
    d.admit("a", tokens, 22)
    kv.tables("b")  # e.g. asked for its capacity while it waited
    assert d.admit("b", tokens + [7], 23) == 20
    t = kv.tables("b")
    assert len(t.full) == 6 and len(t.sliding) == 6 and t.sliding[:3] == [-1] * 3 and -1 not in t.sliding[3:]


def test_hit_needs_the_window_tail_in_the_sliding_pool():
    kv = KVCacheManager(block_size=4, num_full_blocks=20, num_sliding_blocks=20, sliding_window=8, prefix_caching=True)
    d = Driver(kv)
    tokens = list(range(100, 122))
    d.admit("a", tokens, 22)
    d.free("a")
    keys = keys_of(tokens, 4)
    assert kv.cached_prefix(keys) == 5
    # a hit after m blocks needs blocks m - 2 and m - 1 (what the query at 4m sees: 4m - 7 .. 4m) in the sliding pool
    kv.sliding.unregister(kv.sliding.lookup(keys[4]))
    assert kv.full.lookup(keys[4]) is not None and kv.cached_prefix(keys) == 4
    kv.sliding.unregister(kv.sliding.lookup(keys[2]))
    assert kv.cached_prefix(keys) == 2
    kv.full.unregister(kv.full.lookup(keys[1]))  # the full pool bounds the prefix as well
    assert kv.cached_prefix(keys) == 1


def test_short_prefixes_hit_without_a_full_window():
    kv = KVCacheManager(block_size=4, num_full_blocks=20, num_sliding_blocks=20, sliding_window=32, prefix_caching=True)
    d = Driver(kv)
    tokens = list(range(50, 60))  # 2 whole blocks, shorter than the window
    d.admit("a", tokens, 10)
    assert d.admit("b", tokens[:8] + [1, 2, 3], 11) == 8
    assert d.admit("c", tokens[:4] + [1, 2, 3, 4, 5], 9) == 4
    assert d.admit("d", [1] + tokens[1:], 10) == 0  # the first token differs: every key differs


def test_blocks_behind_the_window_go_to_the_cache_and_are_never_rewritten():
    kv = KVCacheManager(block_size=4, num_full_blocks=0, num_sliding_blocks=6, sliding_window=8,
                        has_full_layers=False, prefix_caching=True)
    d = Driver(kv)
    tokens = list(range(30, 60))
    d.admit("a", tokens[:12], 12)  # blocks 0-2, registered; block 0 is let go then (position 12 sees 5..12)
    assert kv.tables("a").sliding[0] == -1 and kv.sliding.lookup(keys_of(tokens, 4)[0]) is not None
    d.tokens["a"] = list(tokens)
    for _ in range(3):  # positions 12-14: block 3
        assert d.step("a", 1)
    old = kv.tables("a").sliding[1]
    assert kv.allocate("a", 16)  # position 15 sees 8..15: block 1 is let go (when its step is allocated)
    t = kv.tables("a")
    assert t.sliding[:2] == [-1, -1] and old not in t.sliding
    assert kv.sliding.holders(old) == frozenset() and kv.sliding.is_registered(old)
    # nothing is held back: every block nobody holds can be taken at once (the never-registered first)
    assert kv.sliding.num_used == 2 and kv.sliding.num_allocatable == 4
    assert kv.sliding.lookup(keys_of(tokens, 4)[1]) == old
    d.run("a", 1)  # a reads its context 8..14 through blocks 2 and 3 (checked by the model)
    d.check_cached_blocks([tokens])


def test_a_long_chunk_takes_blocks_for_the_cache_with_what_is_left():
    kv = KVCacheManager(block_size=4, num_full_blocks=0, num_sliding_blocks=6, sliding_window=8,
                        has_full_layers=False, prefix_caching=True)
    d = Driver(kv)
    tokens = list(range(100, 132))  # 8 whole blocks in one chunk; its last window needs blocks 6 and 7
    d.admit("a", tokens, 32)  # 4 blocks are left for the others: the latest ones, 2-5
    keys = keys_of(tokens, 4)
    assert [kv.sliding.lookup(k) is not None for k in keys] == [False, False, True, True, True, True, True, True]
    assert kv.sliding.num_used == 2 and held_entries(kv.tables("a").sliding) == {6, 7}  # let go once registered
    d.check_cached_blocks([tokens])
    assert d.admit("b", tokens[:21], 21) == 20  # a hit after 5 blocks reads the cached blocks 3 and 4
    off = KVCacheManager(block_size=4, num_full_blocks=0, num_sliding_blocks=6, sliding_window=8,
                         has_full_layers=False)
    Driver(off).admit("a", tokens, 32)
    t = off.tables("a").sliding  # without caching: blocks for the last window only, nothing written before it
    assert t[:6] == [-1] * 6 and off.sliding.num_used == 2 and off.sliding.num_cached == 2


def test_a_chunk_never_waits_for_blocks_only_the_cache_would_read():
    kv = KVCacheManager(block_size=4, num_full_blocks=0, num_sliding_blocks=6, sliding_window=8,
                        has_full_layers=False, prefix_caching=True)
    d = Driver(kv)
    others = kv.sliding.allocate(3, "x")  # another sequence holds half the pool
    tokens = list(range(100, 132))
    assert d.admit("a", tokens, 32) == 0  # blocks 6 and 7 needed; 1 left for the cache: the latest, block 5
    assert [kv.sliding.lookup(k) is not None for k in keys_of(tokens, 4)] == [False] * 5 + [True] * 3
    d.check_cached_blocks([tokens])
    kv.sliding.free(others, "x")


def test_blocks_for_the_cache_never_take_a_block_another_sequence_of_the_step_needs():
    """A long chunk's cache-only blocks are taken at the end of the step's allocations, from what is left."""
    kv = KVCacheManager(block_size=4, num_full_blocks=0, num_sliding_blocks=6, sliding_window=8,
                        has_full_layers=False, prefix_caching=True)
    assert kv.allocate("a", 32)  # blocks 6 and 7 needed (its last window); 0-5 only for the cache
    assert kv.allocate("b", 8)  # the 2 blocks b needs are still there
    kv.fill_for_cache()
    t = kv.tables("a").sliding
    assert t[:4] == [-1] * 4 and min(t[4:]) >= 0 and kv.sliding.num_allocatable == 0  # the latest two, 5 and 4
    changes, _ = kv.take_changes()
    assert changes["a"].sliding == t  # the runner is told the blocks filled at the end


def test_a_chunk_from_inside_a_block_writes_only_the_blocks_it_holds():
    """A long chunk that starts inside a block and gets only some of its cache-only blocks: a block without one lies
    between two it writes (found by the state machine: window 1, block 2)."""
    kv = KVCacheManager(block_size=2, num_full_blocks=8, num_sliding_blocks=4, sliding_window=1, prefix_caching=True)
    d = Driver(kv)
    tokens = list(range(10, 21))
    d.admit("a", tokens, 1)
    assert d.step("a", 1) and d.step("a", 1)  # positions 1, 2: block 1 holds position 2, and will hold 3
    assert kv.allocate("a", 11)  # positions 3-10: block 1 (position 3), none left for block 2, blocks 3-5
    kv.fill_for_cache()  # the end of the step's allocations
    t = kv.tables("a").sliding
    assert t[0] == t[2] == -1 and min(t[1], t[3], t[4], t[5]) >= 0
    d.run("a", 8)  # the model checks every write is in a block the sequence holds
    d.check_cached_blocks([tokens])


def test_a_dropped_block_stays_cached_until_a_sequence_needs_its_block():
    kv = KVCacheManager(block_size=4, num_full_blocks=0, num_sliding_blocks=6, sliding_window=8,
                        has_full_layers=False, prefix_caching=True)
    d = Driver(kv)
    a, b = list(range(30, 60)), list(range(60, 90))
    d.admit("a", a, 12)
    d.admit("b", b, 8)
    assert kv.allocate("a", 13)  # a lets go of its registered block 0 (to the cache) and takes the last free block
    assert kv.sliding.lookup(keys_of(a, 4)[0]) is not None
    assert kv.allocate("b", 9)  # b needs a block: the cached one is evicted, never one a sequence holds
    assert kv.sliding.num_allocatable == 0 and kv.sliding.num_used == 6
    ka = keys_of(a, 4)
    assert kv.sliding.lookup(ka[0]) is None and kv.sliding.lookup(ka[1]) is not None


@pytest.mark.parametrize("num_sliding", [8, 4])
def test_adopting_a_block_its_holder_lets_go_of_in_the_same_step(num_sliding):
    """b adopts block 1 in the step in which a's window moves past it: b shares the cached block, a no longer reads
    it, nobody writes it. With 4 blocks there is no block left for b's next position, and b waits."""
    kv = KVCacheManager(block_size=4, num_full_blocks=0, num_sliding_blocks=num_sliding, sliding_window=8,
                        has_full_layers=False, prefix_caching=True)
    d = Driver(kv)
    tokens = list(range(30, 60))
    d.admit("a", tokens[:12], 12)  # blocks 0-2, registered (block 0 let go: cached)
    d.tokens["a"] = list(tokens)
    for _ in range(3):  # positions 12-14: block 3
        assert d.step("a", 1)
    first = kv.tables("a").sliding[1]
    assert kv.allocate("a", 16)  # position 15 sees 8..15: a lets go of block 1, to the cache
    admitted = d.admit("b", tokens[:9], 9, within_step=True)  # b adopts blocks 0 and 1 in the same step
    d.run("a", 1)  # a reads its context 8..14 (blocks 2 and 3)
    if num_sliding == 4:
        assert admitted is None and not kv.has("b")
        d.check_cached_blocks([tokens])
        return
    assert admitted == 8
    assert kv.tables("a").sliding[1] == -1 and kv.tables("b").sliding[1] == first
    assert kv.sliding.holders(first) == {"b"} and kv.sliding.is_registered(first)
    d.run("b", 1)  # reads blocks 0 and 1 as context: nobody wrote into them
    d.tokens["b"] = list(tokens)  # b goes on with the same tokens
    d.check_cached_blocks([tokens])
    assert d.step("a", 3) and d.step("b", 3)
    d.check_cached_blocks([tokens])


def test_a_shared_block_is_never_written():
    kv = KVCacheManager(block_size=4, num_full_blocks=30, num_sliding_blocks=30, sliding_window=8, prefix_caching=True)
    d = Driver(kv)
    tokens = list(range(10, 40))
    d.admit("a", tokens, 17)  # 4 whole blocks
    assert d.admit("b", tokens[:17], 17) == 16
    shared = kv.tables("b").sliding[2]  # block 2, held by a and b
    assert kv.sliding.holders(shared) == {"a", "b"}
    for _ in range(8):  # b decodes past it: the entry gets a new block, a keeps the shared one
        d.tokens["b"] = d.tokens["b"] + [random.Random(0).randrange(100)]
        assert d.step("b", 1)
    assert kv.sliding.holders(shared) == {"a"} and shared not in kv.tables("b").sliding
    d.check_cached_blocks([tokens, d.tokens["b"]])
    assert d.admit("c", tokens[:17], 17) == 16  # a's blocks are intact: a new sequence still hits them


def test_a_shared_block_is_never_let_go_of_to_make_room():
    kv = KVCacheManager(block_size=4, num_full_blocks=0, num_sliding_blocks=3, sliding_window=8,
                        has_full_layers=False, prefix_caching=True)
    d = Driver(kv)
    tokens = list(range(10, 30))
    d.admit("a", tokens[:12], 12)  # holds blocks 1 and 2; block 0, written for the cache, let go
    assert d.admit("b", tokens[:13], 13) == 12  # adopts blocks 1 and 2; block 3 evicts the cached block 0
    assert kv.sliding.num_allocatable == 0
    d.tokens["b"] = list(tokens)  # b decodes on with the same tokens
    for _ in range(13, 16):
        assert d.step("b", 1)
    # at position 15 b let go of block 1 (it sees 8..15); a still holds it, so that made no room
    assert kv.sliding.holders(kv.tables("a").sliding[1]) == {"a"} and kv.sliding.num_allocatable == 0
    assert not d.step("b", 1)  # block 4 has no block
    d.free("b")
    d.tokens["a"] = list(tokens)
    assert d.step("a", 1) and d.step("a", 3)  # a goes on, reading its blocks 1 and 2 (checked by the model)
    d.check_cached_blocks([tokens])


def test_least_recently_released_blocks_are_evicted_first():
    kv = KVCacheManager(block_size=4, num_full_blocks=6, num_sliding_blocks=6, sliding_window=4, prefix_caching=True)
    d = Driver(kv)
    a, b = list(range(10, 19)), list(range(40, 49))  # 2 whole blocks each
    d.admit("a", a, 9)
    d.admit("b", b, 9)
    d.free("a")
    d.free("b")
    assert kv.full.num_cached == 4
    d.admit("c", list(range(70, 82)), 12)  # 3 blocks: the two never cached (a's and b's last), then a's first
    ka, kb = keys_of(a, 4), keys_of(b, 4)
    assert kv.full.lookup(ka[0]) is None and kv.full.lookup(kb[0]) is not None
    assert kv.cached_prefix(ka) == 0 and kv.cached_prefix(kb) == 2


def test_failed_allocation_with_a_prefix_changes_nothing():
    kv = KVCacheManager(block_size=4, num_full_blocks=4, num_sliding_blocks=10, sliding_window=8, prefix_caching=True)
    d = Driver(kv)
    tokens = list(range(10, 19))
    d.admit("a", tokens, 9)
    d.free("a")
    before = (kv.full.num_allocatable, kv.full.num_cached, dict(kv.full._evictable))
    keys = keys_of(tokens, 4)
    assert kv.allocate("b", 8 + 9, keys[:2]) is False  # 5 blocks > 4
    assert (kv.full.num_allocatable, kv.full.num_cached, dict(kv.full._evictable)) == before
    assert not kv.has("b") or kv.tables("b").full == []
    with pytest.raises(ValueError, match="at least one token"):
        kv.allocate("b", 8, keys[:2])


def test_reset_forgets_every_key():
    kv = KVCacheManager(block_size=4, num_full_blocks=10, num_sliding_blocks=10, sliding_window=8, prefix_caching=True)
    d = Driver(kv)
    tokens = list(range(10, 19))
    d.admit("a", tokens, 9)
    d.admit("b", tokens, 9)
    d.free("a")
    kv.reset_prefix_cache()
    assert kv.full.num_cached == kv.sliding.num_cached == 0 and kv.cached_prefix(keys_of(tokens, 4)) == 0
    d.free("b")
    assert kv.full.num_allocatable == kv.full.num_blocks and kv.sliding.num_allocatable == kv.sliding.num_blocks


class PrefixCacheMachine(RuleBasedStateMachine):
    """Random sequences over a few shared prefixes, computed in random chunks, freed at random; every context
    read is checked against what was written, every registered block against its key."""

    @initialize(block_size=st.integers(1, 5), window=st.integers(1, 20), num_full=st.integers(8, 40),
                num_sliding=st.integers(4, 30), kinds=st.sampled_from([(True, True), (True, False), (False, True)]))
    def setup(self, block_size, window, num_full, num_sliding, kinds):
        self.kv = KVCacheManager(block_size, num_full, num_sliding, window, has_full_layers=kinds[0],
                                 has_sliding_layers=kinds[1], prefix_caching=True)
        self.d = Driver(self.kv)
        rng = random.Random(block_size * 1000 + window)
        self.stems = [[rng.randrange(4) for _ in range(40)] for _ in range(3)]
        self.seen: list[list[int]] = []
        self.count = 0
        self.hits = 0

    @rule(stem=st.integers(0, 2), cut=st.integers(0, 40), tail=st.lists(st.integers(0, 3), max_size=12),
          chunk=st.integers(1, 30))
    def admit(self, stem, cut, tail, chunk):
        tokens = self.stems[stem][:cut] + tail
        if not tokens or self.kv.fits_ever(len(tokens)) is not None:
            return
        seq = f"s{self.count}"
        self.count += 1
        got = self.d.admit(seq, tokens, chunk)
        if got is not None:
            self.seen.append(tokens)
            self.hits += got

    @precondition(lambda self: self.d.tokens)
    @rule(data=st.data(), n=st.integers(1, 12))
    def compute(self, data, n):
        seq = data.draw(st.sampled_from(sorted(self.d.tokens)))
        tokens = self.d.tokens[seq]
        if self.d.computed[seq] + n > len(tokens):  # decode past the prompt: new tokens from a tiny alphabet
            tokens.extend(data.draw(st.lists(st.integers(0, 3), min_size=self.d.computed[seq] + n - len(tokens),
                                             max_size=self.d.computed[seq] + n - len(tokens))))
        if self.kv.fits_ever(len(tokens)) is not None:
            return
        self.d.step(seq, n)
        self.seen.append(list(tokens))

    @precondition(lambda self: self.d.tokens)
    @rule(data=st.data())
    def free(self, data):
        self.d.free(data.draw(st.sampled_from(sorted(self.d.tokens))))

    @invariant()
    def blocks_accounted_and_cache_truthful(self):
        kv = self.kv
        for pool_name in ("full", "sliding"):
            pool = getattr(kv, pool_name)
            held = {b for t in getattr(kv, f"{pool_name}_manager").tables.values() for b in t if b >= 0}
            assert set(pool._holders) == held
            idle = set(range(pool.num_blocks)) - held
            parked = set(pool._free) | set(pool._evictable)
            assert parked <= idle and not set(pool._free) & set(pool._evictable)
            assert idle == parked  # nothing held back
            assert set(pool._evictable) <= set(pool._key_of) and not set(pool._free) & set(pool._key_of)
            assert {pool._block_of[k] for k in pool._key_of.values()} == set(pool._key_of)
            assert pool.num_used + pool.num_free == pool.num_blocks
        self.d.check_cached_blocks(self.seen)

    def teardown(self):
        if hasattr(self, "kv"):
            for seq in list(self.d.tokens):
                self.d.free(seq)
            for pool in (self.kv.full, self.kv.sliding):
                assert pool.num_allocatable == pool.num_blocks and pool._holders == {}


PrefixCacheMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=30, deadline=None,
                                                database=None, suppress_health_check=[HealthCheck.too_slow])
TestPrefixCacheMachine = PrefixCacheMachine.TestCase


# ---------------------------------------------------------------------- the engine
def check_against_reference(model, prompts, outputs, tol=1e-4):
    """Each generated token's logprob equals the whole-sequence forward's at that position."""
    for prompt, out in zip(prompts, outputs):
        c = out.outputs[0]
        ref = reference_logprobs(model, prompt + c.token_ids)
        for i, (token, lps) in enumerate(zip(c.token_ids, c.logprobs)):
            assert lps[token].logprob == pytest.approx(ref[len(prompt) + i - 1, token].item(), abs=tol)


@pytest.mark.parametrize("block_size,budget,num_kv_blocks,lookahead", [
    (4, 7, None, False),  # chunked prefill: windows move on inside a prompt
    (2, 2048, 60, True),  # tight pools: evictions, preemptions, look-ahead decoding
    (3, 16, 100, False),  # a block size that divides neither the window nor the chunks
])
def test_cached_runs_give_the_reference_logprobs(block_size, budget, num_kv_blocks, lookahead):
    model = tiny_model(sliding_window=16)
    rng = random.Random(block_size)
    stem = random_prompts([70], seed=block_size)[0]
    prompts = [stem[:rng.randrange(10, 70)] + random_prompts([rng.randrange(1, 12)], seed=100 + i)[0]
               for i in range(10)]
    sp = SamplingParams(max_tokens=10, temperature=0, logprobs=0, ignore_eos=True)
    llm = LLM(model, block_size=block_size, max_num_batched_tokens=budget, num_kv_blocks=num_kv_blocks,
              async_scheduling=lookahead, max_num_seqs=4, max_model_len=160)
    outs = []
    for i in range(0, len(prompts), 3):  # in groups: a later group hits what an earlier one computed
        outs += llm.generate(prompt_token_ids=prompts[i:i + 3], sampling_params=sp)
    # the next turn of three conversations: the whole earlier turn (prompt and answer) is a prefix
    follow = [p + o.outputs[0].token_ids + [17, 18, 19] for p, o in zip(prompts[-3:], outs[-3:])]
    follow_outs = llm.generate(prompt_token_ids=follow, sampling_params=sp)
    stats = llm.engine.stats()["prefix_cache"]
    assert stats["hit_tokens"] > 0 and 0 < stats["hit_rate"] < 1
    if num_kv_blocks is None or num_kv_blocks >= 100:  # room to keep them: each next turn hits its earlier turn
        assert all(o.num_cached_tokens > len(p) // 2 for p, o in zip(prompts[-3:], follow_outs))
    else:  # 120 token slots for four running sequences of up to 100: the cache is evicted, sequences preempted
        assert llm.engine.stats()["num_preemptions"] > 0
    check_against_reference(model, prompts + follow, outs + follow_outs)
    off = LLM(model, block_size=block_size, max_num_batched_tokens=budget, num_kv_blocks=num_kv_blocks,
              enable_prefix_caching=False, max_num_seqs=4, max_model_len=160)
    plain = off.generate(prompt_token_ids=prompts + follow, sampling_params=sp)
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in outs + follow_outs]
    assert off.engine.stats()["prefix_cache"]["hit_tokens"] == 0 and off.engine.kv.full.num_cached == 0
    assert_pools_free(llm.engine)


def test_prompt_logprobs_and_n_with_a_cached_prompt():
    model = tiny_model(sliding_window=16)
    prompt = random_prompts([40], seed=3)[0]
    llm = LLM(model, block_size=4, max_num_seqs=8)
    llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=2))
    # prompt logprobs need every position: no hit, and the values are the reference's
    (out,) = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0))
    assert out.num_cached_tokens == 0
    ref = reference_logprobs(model, prompt)
    for p in range(1, len(prompt)):
        assert out.prompt_logprobs[p][prompt[p]].logprob == pytest.approx(ref[p - 1, prompt[p]].item(), abs=1e-4)
    # n = 3 samples of a cached prompt: each sequence adopts the prefix
    (many,) = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(n=3, max_tokens=6, seed=5,
                                                                                    temperature=1.0))
    assert many.num_cached_tokens == 36 and len(many.outputs) == 3
    (alone,) = LLM(model, block_size=4, enable_prefix_caching=False).generate(
        prompt_token_ids=[prompt], sampling_params=SamplingParams(n=3, max_tokens=6, seed=5, temperature=1.0))
    assert [c.token_ids for c in many.outputs] == [c.token_ids for c in alone.outputs]
    llm.reset_prefix_cache()
    (again,) = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=1))
    assert again.num_cached_tokens == 0
    assert_pools_free(llm.engine)


def test_the_samples_of_one_request_compute_its_prompt_once():
    """n = 4: the first sequence computes the prompt, the three others wait for its blocks and adopt them."""
    model = tiny_model(sliding_window=16)
    prompt = random_prompts([200], seed=3)[0]
    sp = SamplingParams(n=4, max_tokens=8, seed=7, temperature=1.0)
    outs, computed = {}, {}
    for caching in (True, False):
        llm = LLM(model, block_size=4, enable_prefix_caching=caching, max_num_batched_tokens=64)
        (outs[caching],) = llm.generate(prompt_token_ids=[prompt], sampling_params=sp)
        computed[caching] = llm.engine.stats()["num_prompt_tokens"]
    assert computed == {True: 200 + 3 * 4, False: 4 * 200}  # each other sample computes only the partial block
    assert outs[True].num_cached_tokens == 196
    assert [c.token_ids for c in outs[True].outputs] == [c.token_ids for c in outs[False].outputs]


def test_cache_salt_keeps_requests_apart():
    from trinity.engine import EngineConfig, LLMEngine

    engine = LLMEngine(tiny_model(sliding_window=16), None, EngineConfig(block_size=4))
    prompt = random_prompts([30], seed=4)[0]

    def cached(request_id, salt):
        engine.add_request(request_id, prompt_token_ids=prompt, params=SamplingParams(max_tokens=1),
                           cache_salt=salt)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    return out.num_cached_tokens

    assert cached("a1", "tenant-a") == 0
    assert cached("b1", "tenant-b") == 0  # the same tokens under another salt: nothing shared
    assert cached("none", None) == 0
    assert cached("a2", "tenant-a") == 28 and cached("b2", "tenant-b") == 28 and cached("none2", None) == 28


def test_benchmark_script_runs_and_agrees():
    """benchmarks/prefix_cache.py at a small size: hits where the prompts share blocks, none where they do not,
    and the same answers with and without the cache."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "benchmarks/prefix_cache.py", "--system", "300", "--question", "8",
                          "--answer", "2", "--requests", "2", "--turns", "2", "--threads", "1"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["shared_prefix"]["cached_tokens"] == [288, 288]  # 300 // 16 blocks of the system prompt
    assert out["multi_turn"]["cached_tokens"][1] == 512
    assert out["no_reuse"]["cached_tokens"] == [0, 0]
    assert all(out[k]["same_answers"] == "2/2" for k in ("shared_prefix", "multi_turn", "no_reuse"))
