"""The continuous-batching scheduler, driven by a fake runner (no model): unit tests and a state machine."""

import math

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from trinity.engine.kv_cache import KVCacheManager
from trinity.engine.request import Sequence, Status
from trinity.engine.sampling_params import SamplingParams
from trinity.engine.scheduler import Scheduler, SchedulerConfig

DUMMY = 7


def make_seq(seq_id, prompt_len, max_tokens=4, priority=0):
    return Sequence(seq_id=seq_id, request_id=seq_id, index=0, prompt_token_ids=[1] * prompt_len,
                    params=SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens, priority=priority)


def fake_run(sched: Scheduler, batch) -> list[Sequence]:
    """What the engine does after the model: advance computed tokens; a sequence that computed everything
    gets a dummy token; one with max_tokens outputs finishes and leaves. Returns the finished ones."""
    done = []
    for seq, n in zip(batch.seqs, batch.num_tokens):
        seq.num_computed_tokens += n
        assert seq.num_computed_tokens <= seq.num_tokens
    sched.cache_computed(batch.seqs)  # with prefix caching: the blocks now computed go to the cache
    for seq, n in zip(batch.seqs, batch.num_tokens):
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(DUMMY)
            if len(seq.output_token_ids) >= seq.max_tokens:
                seq.finish("length")
                sched.remove(seq)
                done.append(seq)
    return done


def make_sched(bs=4, blocks=100, window=8, max_num_seqs=8, budget=64, max_model_len=1000):
    kv = KVCacheManager(bs, blocks, blocks, window)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len), kv)


# ---------------------------------------------------------------------- unit tests
def test_scheduler_config_validation():
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
        with pytest.raises(ValueError, match=f"{name} = 0"):
            SchedulerConfig(**{name: 0})


def test_chunked_prefill_respects_budget():
    sched = make_sched(budget=7)
    a = make_seq("a", 20, max_tokens=2)
    sched.add(a)
    chunks = []
    while a.num_computed_tokens < 20:
        batch = sched.schedule()
        assert batch.as_dict() == {"a": batch.num_tokens[0]}
        chunks.append(batch.num_tokens[0])
        assert batch.num_tokens[0] <= 7
        fake_run(sched, batch)
    assert chunks == [7, 7, 6]
    assert a.output_token_ids == [DUMMY]
    assert sched.schedule().as_dict() == {"a": 1}


def test_decodes_first_then_prefill_chunks_then_new():
    sched = make_sched(budget=10)
    a, b = make_seq("a", 3, max_tokens=10), make_seq("b", 30, max_tokens=10)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.as_dict() == {"a": 3, "b": 7}
    fake_run(sched, batch)
    c = make_seq("c", 5, max_tokens=10)
    sched.add(c)
    batch = sched.schedule()
    # a decodes (1 token), b continues its prompt with the rest of the budget; c waits (no budget left)
    assert [s.seq_id for s in batch.seqs] == ["a", "b"] and batch.num_tokens == [1, 9]
    assert c.status is Status.WAITING and c in sched.waiting
    fake_run(sched, batch)
    batch = sched.schedule()
    assert [s.seq_id for s in batch.seqs] == ["a", "b"] and batch.num_tokens == [1, 9]
    fake_run(sched, batch)
    batch = sched.schedule()  # b's last 5 prompt tokens leave 4 of the budget: c's first chunk
    assert [s.seq_id for s in batch.seqs] == ["a", "b", "c"] and batch.num_tokens == [1, 5, 4]
    fake_run(sched, batch)
    batch = sched.schedule()  # now a and b decode, c finishes its prompt
    assert [s.seq_id for s in batch.seqs] == ["a", "b", "c"] and batch.num_tokens == [1, 1, 1]
    assert c.num_computed_tokens == 4 and c.num_uncomputed == 1


def test_a_decode_goes_before_an_older_or_higher_priority_prefill():
    sched = make_sched(budget=10)
    low = make_seq("low", 2, max_tokens=10, priority=1)
    sched.add(low)
    fake_run(sched, sched.schedule())  # low is now decoding
    high = make_seq("high", 30, max_tokens=10, priority=0)
    sched.add(high)
    batch = sched.schedule()
    # the decode is not starved by the long prompt that sorts before it: it gets its token first
    assert [s.seq_id for s in batch.seqs] == ["low", "high"] and batch.num_tokens == [1, 9]
    fake_run(sched, batch)
    batch = sched.schedule()
    assert [s.seq_id for s in batch.seqs] == ["low", "high"] and batch.num_tokens == [1, 9]


def test_max_num_seqs_limits_running():
    sched = make_sched(max_num_seqs=2)
    seqs = [make_seq(f"s{i}", 4) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.as_dict() == {"s0": 4, "s1": 4}
    assert len(sched.running) == 2 and [s.seq_id for s in sched.waiting] == ["s2", "s3"]


def test_waiting_queue_order_priority_then_arrival():
    sched = make_sched(max_num_seqs=1, budget=100)
    low, high1, high2 = make_seq("low", 4, priority=5), make_seq("high1", 4, priority=-1), make_seq("high2", 4, priority=-1)
    for s in (low, high1, high2):
        sched.add(s)
    assert [s.seq_id for s in sched.waiting] == ["high1", "high2", "low"]
    assert sched.schedule().as_dict() == {"high1": 4}


def test_preemption_frees_newest_and_recomputes_it():
    # 6 full blocks of 2 tokens; two sequences of 6-token prompts take 3 blocks each; growing one needs a fourth
    sched = make_sched(bs=2, blocks=6, window=100, budget=100)
    a, b = make_seq("a", 6, max_tokens=4), make_seq("b", 6, max_tokens=4)
    sched.add(a)
    sched.add(b)
    fake_run(sched, sched.schedule())
    assert a.num_computed_tokens == b.num_computed_tokens == 6
    assert sched.kv.full.num_free == 0
    batch = sched.schedule()  # a's decode at position 6 needs a 4th block: b (newest) is preempted
    assert batch.preempted == [b] and batch.as_dict() == {"a": 1}
    assert b.status is Status.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert sched.kv.tokens_capacity("b") == {"full": 0, "sliding": 0}
    assert sched.num_preemptions == 1 and b in sched.waiting and b not in sched.running
    fake_run(sched, batch)
    # b is recomputed from scratch later: prompt plus the token it already generated
    while b.num_computed_tokens == 0:
        fake_run(sched, sched.schedule())
    assert b.output_token_ids[0] == DUMMY


def test_a_sequence_preempts_itself_when_alone_it_cannot_grow():
    sched = make_sched(bs=2, blocks=3, window=100, budget=100, max_model_len=1000)
    sched.kv.allocate("other", 2)  # one block held outside the scheduler
    a = make_seq("a", 4, max_tokens=2)
    sched.add(a)
    fake_run(sched, sched.schedule())
    assert a.num_computed_tokens == 4 and sched.kv.full.num_free == 0
    batch = sched.schedule()  # its decode needs a 3rd block, none is free: a is its own victim
    assert batch.preempted == [a] and batch.seqs == []
    assert a.num_computed_tokens == 0 and a.status is Status.WAITING


def test_check_fits_errors_give_numbers():
    sched = make_sched(bs=4, blocks=5, max_model_len=50)
    with pytest.raises(ValueError, match=r"prompt \(40 tokens\) \+ max_tokens \(20\) = 60 exceeds max_model_len \(50\)"):
        sched.add(make_seq("a", 40, max_tokens=20))
    with pytest.raises(ValueError, match=r"can never fit.*24 tokens need 6 blocks.*5 blocks of 4 tokens"):
        sched.add(make_seq("b", 20, max_tokens=4))
    assert not sched.waiting and not sched.has_unfinished()


def test_remove_waiting_and_running():
    sched = make_sched(max_num_seqs=1)
    a, b = make_seq("a", 4), make_seq("b", 4)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.kv.has("a")
    sched.remove(a)
    sched.remove(b)
    assert not sched.has_unfinished() and sched.kv.full.num_free == sched.kv.full.num_blocks
    assert sched.schedule().seqs == []


# ---------------------------------------------------------------------- randomized state machine
class SchedulerMachine(RuleBasedStateMachine):
    @initialize(bs=st.integers(1, 5), window=st.integers(1, 12), blocks=st.integers(4, 30),
                max_num_seqs=st.integers(1, 5), budget=st.integers(1, 24), caching=st.booleans())
    def setup(self, bs, window, blocks, max_num_seqs, budget, caching):
        # every prompt is [1] * length: with prefix caching on, later ones hit what earlier ones computed
        self.kv = KVCacheManager(bs, blocks, blocks, window, prefix_caching=caching)
        self.caching = caching
        self.sched = Scheduler(SchedulerConfig(max_num_seqs, budget, 64, enable_prefix_caching=caching), self.kv)
        self.live: dict[str, Sequence] = {}
        self.finished: list[Sequence] = []
        self.count = 0

    @rule(prompt_len=st.integers(1, 30), max_tokens=st.integers(1, 8), priority=st.integers(0, 2))
    def add(self, prompt_len, max_tokens, priority):
        seq = make_seq(f"s{self.count}", prompt_len, max_tokens, priority)
        self.count += 1
        if self.kv.fits_ever(prompt_len + max_tokens) is not None:
            with pytest.raises(ValueError):
                self.sched.add(seq)
            assert seq not in self.sched.waiting
            return
        self.sched.add(seq)
        self.live[seq.seq_id] = seq

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        seq = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        self.sched.remove(seq)
        seq.finish("abort")
        assert self.kv.tokens_capacity(seq.seq_id) == {"full": 0, "sliding": 0}

    @rule()
    def step(self):
        self._step()

    def _step(self):
        sched, kv, cfg = self.sched, self.kv, self.sched.config
        before = {s.seq_id: (s.num_computed_tokens, s.num_uncomputed, s.status) for s in self.live.values()}
        batch = sched.schedule()
        assert batch.total_tokens <= cfg.max_num_batched_tokens
        assert len(sched.running) <= cfg.max_num_seqs
        ids = [s.seq_id for s in batch.seqs]
        assert len(ids) == len(set(ids))
        kinds = []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            assert seq.seq_id in self.live and seq.status is Status.RUNNING and seq in sched.running
            assert 1 <= n <= seq.num_uncomputed
            cap = kv.tokens_capacity(seq.seq_id)
            need = seq.num_computed_tokens + n
            assert cap["full"] == math.ceil(need / kv.block_size) * kv.block_size
            # sliding: the blocks it held from its first query's window on, and new ones for its last `window`
            # positions (with prefix caching maybe also a long chunk's others, for the cache); none before
            s, bs, layout = seq.num_computed_tokens, kv.block_size, kv.layout
            table = kv.tables(seq.seq_id).sliding
            held = {j for j, b in enumerate(table) if b >= 0}
            needed = {*range(layout.first_block(s, True), layout.num_blocks(s)),
                      *range(layout.first_block(need - 1, True), layout.num_blocks(need))}
            assert len(table) == layout.num_blocks(need)
            assert needed <= held <= set(range(layout.first_block(s, True), len(table)))
            assert held == needed or self.caching
            assert len(needed) <= kv.blocks_for(need)[1] and cap["sliding"] == len(held) * bs
            computed, uncomputed, _ = before[seq.seq_id]
            kinds.append("decode" if computed > 0 and uncomputed == 1 else "prefill")
        if "prefill" in kinds:
            assert "decode" not in kinds[kinds.index("prefill"):], f"decode after a prefill chunk: {kinds}"
        for seq in batch.preempted:
            assert seq.num_computed_tokens == 0 and seq.status is Status.WAITING
            assert kv.tokens_capacity(seq.seq_id) == {"full": 0, "sliding": 0}
            assert seq in sched.waiting and seq not in sched.running and seq not in batch.seqs
        if batch.preempted:
            assert all(before[s.seq_id][2] is Status.RUNNING for s in batch.seqs), "admitted after a preemption"
        # a running sequence no longer scheduled still holds blocks for what it computed
        for seq in sched.running:
            assert kv.tokens_capacity(seq.seq_id)["full"] >= seq.num_computed_tokens
        for seq in fake_run(sched, batch):
            self.finished.append(self.live.pop(seq.seq_id))
        return batch

    @invariant()
    def queues_consistent(self):
        sched, kv = self.sched, self.kv
        assert {s.seq_id for s in sched.running} | {s.seq_id for s in sched.waiting} == set(self.live)
        assert not {s.seq_id for s in sched.running} & {s.seq_id for s in sched.waiting}
        for seq in sched.waiting:
            assert seq.status is Status.WAITING and seq.num_computed_tokens == 0
            assert kv.tokens_capacity(seq.seq_id) == {"full": 0, "sliding": 0}
        keys = [s.sort_key() for s in sched.waiting]
        assert keys == sorted(keys)
        held = len({b for s in sched.running for b in kv.tables(s.seq_id).full})  # shared blocks count once
        assert kv.full.num_used == held
        assert kv.full.num_used + kv.full.num_free == kv.full.num_blocks
        assert kv.sliding.num_used + kv.sliding.num_free == kv.sliding.num_blocks

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        # with no new requests everything finishes (no livelock), every sequence gets exactly max_tokens
        for _ in range(2000):
            if not self.sched.has_unfinished():
                break
            self._step()
        assert not self.sched.has_unfinished() and not self.live
        for seq in self.finished:
            assert seq.output_token_ids == [DUMMY] * seq.max_tokens
        assert self.kv.full.num_free == self.kv.full.num_blocks
        assert self.kv.sliding.num_free == self.kv.sliding.num_blocks


SchedulerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None, database=None,
                                              suppress_health_check=[HealthCheck.too_slow])
TestSchedulerMachine = SchedulerMachine.TestCase
