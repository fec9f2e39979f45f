"""Continuous batching (plain Python, no torch).

Each step the scheduler decides how many tokens every sequence computes: running decodes first (one token
each), then chunks of prompts still being prefilled, then new sequences from the waiting queue, all under
`max_num_seqs` and a token budget `max_num_batched_tokens`. A decode, a whole prompt, and a piece of one
are the same thing to the runner: `n` tokens of a sequence, starting at `num_computed_tokens`.

With prefix caching on, a sequence admitted from the waiting queue first adopts the longest run of its leading
blocks the KV cache already holds (`KVCacheManager.cached_prefix`) and starts computing after it; after each
step the blocks a sequence completed are offered to the cache (`cache_computed`).

When blocks run out, the newest running sequence (lowest priority, latest arrival) is preempted: its
blocks are freed and it goes back to the waiting queue to be recomputed from scratch later (prompt plus
the tokens it already generated), which gives identical results.

Fairness: a sequence may carry a `fairness_key` (the server gives every HTTP request its own), and sequences that
share one are a group that takes turns with the other groups, so that one request with hundreds of prompts times `n`
cannot hold everyone else behind it: admission picks the waiting group with the fewest running sequences, prompt
chunks share the step's token budget evenly between groups, and a preemption takes from the group holding the most
sequences. Sequences without a key are ordered as before (priority, then first come first served): with no keys,
or one group alone, every decision is the one the plain FIFO order makes.

With a fair share (`fair_share_seqs`, for the CPU, where every running sequence slows the step), a big group holding
more running sequences than the share while a small group (at most the share) wants the engine has the excess
paused: they keep their blocks, table row and computed tokens, but take no slot in the step until no small group is
left, so nothing is recomputed when they resume. Running and paused sequences together hold at most
`max_num_seqs` rows; a newcomer that needs a row, or blocks, takes them from the newest paused sequence first
(preempted: recomputed later).

The scheduler owns every change of a sequence's state. A step is `schedule` (or `schedule_lookahead`), whose
batch carries the runner's message (`step.StepInput`: tokens, positions, block-table changes, frees, logits
rows), then `on_launched` once the runner has queued it (tokens computed, blocks offered to the cache), then
`update_from_output` with the sampled tokens (appended; stop tokens, finished constraints and max_tokens end
sequences) and `finish` for sequences ended from outside (aborts, errors, stop strings found in the text).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field

from .kv_cache import KVCacheManager, extend_block_keys
from .request import ContextLengthError, Sequence, Status
from .step import StepInput, StepSeq


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_prefix_caching: bool = False
    # the most running sequences one fairness group may hold while another group has sequences running or waiting
    # (None: no cap; a group alone may always use every slot)
    fair_share_seqs: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")
        if self.fair_share_seqs is not None and self.fair_share_seqs < 1:
            raise ValueError(f"fair_share_seqs = {self.fair_share_seqs} must be >= 1 (None: no cap)")


@dataclass(slots=True)
class ScheduledBatch:
    """One step as the control plane sees it: sequences in flat-batch order and how many tokens each computes;
    `step` is what the runner gets (plain data, no Sequence objects)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    running_preempted: int = 0  # of those, the ones that were running (not paused): a sign blocks ran out
    step: StepInput | None = None
    sample_seqs: list[Sequence] = field(default_factory=list)  # the sequences that get a token, in logits order
    prompt_rows: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, prompt position) after those

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.seqs)

    def as_dict(self) -> dict[str, int]:
        return {s.seq_id: n for s, n in zip(self.seqs, self.num_tokens)}


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        # the waiting sequences by fairness key (None: those without one), each list sorted by Sequence.sort_key:
        # fair admission looks only at each group's head (a few groups, not thousands of sequences, per admission)
        self._waiting_groups: dict[str | None, list[Sequence]] = {}
        self.running: list[Sequence] = []
        self.paused: list[Sequence] = []  # sorted by Sequence.sort_key; hold blocks, not slots (module docstring)
        self.num_preemptions = 0
        self.num_pauses = 0  # running sequences paused for the fair share (module docstring)
        self.num_prompt_tokens = 0  # prompt tokens computed (recomputation after preemption included)
        self.num_generated_tokens = 0
        self.prefix_queried_tokens = 0  # tokens of sequences admitted with prefix caching on
        self.prefix_hit_tokens = 0  # of those, tokens taken from the cache
        self.cached_prompt_tokens = 0  # of those, prompt tokens (not earlier output recomputed after a preemption)

    # ------------------------------------------------------------------ queue management
    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Raise ValueError (with the numbers) for a sequence that could never be scheduled."""
        total = prompt_len + max_tokens
        if total > self.config.max_model_len:
            raise ContextLengthError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
                                     f"max_model_len ({self.config.max_model_len})", prompt_tokens=prompt_len,
                                     max_tokens=max_tokens, max_model_len=self.config.max_model_len)
        reason = self.kv.fits_ever(total)
        if reason:
            raise ContextLengthError(f"request can never fit in the KV cache: {reason}", prompt_tokens=prompt_len,
                                     max_tokens=max_tokens, max_model_len=self.config.max_model_len, limit="kv_cache")

    def add(self, seq: Sequence) -> None:
        self.check_fits(len(seq.prompt_token_ids), seq.max_tokens)
        seq.status = Status.WAITING
        self._enqueue_waiting(seq)

    def _enqueue_waiting(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=Sequence.sort_key)
        bisect.insort(self._waiting_groups.setdefault(seq.fairness_key, []), seq, key=Sequence.sort_key)

    def _dequeue_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        group = self._waiting_groups[seq.fairness_key]
        group.remove(seq)
        if not group:
            del self._waiting_groups[seq.fairness_key]

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finished or aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.paused:
            self.paused.remove(seq)
        elif seq in self.waiting:
            self._dequeue_waiting(seq)
        self.kv.free(seq.seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.paused)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        if seq.status is Status.PAUSED:
            self.paused.remove(seq)
        else:
            self.running.remove(seq)
            batch.running_preempted += 1
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue_waiting(seq)
        batch.preempted.append(seq)

    # ------------------------------------------------------------------ the step
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        scheduled: set[int] = set()
        self._make_room(batch)
        self._resume_paused()
        fair_preempted = batch.running_preempted  # not a sign of blocks running out: admission goes on

        # 1. Running sequences: decodes (one token) before prefill chunks, each group in priority order; prefill
        # chunks of several fairness groups share what the decodes leave of the budget (`_prefill_shares`).
        order = sorted(self.running, key=lambda s: (s.num_uncomputed > 1, s.sort_key()))
        shares = None
        for seq in order:
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            if shares is None and seq.num_uncomputed > 1:
                shares = self._prefill_shares(order, budget)
            n = min(seq.num_uncomputed, budget)
            if shares:
                n = min(n, shares[seq.fairness_key])
                if n == 0:
                    continue
            while not self.kv.allocate(seq.seq_id, seq.num_computed_tokens + n):
                victim = self._victim(scheduled)
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_tokens.append(n)
                scheduled.add(id(seq))
                budget -= n
                if shares:
                    shares[seq.fairness_key] -= n

        # 2. Waiting sequences, in priority order (taking turns between fairness groups), while nothing had to be
        # preempted this step for want of blocks.
        if self._waiting_groups.keys() - {None}:
            self._admit_fair(batch, budget, fair_preempted)
        else:
            while (self.waiting and not batch.running_preempted and budget > 0
                   and len(self.running) < self.config.max_num_seqs):
                seq = self.waiting[0]
                if self._sibling_prefilling(seq):
                    break  # it waits for its sibling's prompt blocks instead of computing them again (first come first)
                n = self._admit(seq, batch, budget)
                if n is None:
                    break
                budget -= n
        self._plan_rows(batch)
        batch.step = self._step_input(batch)
        return batch

    def _admit(self, seq: Sequence, batch: ScheduledBatch, budget: int) -> int | None:
        """Move a waiting sequence to running with its first chunk in `batch`; -> its tokens (None: no blocks)."""
        prefix = self._cached_prefix(seq)
        start = len(prefix) * self.kv.block_size
        n = min(seq.num_tokens - start, budget)
        if len(self.running) + len(self.paused) >= self.config.max_num_seqs:
            self._preempt(self.paused[-1], batch)  # every table row is held: the newest paused sequence gives its own
        while not self.kv.allocate(seq.seq_id, start + n, prefix):
            if not self.paused:
                return None
            self._preempt(self.paused[-1], batch)  # a paused sequence's blocks before a newcomer waits for them
        seq.num_computed_tokens = start
        if self.config.enable_prefix_caching:
            self.prefix_queried_tokens += seq.num_tokens
            self.prefix_hit_tokens += start
            self.cached_prompt_tokens += min(start, len(seq.prompt_token_ids))
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = start
        self._dequeue_waiting(seq)
        seq.status = Status.RUNNING
        bisect.insort(self.running, seq, key=Sequence.sort_key)
        batch.seqs.append(seq)
        batch.num_tokens.append(n)
        return n

    def _admit_fair(self, batch: ScheduledBatch, budget: int, fair_preempted: int) -> None:
        """Admission when some waiting sequences have fairness keys: each time, the head of the group (sequences
        without a key count as one group that is never ahead) with the best priority and then the fewest running
        sequences goes next, so a new request's first sequence starts before a big request's next one."""
        load = self._load()
        skipped: set[str | None] = set()  # groups whose head waits for a sibling's prompt blocks this step
        while (batch.running_preempted == fair_preempted and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            capped = self._capped_groups(load)
            heads = [g[0] for key, g in self._waiting_groups.items() if key not in skipped and key not in capped]
            if not heads:
                break
            seq = min(heads, key=lambda s: (s.priority, load[s.fairness_key] if s.fairness_key else 0,
                                            s.arrival_order))
            if self._sibling_prefilling(seq):
                skipped.add(seq.fairness_key)  # it waits for its sibling; the other groups need not
                continue
            n = self._admit(seq, batch, budget)
            if n is None:
                break
            budget -= n
            if seq.fairness_key is not None:
                load[seq.fairness_key] += 1

    def _starved(self) -> Sequence | None:
        """With every running slot taken: the head of a waiting fairness group that has no sequence running, if some
        group holds two or more slots one of which it could take (no lower priority than that group's victim)."""
        if len(self.running) < self.config.max_num_seqs or not self._waiting_groups.keys() - {None}:
            return None
        load = self._load()
        heads = [g[0] for key, g in self._waiting_groups.items() if key is not None and not load[key]]
        if not heads or not self.running:
            return None
        want = min(heads, key=lambda s: (s.priority, s.arrival_order))
        victim = self._victim(set(), paused=False)  # it must free a slot
        if victim.fairness_key is None or load[victim.fairness_key] < 2 or victim.priority < want.priority:
            return None
        return victim

    def _capped_groups(self, load: Counter) -> set[str]:
        """The fairness groups holding their fair share (`fair_share_seqs`) of running sequences while a small group
        (`_small_groups`) other than them wants the engine: they get no more slots until it is gone."""
        cap = self.config.fair_share_seqs
        small = self._small_groups()
        return {key for key, held in load.items() if held >= cap and small - {key}} if small else set()

    def _small_groups(self) -> set[str | None]:
        """The groups (sequences without a key count as one) of at most `fair_share_seqs` sequences running, paused
        or waiting: the interactive requests the fair share is for. Only they cap the others: big groups among
        themselves share the slots by fair admission, each step as full as without a share."""
        cap = self.config.fair_share_seqs
        if cap is None:
            return set()
        size = Counter(s.fairness_key for s in self.running)
        size.update(s.fairness_key for s in self.paused)
        for key, group in self._waiting_groups.items():
            size[key] += len(group)
        return {key for key, n in size.items() if n <= cap} if len(size) > 1 else set()

    def _resumable(self, load: Counter) -> list[Sequence]:
        """The paused sequences that may run again now, in order: while slots are free, those of groups under their
        share, or of any group once no small group wants the engine."""
        cap, free = self.config.fair_share_seqs, self.config.max_num_seqs - len(self.running)
        if not self.paused or free <= 0:
            return []
        small = self._small_groups()
        held, out = Counter(load), []
        for seq in self.paused:
            key = seq.fairness_key
            if key is not None and small - {key} and held[key] >= cap:
                continue
            out.append(seq)
            held[key] += 1
            if len(out) == free:
                break
        return out

    def _resume_paused(self) -> None:
        for seq in self._resumable(self._load()):
            self.paused.remove(seq)
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=Sequence.sort_key)

    def _load(self) -> Counter:
        """Running sequences per fairness group (sequences without a key are not counted)."""
        return Counter(s.fairness_key for s in self.running if s.fairness_key is not None)

    def _over_share(self) -> list[Sequence]:
        """The running sequences past their group's fair share while a small group wants the engine: of each such
        group, the excess taken from its lowest priority, newest first."""
        load = self._load()
        excess = {key: load[key] - self.config.fair_share_seqs for key in self._capped_groups(load)
                  if load[key] > self.config.fair_share_seqs}
        if not excess:
            return []
        victims = []
        for seq in sorted(self.running, key=lambda s: (s.priority, s.arrival_order), reverse=True):
            if excess.get(seq.fairness_key, 0) > 0:
                victims.append(seq)
                excess[seq.fairness_key] -= 1
        return victims

    def _make_room(self, batch: ScheduledBatch) -> None:
        """Without this a request arriving while another holds every running slot waits until one of that request's
        sequences ends, however long it generates: one of them goes back to the queue (recomputed later, its
        blocks mostly from the prefix cache) so each group has a turn. With a fair share set, a group holding more
        than its share while a small one arrives has the excess paused at once (on the CPU every running sequence
        slows everyone's step); paused, not preempted, so the step that resumes them recomputes nothing."""
        for seq in self._over_share():
            self.running.remove(seq)
            seq.status = Status.PAUSED
            bisect.insort(self.paused, seq, key=Sequence.sort_key)
            self.num_pauses += 1
        victim = self._starved()
        if victim is not None:
            self._preempt(victim, batch)

    def admissible(self) -> bool:
        """Whether the next `schedule` would start a waiting sequence (the engine's look-ahead then stops)."""
        if self._resumable(self._load()):
            return True
        return bool(self.waiting) and (len(self.running) < self.config.max_num_seqs or self._starved() is not None
                                       or bool(self._over_share()))

    def _prefill_shares(self, order: list[Sequence], budget: int) -> dict[str | None, int] | None:
        """Each fairness group's share of `budget` for the prompt chunks of its running sequences (sequences without
        a key are one group): an even split, a group needing less than its share leaving the rest to the others.
        None when one group (or none) has prompt left: it takes the budget in order, as without fairness."""
        demand: dict[str | None, int] = {}
        for seq in order:
            if seq.status is Status.RUNNING and seq.num_uncomputed > 1:
                demand[seq.fairness_key] = demand.get(seq.fairness_key, 0) + seq.num_uncomputed
        if len(demand) < 2:
            return None
        shares, left = {}, budget
        for i, (key, need) in enumerate(sorted(demand.items(), key=lambda kv: kv[1])):
            shares[key] = min(need, -(-left // (len(demand) - i)))
            left -= shares[key]
        return shares

    def _victim(self, scheduled: set[int], paused: bool = True) -> Sequence:
        """The sequence to preempt (of the running ones, and the paused ones if `paused`): the lowest priority, then
        a paused one (it is not computing), then the fairness group holding the most running sequences (a sequence
        without a key counts as a group of one), then the newest."""
        load = self._load()
        candidates = self.running + self.paused if paused else self.running
        return max((s for s in candidates if id(s) not in scheduled),
                   key=lambda s: (s.priority, s.status is Status.PAUSED, load[s.fairness_key] if s.fairness_key else 1,
                                  s.arrival_order))

    def schedule_lookahead(self, seqs: list[Sequence]) -> ScheduledBatch | None:
        """A decode step for `seqs` queued before the token each is about to get is known (the engine's look-ahead:
        the runner takes their tokens from the device). None when their blocks do not fit: the scheduler then decides the
        next step (the blocks some of them did get stay theirs and reach the runner with that step's changes)."""
        for seq in seqs:  # room for the pending token's K/V (what `schedule` would allocate next step)
            if not self.kv.allocate(seq.seq_id, seq.num_computed_tokens + 1):
                return None
        batch = ScheduledBatch(list(seqs), [1] * len(seqs), sample_seqs=list(seqs))
        batch.step = self._step_input(batch, lookahead=True)
        return batch

    def _plan_rows(self, batch: ScheduledBatch) -> None:
        """The sequences that sample (each that has now computed every token it knows samples the next one, from
        its last row) and the prompt rows scored for prompt_logprobs."""
        for seq, n in zip(batch.seqs, batch.num_tokens):
            if seq.num_computed_tokens + n == seq.num_tokens:
                batch.sample_seqs.append(seq)
            prompt_len = len(seq.prompt_token_ids)
            if seq.params.prompt_logprobs is not None and len(seq.prompt_logprobs or ()) < prompt_len:
                s = seq.num_computed_tokens
                batch.prompt_rows += [(seq, p + 1) for p in range(s, min(s + n, prompt_len - 1))]

    def _step_input(self, batch: ScheduledBatch, lookahead: bool = False) -> StepInput:
        step = StepInput()
        row, last_row, first_row = 0, {}, {}
        for seq, n in zip(batch.seqs, batch.num_tokens):
            s = seq.num_computed_tokens
            step.seqs.append(StepSeq(seq.seq_id, s, n, [] if lookahead else seq.token_ids_between(s, s + n)))
            first_row[seq.seq_id] = row - s  # + position = row
            row += n
            last_row[seq.seq_id] = row - 1
        # logits at a prompt position p score prompt token p + 1
        step.logits_rows = ([last_row[seq.seq_id] for seq in batch.sample_seqs]
                            + [first_row[seq.seq_id] + p - 1 for seq, p in batch.prompt_rows])
        self.kv.fill_for_cache()
        step.tables, step.freed = self.kv.take_changes()
        return step

    # ------------------------------------------------------------------ after the step
    def on_launched(self, batch: ScheduledBatch) -> None:
        """The step is queued on the device: its tokens count as computed, and blocks they complete go to the
        prefix cache (a later step that adopts one reads it after the writes, in stream order)."""
        now = time.monotonic()
        for seq, n in zip(batch.seqs, batch.num_tokens):
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            self.num_prompt_tokens += max(0, min(n, len(seq.prompt_token_ids) - seq.num_computed_tokens))
            seq.num_computed_tokens += n
        self.cache_computed(batch.seqs)

    def update_from_output(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """Append each sequence's sampled token and finish those it ends: a stop token, a complete constrained
        value, max_tokens (their blocks are freed; stop strings are the output processor's, which finishes through
        `finish`). Sequences finished meanwhile (aborted, or ended by the step before a look-ahead one) are
        skipped. -> the sequences that got a token."""
        now = time.monotonic()
        appended = []
        for seq, token in zip(seqs, token_ids):
            if seq.finished:
                continue
            p = seq.params
            seq.output_token_ids.append(token)
            self.num_generated_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            if seq.constraint is not None:
                seq.constraint.accept(token)
            appended.append(seq)
            if token in p.stop_ids():
                self.finish(seq, "stop", None if token in p.eos_token_ids and token not in p.stop_token_ids else token)
                continue
            if seq.constraint is not None and seq.constraint.is_finished():
                self.finish(seq, "stop")
            elif len(seq.output_token_ids) >= seq.max_tokens:
                self.finish(seq, "length")
        return appended

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (stopped, aborted or failed) and free its blocks."""
        self.remove(seq)
        seq.finish(reason, stop_reason)

    # ------------------------------------------------------------------ prefix caching
    def _cached_prefix(self, seq: Sequence) -> list[bytes]:
        """Keys of the leading blocks `seq` can take from the cache: never its last token (its logits are
        needed), and nothing for a request that wants prompt logprobs (they need every prompt position)."""
        if not self.config.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        n = (seq.num_tokens - 1) // self.kv.block_size
        keys = self._block_keys(seq, n)[:n]
        return keys[:self.kv.cached_prefix(keys)]

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        """With prefix caching, the sequences of a request with n > 1 share its prompt: while one of them computes
        it, the others wait, then take its blocks from the cache (n prefills become one)."""
        if seq.params.n == 1 or not self.config.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return False
        adoptable = (len(seq.prompt_token_ids) - 1) // self.kv.block_size * self.kv.block_size  # whole blocks
        return any(s.request_id == seq.request_id and s.num_computed_tokens < adoptable for s in self.running)

    def _block_keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        return extend_block_keys(seq.block_keys, seq.token_ids_between, self.kv.block_size, num_blocks,
                                 seq.cache_salt)

    def cache_computed(self, seqs: list[Sequence]) -> None:
        """Offer the blocks these sequences have now computed in full to the cache. Call once their step is
        launched: a later step that adopts a block reads it after the writes, in stream order."""
        if not self.config.enable_prefix_caching:
            return
        for seq in seqs:
            n = min(seq.num_computed_tokens, seq.num_tokens) // self.kv.block_size  # tokens known, K/V computed
            if self.kv.needs_registering(seq.seq_id, n):
                self.kv.register(seq.seq_id, self._block_keys(seq, n), n)
