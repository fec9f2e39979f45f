"""Block pools for the paged KV cache, with automatic prefix caching (plain Python, no torch).

Trinity has two kinds of attention layer, so two pools:
- the *full* pool serves full-attention layers: a sequence holds ceil(len / block_size) blocks;
- the *sliding* pool serves sliding-window layers: a sequence holds a ring of at most
  ceil(window / block_size) + 1 blocks (position p lives in ring entry (p // block_size) % ring_blocks), so a
  sliding layer never holds more than (ceil(window / block_size) + 1) * block_size token slots: window +
  block_size when the block size divides the window, under window + 2 * block_size otherwise.
All layers of one kind share a sequence's block table; each layer has its own tensor in that pool.

Prefix caching. Once every token of a block is computed, the block can be *registered* under a key naming
its tokens and all tokens before it (a SHA-256 chain: a prompt cannot be built to collide with another
user's and read their cache). A registered block is never written again. When nobody holds it any more it
stays in the pool, *evictable*, until an allocation runs out of never-registered free blocks and takes the
least recently released one. A new sequence whose tokens start with registered blocks adopts them instead of
computing them. A hit needs both pools: the full layers need every block of the prefix, the sliding layers
only the last ring_blocks - 1 blocks of it (the window the next token sees).

The ring and the cache: when a sequence's ring entry moves on to a new block, the block it held leaves the
sequence. A registered block then goes to the cache, if a block is left for the entry once every sequence of
the step has what it needs (`commit_step`), so that a later prompt can still hit there; otherwise, and for an
unregistered block, the block is reused in place, as without caching. A prefill chunk longer than the ring
writes the whole blocks the ring would never hold into blocks of their own ("spills", also in `commit_step`),
registered and let go after the step. A block that left a ring in this step may still be read this step (a
prefill chunk reads its context before writing, through `BlockTables.sliding_context`), so it is *held back*:
not handed out again until `new_step()`, called before the next step's allocations.
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
    cache), or nobody holds it and it is free, evictable (registered), or held back until the next step."""

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
        self._held_back: set[int] = set()  # left a ring this step: not handed out before `new_step`

    # ------------------------------------------------------------------ counts
    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return len(self._holders)

    @property
    def num_free(self) -> int:
        """Blocks nobody holds (free, evictable or held back until the next step)."""
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

    def free(self, blocks: Sequence[int], owner: str, hold_back: bool = False) -> None:
        """`owner` lets go of the blocks. With `hold_back`, none of them is handed out again this step."""
        for b in blocks:
            holders = self._holders.get(b)
            if not holders or owner not in holders:
                raise RuntimeError(f"{self.name} pool: block {b} freed by {owner!r} but held by "
                                   f"{sorted(holders) if holders else None!r}")
            if hold_back:
                self._held_back.add(b)
            holders.remove(owner)
            if not holders:
                del self._holders[b]
                self._park(b)

    def _park(self, b: int) -> None:
        """Where a block nobody holds waits."""
        if b in self._held_back:
            return  # until new_step
        if b in self._key_of:
            self._evictable[b] = None
        else:
            self._free.append(b)

    def new_step(self) -> None:
        """The step that may still read the held-back blocks has been launched: they may be handed out."""
        held, self._held_back = self._held_back, set()
        for b in held:
            if b not in self._holders:
                self._park(b)

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


@dataclass(slots=True)
class BlockTables:
    full: list[int] = field(default_factory=list)
    sliding: list[int] = field(default_factory=list)  # by ring entry
    sliding_logical: list[int] = field(default_factory=list)  # the block index (position // block_size) of each
    sliding_last: int = -1  # the highest block index the ring holds (it holds the ring_blocks - 1 before it too)
    registered: int = 0  # blocks below this index were offered to the cache (in the sliding pool: those in the ring)
    # The ring before the last allocation, when that moved an entry to a new block: a prefill chunk reads its
    # context (positions before it) through this, since its old blocks still hold it during the step.
    sliding_context: list[int] | None = None
    # (block index, block) of this step's spill blocks: whole blocks of a long prefill chunk that the ring does
    # not keep, written to blocks of their own for the cache; registered and let go after the step
    sliding_spill: list[tuple[int, int]] = field(default_factory=list)


class KVCacheManager:
    def __init__(self, block_size: int, num_full_blocks: int, num_sliding_blocks: int, sliding_window: int,
                 has_full_layers: bool = True, has_sliding_layers: bool = True, prefix_caching: bool = False):
        self.layout = KVLayout(block_size, sliding_window)
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.ring_blocks = self.layout.ring_blocks
        self.has_full = has_full_layers
        self.has_sliding = has_sliding_layers
        self.full = BlockPool("full", num_full_blocks if has_full_layers else 0)
        self.sliding = BlockPool("sliding", num_sliding_blocks if has_sliding_layers else 0)
        self._tables: dict[str, BlockTables] = {}
        self.prefix_caching = prefix_caching  # spill blocks are made only for the cache
        self._pending_moves: dict[int, tuple[str, int]] = {}  # block -> (seq, ring entry): `commit_step` decides
        self._pending_spills: dict[str, range] = {}  # seq -> block indices `commit_step` may spill
        # What changed since `take_changes`, for the runner's own copy of the tables (the step contract)
        self._changes: dict[str, TableChanges] = {}
        self._freed: list[str] = []

    # ------------------------------------------------------------------ sizing
    def blocks_for(self, num_tokens: int) -> tuple[int, int]:
        """(full, sliding) blocks a sequence of `num_tokens` tokens holds."""
        n = self.layout.num_blocks(num_tokens)
        return (n if self.has_full else 0, min(n, self.ring_blocks) if self.has_sliding else 0)

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
        return self._tables.setdefault(seq_id, BlockTables())

    def new_step(self) -> None:
        """Call before allocating for a step, once the previous step has been launched."""
        self.full.new_step()
        self.sliding.new_step()

    def allocate(self, seq_id: str, num_tokens: int, cached_prefix: Sequence[bytes] = ()) -> bool:
        """Grow the sequence's tables to hold `num_tokens` tokens; all or nothing. False when blocks run out.

        `cached_prefix`: keys (from `cached_prefix`) of blocks the sequence adopts from the cache instead of
        computing them; only for a sequence that holds nothing yet."""
        t = self._tables.get(seq_id)
        if cached_prefix and t is not None and (t.full or t.sliding):
            raise RuntimeError(f"{seq_id!r} already holds blocks: it cannot adopt a cached prefix")
        if cached_prefix and num_tokens <= len(cached_prefix) * self.block_size:
            raise ValueError("a sequence adopting a cached prefix must compute at least one token after it")
        bs, ring = self.block_size, self.ring_blocks
        n_blocks = self.layout.num_blocks(num_tokens)
        if (t is not None and not cached_prefix and (not self.has_full or n_blocks <= len(t.full))
                and (not self.has_sliding or n_blocks <= t.sliding_last + 1)):
            t.sliding_context = None  # most decode steps: the blocks are there already
            return True
        n_prefix = len(cached_prefix)
        adopt_full = [self._cached(self.full, k) for k in cached_prefix] if self.has_full else []
        adopt_sliding = ([(j, self._cached(self.sliding, cached_prefix[j]))
                          for j in range(max(0, n_prefix - (ring - 1)), n_prefix)] if self.has_sliding else [])
        grows = t is not None and not cached_prefix  # else a new ring, maybe adopted
        if grows:
            blocks, logical, held_last = t.sliding, t.sliding_logical, t.sliding_last
        else:  # the adopted ring; an entry it does not fill is -1 until filled below
            size = min(ring, n_prefix) if self.has_sliding else 0
            blocks, logical, held_last = [-1] * size, [-1] * size, n_prefix - 1
            for j, b in adopt_sliding:
                blocks[j % ring], logical[j % ring] = b, j

        # The sliding ring must hold blocks last - ring + 1 .. last, block j in entry j % ring; it holds those up to
        # `held_last` already. An entry holding an older block (or none) gets a new block when the old one is not
        # ours alone. When it is ours alone and registered, `commit_step` decides (moved to the cache if a block is
        # left); otherwise it is reused in place. A decode step looks at one entry at most.
        last = max(n_blocks - 1, held_last) if self.has_sliding else -1
        changes: dict[int, tuple[int, str]] = {}  # ring entry -> (block index it will hold, "new" | "cache" | "reuse")
        for j in range(max(held_last + 1 if grows else 0, last - ring + 1, 0), last + 1):
            e = j % ring
            if e < len(logical) and logical[e] == j:
                continue
            old = blocks[e] if e < len(blocks) else -1
            if old < 0 or self.sliding.holders(old) - {seq_id}:
                changes[e] = (j, "new")
            else:
                changes[e] = (j, "cache" if self.sliding.is_registered(old) else "reuse")
        num_new = sum(1 for _, how in changes.values() if how == "new")
        # an adopted block whose holder's ring moved on from it this step: the holder gets its new block now
        moving_on = [b for _, b in adopt_sliding if b in self._pending_moves]
        num_new += len(moving_on)
        need_full = max(0, n_blocks - (len(t.full) if grows else len(adopt_full))) if self.has_full else 0
        if (need_full > self.full.num_allocatable - self.full.num_evictable_among(adopt_full)
                or num_new > self.sliding.num_allocatable - self.sliding.num_evictable_among(
                    b for _, b in adopt_sliding)):
            return False

        t = self.tables(seq_id)
        change = self._change(seq_id)
        if not grows:  # the worker's tables start from nothing, or from the adopted prefix
            change.new, change.full, change.ring, change.ring_set = True, [], list(blocks), []
        if cached_prefix:  # shared first: no allocation below may evict them
            for b in adopt_full:
                self.full.share(b, seq_id)
            for _, b in adopt_sliding:
                self.sliding.share(b, seq_id)
            t.full, t.registered = list(adopt_full), n_prefix
            change.full += adopt_full
        for b in moving_on:
            owner, e = self._pending_moves.pop(b)
            self._move_entry(owner, e, self.sliding.allocate(1, owner)[0])
            self.sliding.free([b], owner, hold_back=True)
        new_full = self.full.allocate(need_full, seq_id)
        t.full += new_full
        change.full += new_full
        # a prefill chunk reads its context through the ring as it was: the old blocks still hold it this step
        moving = any(e < len(blocks) and blocks[e] >= 0 for e in changes)
        t.sliding_context = list(blocks) if moving else None
        t.sliding_last = last
        for e, (j, how) in changes.items():
            while len(blocks) <= e:
                blocks.append(-1)
                logical.append(-1)
            old = blocks[e]
            if how == "new":
                blocks[e] = self.sliding.allocate(1, seq_id)[0]
                change.ring_set.append((e, blocks[e]))
                if old >= 0:  # this step's prefill may still read it: not handed out before the next step
                    self.sliding.free([old], seq_id, hold_back=True)
            elif how == "cache":  # decided in commit_step, once every sequence of the step has what it needs
                self._pending_moves[old] = (seq_id, e)
            logical[e] = j
        t.sliding, t.sliding_logical = blocks, logical
        # Whole blocks this call adds that the ring will not hold (a chunk longer than the ring): without a spill
        # their sliding K/V is never stored, and no later prompt could hit at a point within a window after them.
        if self.prefix_caching and self.has_sliding and last - ring > held_last:
            self._pending_spills[seq_id] = range(held_last + 1, last - ring + 1)
        return True

    def commit_step(self) -> None:
        """After a step's allocations: each ring entry that moved on from a registered block of its own (see
        `allocate`) gets a new block if one is left, and the old block goes to the cache; otherwise the old block
        is reused in place and leaves the cache. Done last so that keeping a cache entry never takes a block a
        sequence of this step needs."""
        pending, self._pending_moves = self._pending_moves, {}
        spills, self._pending_spills = self._pending_spills, {}
        for old, (seq_id, e) in pending.items():
            if self.sliding.num_allocatable:
                self._move_entry(seq_id, e, self.sliding.allocate(1, seq_id)[0])
                self.sliding.free([old], seq_id, hold_back=True)
            else:
                self.sliding.unregister(old)  # reused in place: its old tokens leave the cache
        for seq_id, spill in spills.items():  # best effort, the latest blocks first (hits near the chunk's end)
            t = self._tables[seq_id]
            for j in reversed(spill):
                if not self.sliding.num_allocatable:
                    break
                t.sliding_spill.append((j, self.sliding.allocate(1, seq_id)[0]))
                self._change(seq_id).spill.append(t.sliding_spill[-1])

    def _change(self, seq_id: str) -> TableChanges:
        return self._changes.setdefault(seq_id, TableChanges())

    def _move_entry(self, seq_id: str, entry: int, block: int) -> None:
        """A ring entry of `seq_id` moves to `block` (its old block is freed by the caller)."""
        self._tables[seq_id].sliding[entry] = block
        self._change(seq_id).ring_set.append((entry, block))

    def take_changes(self) -> tuple[dict[str, TableChanges], list[str]]:
        """The block-table changes since the last call, by sequence, and the sequences freed meanwhile (freed
        first: a sequence freed and admitted again comes back as `new`). The step contract carries them."""
        changes, freed = self._changes, self._freed
        self._changes, self._freed = {}, []
        return changes, freed

    @staticmethod
    def _cached(pool: BlockPool, key: bytes) -> int:
        block = pool.lookup(key)
        if block is None:
            raise RuntimeError(f"{pool.name} pool: a block of the cached prefix is no longer cached")
        return block

    def free(self, seq_id: str) -> None:
        t = self._tables.pop(seq_id, None)
        if self._changes.pop(seq_id, None) is not None or t is not None:
            self._freed.append(seq_id)
        for b in [b for b, (owner, _) in self._pending_moves.items() if owner == seq_id]:
            del self._pending_moves[b]  # never overwritten: its block stays cached
        self._pending_spills.pop(seq_id, None)
        if t is not None:
            self.full.free(t.full, seq_id)
            self.sliding.free(t.sliding, seq_id)
            self.sliding.free([b for _, b in t.sliding_spill], seq_id)

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    # ------------------------------------------------------------------ the prefix cache
    def cached_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading blocks of `keys` a new sequence can adopt: every one of them cached in the full pool,
        and the last ring_blocks - 1 of them (the window the next token sees) in the sliding pool."""
        n = len(keys)
        if self.has_full:
            n = next((i for i, k in enumerate(keys) if self.full.lookup(k) is None), n)
        if not self.has_sliding:
            return n
        best, run, need = 0, 0, self.ring_blocks - 1
        for i in range(n):
            run = run + 1 if self.sliding.lookup(keys[i]) is not None else 0
            if run >= min(i + 1, need):
                best = i + 1
        return best

    def register(self, seq_id: str, keys: Sequence[bytes], num_blocks: int) -> None:
        """Offer the sequence's first `num_blocks` blocks (every token computed; `keys` names them) to the cache."""
        t = self._tables.get(seq_id)
        if t is None:
            return
        for j, b in t.sliding_spill:  # written by the step just launched: cached, then let go
            if j < num_blocks:
                self.sliding.register(b, keys[j])
            self.sliding.free([b], seq_id)
        t.sliding_spill = []
        if num_blocks <= t.registered:
            return
        if self.has_full:
            for j in range(t.registered, num_blocks):
                self.full.register(t.full[j], keys[j])
        if self.has_sliding:
            ring = self.ring_blocks
            for j in range(max(t.registered, num_blocks - ring), num_blocks):
                e = j % ring
                if e < len(t.sliding_logical) and t.sliding_logical[e] == j:
                    self.sliding.register(t.sliding[e], keys[j])
        t.registered = num_blocks

    def needs_registering(self, seq_id: str, num_blocks: int) -> bool:
        t = self._tables.get(seq_id)
        return t is not None and (num_blocks > t.registered or bool(t.sliding_spill))

    def reset_prefix_cache(self) -> None:
        self.full.reset_cache()
        self.sliding.reset_cache()

    def usage(self) -> dict[str, float]:
        return {"full": self.full.usage, "sliding": self.sliding.usage}

    def tokens_capacity(self, seq_id: str) -> dict[str, int]:
        """Token slots the sequence holds per pool (per layer of that kind)."""
        t = self._tables.get(seq_id, BlockTables())
        return {"full": len(t.full) * self.block_size, "sliding": len(t.sliding) * self.block_size}
