"""Block pools for the paged KV cache, with automatic prefix caching (plain Python, no torch).

Trinity has two kinds of attention layer, so two pools, each with its manager (`PoolManager`, vLLM's shape: one
manager per attention type). In both, a sequence's block table is indexed by block index (position // block_size),
-1 where it holds no block:
- the *full* pool serves full-attention layers: a sequence holds every block, ceil(len / block_size);
- the *sliding* pool serves sliding-window layers: a sequence holds only the blocks a query can still see. When it
  allocates for a step whose first new position is s (and, with prefix caching, once a step's blocks are
  registered), the blocks entirely before s + 1 - window are let go (their entries become -1); a block is never
  rewritten in place. A decoding sequence holds `window_blocks` blocks at most (the most that `window` consecutive
  positions touch); most decode steps neither take nor let go of a block, and cost two comparisons.
All layers of one kind share a sequence's block table; each layer has its own tensor in that pool.

A step computing positions s..e-1 needs blocks for the last `window` of them (what its own last query and later
queries see; all of them in the full pool) and keeps those of the positions before s that its first query sees.
The earlier whole blocks of a chunk longer than the window are written only for the prefix cache: with caching on
a step takes them best effort, the latest first, at the end of the step's allocations (`fill_for_cache`), from
what every sequence of the step left (a long chunk never waits for them, nor takes a block another one needs);
without caching they get no block (-1) and the runner does not write them. So a prefilling sequence holds up to
its first query's context plus a window of new blocks (`blocks_for`), and the cache-only blocks until the step is
launched and they are registered.

Nothing is held back between steps: a block let go when allocating step N + 1 is not read by its sequence in that
step, another holder keeps it alive by its count, and a new owner's writes come after step N's reads in stream
order.

Prefix caching. Once every token of a block is computed, the block can be *registered* under a key naming
its tokens and all tokens before it (a SHA-256 chain: a prompt cannot be built to collide with another
user's and read their cache). A registered block is never written again. When nobody holds it any more (its
sequence finished, or moved its window past it) it stays in the pool, *evictable*, until an allocation runs out of
never-registered free blocks and takes the least recently released one. A new sequence whose tokens start with
registered blocks adopts them instead of computing them. A hit after m blocks needs, in each pool, the blocks the
next query sees: all m in the full pool, only the last ceil((window - 1) / block_size) in the sliding pool.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .kv_layout import KVLayout
from .step import TableChanges


def extend_block_keys(keys: list[bytes], tokens_between, block_size: int, num_blocks: int,
                      salt: str | None = None) -> list[bytes]:
    """Extend `keys` in place to the keys of the first `num_blocks` blocks; `tokens_between(lo, hi)` gives tokens
    lo..hi-1. Key j is SHA-256(key j-1 + tokens of block j): it names the whole prefix, not only the block. A
    `salt` starts the chain elsewhere: only requests with the same salt share blocks."""
    parent = keys[-1] if keys else (b"" if salt is None else hashlib.sha256(b"salt\0" + salt.encode()).digest())
    for j in range(len(keys), num_blocks):
        tokens = array("q", tokens_between(j * block_size, (j + 1) * block_size))
        parent = hashlib.sha256(parent + tokens.tobytes()).digest()
        keys.append(parent)
    return keys


class BlockPool:
    """A fixed set of block ids. Each block is held by one or more sequences (shared only through the prefix
    cache), or nobody holds it and it is free or evictable (registered)."""

    def __init__(self, name: str, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"{name} pool: num_blocks = {num_blocks} must be >= 0")
        self.name = name
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # nobody holds them, never registered
        self._evictable: OrderedDict[int, None] = OrderedDict()  # nobody holds them, registered; oldest first
        self._holders: dict[int, set[str]] = {}
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    # ------------------------------------------------------------------ counts
    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return len(self._holders)

    @property
    def num_free(self) -> int:
        """Blocks nobody holds (free or evictable)."""
        return self.num_blocks - len(self._holders)

    @property
    def num_allocatable(self) -> int:
        """Blocks an allocation can take now: the free ones, then the evictable ones."""
        return len(self._free) + len(self._evictable)

    def num_evictable_among(self, blocks) -> int:
        """How many of these blocks an allocation could take now (cached, nobody holds them): adopting them takes
        them out of `num_allocatable`."""
        return sum(1 for b in blocks if b in self._evictable)

    @property
    def num_cached(self) -> int:
        """Registered blocks, held or not."""
        return len(self._key_of)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks if self.num_blocks else 0.0

    # ------------------------------------------------------------------ holding
    def allocate(self, n: int, owner: str) -> list[int]:
        if not n:
            return []
        if n > self.num_allocatable:
            raise MemoryError(f"{self.name} pool: {n} blocks wanted, {self.num_allocatable} free")
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:  # the least recently released cached block gives up its key
                b, _ = self._evictable.popitem(last=False)
                self.unregister(b)
            self._holders[b] = {owner}
            blocks.append(b)
        return blocks

    def share(self, block: int, owner: str) -> None:
        """`owner` holds a registered block too (a prefix-cache hit)."""
        if block not in self._key_of:
            raise RuntimeError(f"{self.name} pool: block {block} is not cached and cannot be shared")
        holders = self._holders.setdefault(block, set())
        if owner in holders:
            raise RuntimeError(f"{self.name} pool: {owner!r} already holds block {block}")
        self._evictable.pop(block, None)
        holders.add(owner)

    def free(self, blocks: Sequence[int], owner: str) -> None:
        """`owner` lets go of the blocks: one nobody holds any more is free, or evictable when registered."""
        for b in blocks:
            holders = self._holders.get(b)
            if not holders or owner not in holders:
                raise RuntimeError(f"{self.name} pool: block {b} freed by {owner!r} but held by "
                                   f"{sorted(holders) if holders else None!r}")
            holders.remove(owner)
            if not holders:
                del self._holders[b]
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def holders(self, block: int) -> frozenset[str]:
        return frozenset(self._holders.get(block, ()))

    def owner(self, block: int) -> str | None:
        """The one sequence holding a block (None when nobody, or several, hold it)."""
        holders = self._holders.get(block)
        return next(iter(holders)) if holders and len(holders) == 1 else None

    # ------------------------------------------------------------------ the cache
    def register(self, block: int, key: bytes) -> None:
        """Name a held, fully computed block by its key. If another block already has that key (two sequences
        computed the same prefix at once) the first one keeps it and this one stays private."""
        if block not in self._holders:
            raise RuntimeError(f"{self.name} pool: block {block} is registered but nobody holds it")
        if key in self._block_of or block in self._key_of:
            return
        self._block_of[key] = block
        self._key_of[block] = key

    def unregister(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key]

    def lookup(self, key: bytes) -> int | None:
        return self._block_of.get(key)

    def is_registered(self, block: int) -> bool:
        return block in self._key_of

    def reset_cache(self) -> None:
        """Forget every key. Held blocks stay with their sequences (they become private); the others are free."""
        for b in list(self._key_of):
            self.unregister(b)
        self._free.extend(self._evictable)
        self._evictable.clear()


def _cached(pool: BlockPool, key: bytes) -> int:
    block = pool.lookup(key)
    if block is None:
        raise RuntimeError(f"{pool.name} pool: a block of the cached prefix is no longer cached")
    return block


class PoolManager:
    """One pool's blocks for every sequence (vLLM's single-type manager). A table is indexed by block index, -1 where
    the sequence holds no block. Full attention (`sliding` False) holds every block; a sliding window only those a
    query can still see. One class serves both: a full layer's window never moves on.

    A step's allocation is `fits` (nothing changes), then `allocate`, so that the manager can check every pool
    before it changes any."""

    def __init__(self, name: str, pool: BlockPool, layout: KVLayout, sliding: bool):
        self.name = name
        self.pool = pool
        self.layout = layout
        self.sliding = sliding
        self.tables: dict[str, list[int]] = {}
        self._first: dict[str, int] = {}  # entries before it hold no block (let go, or before an adopted prefix)

    def first_block(self, position: int) -> int:
        """The first block a query at `position` sees."""
        return self.layout.first_block(position, self.sliding)

    def hit_blocks(self, m: int) -> int:
        """How many of a cached prefix's m blocks a hit needs (its last ones): those the next query sees."""
        return m - self.first_block(m * self.layout.block_size)

    def held(self, seq_id: str) -> list[int]:
        table = self.tables.get(seq_id, ())
        return [b for b in table[self._first.get(seq_id, 0):] if b >= 0]

    def _adopted(self, prefix: Sequence[bytes]) -> tuple[int, list[int]]:
        """(first entry, blocks from it on) a sequence adopting `prefix` takes from the cache."""
        lo = self.first_block(len(prefix) * self.layout.block_size)
        return lo, [_cached(self.pool, k) for k in prefix[lo:]]

    def _needed_from(self, num_held: int, end: int) -> int:
        """The first new entry a step ending at `end` must hold a block for: those of its last `window` positions
        (what its last query sees, and later queries); the entries before it (only with a window shorter than the
        step) are written for the prefix cache alone."""
        return max(num_held, self.first_block(end - 1))

    def fits(self, seq_id: str, start: int, end: int, prefix: Sequence[bytes]) -> bool:
        """Whether the blocks a step computing positions start..end-1 needs are there (net of those it lets go)."""
        pool = self.pool
        if prefix:
            _, adopted = self._adopted(prefix)
            room, held = pool.num_allocatable - pool.num_evictable_among(adopted), len(prefix)
        else:
            table = self.tables.get(seq_id, [])
            gone = table[self._first.get(seq_id, 0):self.first_block(start)]
            room, held = pool.num_allocatable + sum(1 for b in gone if b >= 0 and pool.owner(b) == seq_id), len(table)
        return self.layout.num_blocks(end) - self._needed_from(held, end) <= room

    def allocate(self, seq_id: str, start: int, end: int, prefix: Sequence[bytes]) -> tuple[list[int], range]:
        """Take the blocks of a step computing positions start..end-1 (`fits` said they are there), after adopting
        `prefix` or letting go of the blocks before the step's first query's window; -> (the entries appended to
        the table, -1 where no block is taken; the entries of a long chunk's positions that only the prefix cache
        would read, left -1 here: `fill_for_cache` may give them blocks once the step has what it needs)."""
        pool = self.pool
        if prefix:
            lo, adopted = self._adopted(prefix)
            for b in adopted:  # shared first: no allocation below may evict them
                pool.share(b, seq_id)
            table = self.tables[seq_id] = [-1] * lo + adopted
            self._first[seq_id] = lo
            old_len = 0
        else:
            table = self.tables.setdefault(seq_id, [])
            old_len = len(table)
            self.let_go(seq_id, start)
        needed_from = self._needed_from(len(table), end)
        new = pool.allocate(self.layout.num_blocks(end) - needed_from, seq_id)
        cache_only = range(len(table), needed_from)
        table += [-1] * len(cache_only) + new
        return table[old_len:], cache_only

    def fill_for_cache(self, seq_id: str, entries: range) -> list[tuple[int, int]]:
        """Blocks for these -1 entries (a long chunk's positions only the prefix cache reads), the latest first, as
        many as are left; -> (entry, block) for each taken."""
        table, taken = self.tables[seq_id], []
        for j in reversed(entries):
            if not self.pool.num_allocatable:
                break
            table[j] = self.pool.allocate(1, seq_id)[0]
            taken.append((j, table[j]))
        return taken

    def let_go(self, seq_id: str, start: int) -> int:
        """Free the blocks entirely before the window of a query at `start` (the sequence's next step's first);
        -> `quiet_until`."""
        table = self.tables.get(seq_id)
        first, keep = self._first.get(seq_id, 0), self.first_block(start)
        if table and keep > first:
            self.pool.free([b for b in table[first:keep] if b >= 0], seq_id)
            table[first:keep] = [-1] * (keep - first)
            self._first[seq_id] = keep
        return self.quiet_until(seq_id)

    def quiet_until(self, seq_id: str) -> int:
        """The last step start at which the sequence has nothing to let go (its first held block still seen)."""
        if not self.sliding:
            return 1 << 62
        return (self._first.get(seq_id, 0) + 1) * self.layout.block_size + self.layout.window - 2

    def free(self, seq_id: str) -> None:
        first = self._first.pop(seq_id, 0)
        table = self.tables.pop(seq_id, None)
        if table:
            self.pool.free([b for b in table[first:] if b >= 0], seq_id)

    def register(self, seq_id: str, keys: Sequence[bytes], lo: int, hi: int) -> None:
        """Offer the held blocks among entries lo..hi-1 (every token computed) to the cache."""
        table = self.tables.get(seq_id, ())
        for j in range(max(lo, self._first.get(seq_id, 0)), hi):
            if table[j] >= 0:
                self.pool.register(table[j], keys[j])


@dataclass(slots=True)
class _SeqState:
    num_tokens: int = 0  # tokens the last allocation made room for: the next step's first position
    room: int = 0  # tokens its tables have entries for
    quiet_until: int = 0  # the last step start at which it has no sliding block to let go
    registered: int = 0  # blocks below this index were offered to the cache


@dataclass(slots=True)
class BlockTables:
    """A sequence's tables (the managers' own lists): by block index, -1 where no block is held."""

    full: list[int] = field(default_factory=list)
    sliding: list[int] = field(default_factory=list)


class KVCacheManager:
    def __init__(self, block_size: int, num_full_blocks: int, num_sliding_blocks: int, sliding_window: int,
                 has_full_layers: bool = True, has_sliding_layers: bool = True, prefix_caching: bool = False):
        self.layout = KVLayout(block_size, sliding_window)
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.window_blocks = self.layout.window_blocks
        self.has_full = has_full_layers
        self.has_sliding = has_sliding_layers
        self.full = BlockPool("full", num_full_blocks if has_full_layers else 0)
        self.sliding = BlockPool("sliding", num_sliding_blocks if has_sliding_layers else 0)
        self.full_manager = PoolManager("full", self.full, self.layout, sliding=False)
        self.sliding_manager = PoolManager("sliding", self.sliding, self.layout, sliding=True)
        self._managers = [m for m, on in ((self.full_manager, has_full_layers),
                                          (self.sliding_manager, has_sliding_layers)) if on]
        self.prefix_caching = prefix_caching  # a long chunk's blocks that only the cache reads are taken only with it
        self._seqs: dict[str, _SeqState] = {}
        # What changed since `take_changes`, for the runner's own copy of the tables (the step contract)
        self._changes: dict[str, TableChanges] = {}
        self._freed: list[str] = []
        # (seq, its change, the change's index of table entry 0, the entries): what `fill_for_cache` may fill
        self._for_cache: list[tuple[str, TableChanges, int, range]] = []

    # ------------------------------------------------------------------ sizing
    def blocks_for(self, num_tokens: int) -> tuple[int, int]:
        """(full, sliding) blocks a sequence of `num_tokens` tokens may need at once: every block in the full pool;
        in the sliding pool at most a step's first query's context and the last window of its new positions."""
        n, bs = self.layout.num_blocks(num_tokens), self.block_size
        # kept for the first query (the blocks of the window - 1 positions before it, or of its own when that block
        # is partly written), and new blocks for the last `window` positions
        peak = (self.sliding_window + bs - 3) // bs + 1 + self.window_blocks
        return (n if self.has_full else 0, min(n, peak) if self.has_sliding else 0)

    def fits_ever(self, num_tokens: int) -> str | None:
        """None if a sequence of `num_tokens` could fit in an otherwise empty cache, else why not."""
        full, sliding = self.blocks_for(num_tokens)
        if full > self.full.num_blocks:
            return (f"{num_tokens} tokens need {full} blocks of the full-attention pool, which has "
                    f"{self.full.num_blocks} blocks of {self.block_size} tokens")
        if sliding > self.sliding.num_blocks:
            return (f"{num_tokens} tokens need {sliding} blocks of the sliding-window pool, which has "
                    f"{self.sliding.num_blocks} blocks of {self.block_size} tokens")
        return None

    # ------------------------------------------------------------------ per sequence
    def tables(self, seq_id: str) -> BlockTables:
        return BlockTables(self.full_manager.tables.get(seq_id, []), self.sliding_manager.tables.get(seq_id, []))

    def allocate(self, seq_id: str, num_tokens: int, cached_prefix: Sequence[bytes] = ()) -> bool:
        """Make room for the sequence's next step: positions (the tokens its last allocation made room for) ..
        num_tokens - 1; all or nothing. False when blocks run out. The sliding blocks before the step's first query's
        window are let go first (they count as room).

        `cached_prefix`: keys (from `cached_prefix`) of blocks the sequence adopts from the cache instead of
        computing them; only for a sequence that holds nothing yet."""
        state = self._seqs.get(seq_id)
        if cached_prefix:
            if state is not None and state.num_tokens:
                raise RuntimeError(f"{seq_id!r} already holds blocks: it cannot adopt a cached prefix")
            if num_tokens <= len(cached_prefix) * self.block_size:
                raise ValueError("a sequence adopting a cached prefix must compute at least one token after it")
        elif state is not None:
            if num_tokens <= state.num_tokens:
                return True  # asking for less keeps what is held
            if num_tokens <= state.room:  # most decode steps: no block to take
                if state.num_tokens > state.quiet_until:  # the window moved past a block (one step in block_size)
                    state.quiet_until = self.sliding_manager.let_go(seq_id, state.num_tokens)
                state.num_tokens = num_tokens
                return True
        new = bool(cached_prefix) or state is None  # the worker's tables start from nothing, or the adopted prefix
        start = len(cached_prefix) * self.block_size if cached_prefix else state.num_tokens if state else 0
        if not all(m.fits(seq_id, start, num_tokens, cached_prefix) for m in self._managers):
            return False
        appended = {m.name: m.allocate(seq_id, start, num_tokens, cached_prefix) for m in self._managers}
        if new or any(entries for entries, _ in appended.values()):  # most decode steps change no table
            change = self._changes.setdefault(seq_id, TableChanges())
            if new:
                change.new, change.full, change.sliding = True, [], []
            change.full += appended["full"][0] if "full" in appended else ()
            if "sliding" in appended:
                entries, cache_only = appended["sliding"]
                change.sliding += entries
                if cache_only and self.prefix_caching:
                    table_len = len(self.sliding_manager.tables[seq_id])
                    self._for_cache.append((seq_id, change, len(change.sliding) - table_len, cache_only))
        if new:
            state = self._seqs[seq_id] = _SeqState(registered=len(cached_prefix))
        state.num_tokens = num_tokens
        state.room = self.layout.num_blocks(num_tokens) * self.block_size
        state.quiet_until = self.sliding_manager.quiet_until(seq_id) if self.has_sliding else 1 << 62
        return True

    def fill_for_cache(self) -> None:
        """At the end of a step's allocations: blocks for the positions of long chunks that only the prefix cache
        would read (a hit inside or just after such a chunk needs them), from what every sequence of the step left.
        Done last so that keeping them for the cache never takes a block a sequence needs."""
        pending, self._for_cache = self._for_cache, []
        for seq_id, change, offset, entries in pending:
            if seq_id in self._seqs:
                for j, block in self.sliding_manager.fill_for_cache(seq_id, entries):
                    change.sliding[offset + j] = block

    def take_changes(self) -> tuple[dict[str, TableChanges], list[str]]:
        """The block-table changes since the last call, by sequence, and the sequences freed meanwhile (freed
        first: a sequence freed and admitted again comes back as `new`). The step contract carries them. Blocks let
        go behind a window are not in them: the runner never addresses those entries again."""
        changes, freed = self._changes, self._freed
        self._changes, self._freed = {}, []
        return changes, freed

    def free(self, seq_id: str) -> None:
        self._for_cache = [p for p in self._for_cache if p[0] != seq_id]
        known = self._seqs.pop(seq_id, None) is not None
        if self._changes.pop(seq_id, None) is not None or known:
            self._freed.append(seq_id)
        for m in self._managers:
            m.free(seq_id)

    def has(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    # ------------------------------------------------------------------ the prefix cache
    def cached_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading blocks of `keys` a new sequence can adopt: in each pool the blocks the next query sees
        are cached (every one in the full pool, the last ceil((window - 1) / block_size) in the sliding pool)."""
        best, runs = 0, [0] * len(self._managers)
        for i, key in enumerate(keys):
            hit = True
            for k, m in enumerate(self._managers):
                runs[k] = runs[k] + 1 if m.pool.lookup(key) is not None else 0
                hit = hit and runs[k] >= m.hit_blocks(i + 1)
            if hit:
                best = i + 1
            elif self.has_full and runs[0] <= i:
                break  # the full pool misses a block: no longer prefix can hit
        return best

    def register(self, seq_id: str, keys: Sequence[bytes], num_blocks: int) -> None:
        """Offer the sequence's first `num_blocks` blocks (every token computed; `keys` names them) to the cache."""
        state = self._seqs.get(seq_id)
        if state is None or num_blocks <= state.registered:
            return
        for m in self._managers:
            m.register(seq_id, keys, state.registered, num_blocks)
        state.registered = num_blocks
        if self.has_sliding:  # the step is launched: what the sequence's next step does not see can go now (a long
            # chunk's blocks kept only for the cache, above all), not at that step's allocation, after other sequences'
            state.quiet_until = self.sliding_manager.let_go(seq_id, state.num_tokens)

    def needs_registering(self, seq_id: str, num_blocks: int) -> bool:
        state = self._seqs.get(seq_id)
        return state is not None and num_blocks > state.registered

    def reset_prefix_cache(self) -> None:
        self.full.reset_cache()
        self.sliding.reset_cache()

    def usage(self) -> dict[str, float]:
        return {"full": self.full.usage, "sliding": self.sliding.usage}

    def tokens_capacity(self, seq_id: str) -> dict[str, int]:
        """Token slots the sequence holds per pool (per layer of that kind)."""
        return {m.name: len(m.held(seq_id)) * self.block_size for m in (self.full_manager, self.sliding_manager)}
