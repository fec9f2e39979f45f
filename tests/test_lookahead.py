"""Look-ahead decoding (`async_scheduling`): the engine queues the next decode step before reading the current
one's tokens. These tests force it on the CPU and check the interleavings that plain steps never meet: a
sequence finishing while a step for it is already queued, aborts and arrivals while a step is in flight, and
requests whose sampling needs the pending token (no look-ahead for them)."""

import pytest

from engine_helpers import assert_pools_free, random_prompts, reference_greedy, scripted_model
from trinity.engine import EngineConfig, LLMEngine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def engine_for(model, on=True, **kw):
    kw.setdefault("block_size", 4)
    kw.setdefault("num_kv_blocks", 128)
    return LLMEngine(model, None, EngineConfig(async_scheduling=on, **kw))


def drain(engine) -> dict:
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def test_a_step_is_queued_before_the_tokens_are_read(model):
    engine = engine_for(model)
    engine.add_request("a", params=GREEDY, prompt_token_ids=[5, 6, 7])
    first = engine.step()  # prefill, plus the first decode queued behind it
    assert [len(o.outputs[0].token_ids) for o in first] == [1]
    assert engine._inflight is not None and engine.stats()["num_lookahead_steps"] == 1
    seq = engine.requests["a"].seqs[0]
    assert seq.num_computed_tokens == 4 and seq.num_tokens == 4  # the queued step computes token 4
    final = drain(engine)
    assert final["a"].outputs[0].token_ids == reference_greedy(model, [5, 6, 7], 8)
    assert engine._inflight is None
    assert_pools_free(engine)


def test_eos_while_a_step_is_queued_drops_its_row():
    # 50 -> 60 -> 2 (a stop token) for one request; the other never stops
    model = scripted_model({11: 50, 50: 60, 60: 2, 12: 70}, default=70)
    for on in (False, True):
        engine = engine_for(model, on)
        engine.add_request("stops", params=SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[2]),
                           prompt_token_ids=[11])
        engine.add_request("runs", params=SamplingParams(temperature=0, max_tokens=10), prompt_token_ids=[12])
        final = drain(engine)
        assert final["stops"].outputs[0].token_ids == [50, 60, 2]
        assert final["stops"].outputs[0].finish_reason == "stop"
        assert final["runs"].outputs[0].token_ids == [70] * 10
        assert (engine.stats()["num_lookahead_steps"] > 0) == on
        assert_pools_free(engine)


@pytest.mark.parametrize("when", [1, 2, 4])
def test_abort_while_a_step_is_in_flight(model, when):
    prompts = random_prompts([5, 9, 3], seed=3)
    engine = engine_for(model)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", params=GREEDY, prompt_token_ids=p)
    for _ in range(when):
        engine.step()
    assert engine._inflight is not None
    out = engine.abort("r1")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    final = drain(engine)
    assert "r1" not in final
    for i in (0, 2):
        assert final[f"r{i}"].outputs[0].token_ids == reference_greedy(model, prompts[i], 8)
    assert_pools_free(engine)


def test_abort_everything_in_flight_then_new_work(model):
    engine = engine_for(model)
    engine.add_request("a", params=GREEDY, prompt_token_ids=[5, 6])
    engine.step()
    engine.abort("a")
    assert not engine.has_unfinished()
    engine.add_request("b", params=GREEDY, prompt_token_ids=[7, 8, 9])
    assert drain(engine)["b"].outputs[0].token_ids == reference_greedy(model, [7, 8, 9], 8)
    assert_pools_free(engine)


def test_arrivals_while_in_flight_are_admitted_and_exact(model):
    prompts = random_prompts([4, 11, 6, 2], seed=5)
    engine = engine_for(model, max_num_batched_tokens=8)  # the 11-token prompt is prefilled in two chunks
    engine.add_request("r0", params=GREEDY, prompt_token_ids=prompts[0])
    final = {}
    for step in range(200):
        if step in (2, 3, 5):
            i = {2: 1, 3: 2, 5: 3}[step]
            engine.add_request(f"r{i}", params=GREEDY, prompt_token_ids=prompts[i])
        if not engine.has_unfinished():
            break
        final.update({o.request_id: o for o in engine.step() if o.finished})
    for i, p in enumerate(prompts):
        assert final[f"r{i}"].outputs[0].token_ids == reference_greedy(model, p, 8)
    assert engine.stats()["num_lookahead_steps"] > 0
    assert_pools_free(engine)


def test_requests_that_need_the_pending_token_stop_the_look_ahead(model):
    prompts = random_prompts([5, 7], seed=9)
    penalised = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.3)
    outs = {}
    for on in (False, True):
        engine = engine_for(model, on)
        engine.add_request("plain", params=GREEDY, prompt_token_ids=prompts[0])
        engine.add_request("penalised", params=penalised, prompt_token_ids=prompts[1])
        outs[on] = {k: v.outputs[0].token_ids for k, v in drain(engine).items()}
        assert engine.stats()["num_lookahead_steps"] == 0  # every step had the penalised request in it
    assert outs[True] == outs[False]
    assert outs[True]["plain"] == reference_greedy(model, prompts[0], 8)


def test_preemption_with_look_ahead_is_exact(model):
    prompts = random_prompts([13, 17, 9, 21, 5, 11], seed=2)
    engine = engine_for(model, num_kv_blocks=14, max_num_seqs=6)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", params=GREEDY, prompt_token_ids=p)
    final = drain(engine)
    assert engine.stats()["num_preemptions"] > 0 and engine.stats()["num_lookahead_steps"] > 0
    for i, p in enumerate(prompts):
        assert final[f"r{i}"].outputs[0].token_ids == reference_greedy(model, p, 8)
    assert_pools_free(engine)


@pytest.mark.parametrize("on", [False, True])
def test_a_failing_queued_step_fails_its_requests_and_the_engine_goes_on(on):
    model = scripted_model({11: 50, 50: 99, 12: 60}, default=60)
    real_forward = model.forward

    def forward(input_ids, *args, **kw):
        if (input_ids == 99).any():  # the step that feeds token 99 back in fails
            raise RuntimeError("boom")
        return real_forward(input_ids, *args, **kw)

    model.forward = forward
    engine = engine_for(model, on)
    engine.add_request("bad", params=SamplingParams(temperature=0, max_tokens=6), prompt_token_ids=[11])
    final = drain(engine)
    assert final["bad"].outputs[0].finish_reason == "error" and "RuntimeError" in final["bad"].error
    assert engine._inflight is None and not engine.requests
    assert_pools_free(engine)
    engine.add_request("good", params=SamplingParams(temperature=0, max_tokens=3), prompt_token_ids=[12])
    assert drain(engine)["good"].outputs[0].token_ids == [60, 60, 60]
