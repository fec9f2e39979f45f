"""LLMEngine / LLM end to end on the tiny preset: batching, preemption, chunked prefill, the sliding window,
aborts, seeded sampling, KV accounting and admission errors, checked against the whole-sequence reference,
the contiguous-cache decode loop and HF transformers."""

import math
import random

import pytest
import torch

from engine_helpers import (assert_pools_free, random_prompts, reference_greedy, reference_logprobs,
                            run_llm_both_ways, tiny_model)
from trinity.engine import LLM, SamplingParams
from trinity.engine.request import Status

@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "lookahead"])
def lookahead(request, monkeypatch):
    """Every test here runs twice: plain steps and look-ahead decoding; the results must be the same."""
    return run_llm_both_ways(request, monkeypatch)


LENGTHS = [1, 2, 3, 5, 7, 8, 9, 12, 15, 16, 17, 23, 31, 33, 40, 47]  # around and beyond the window of 8
MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=1)


@pytest.fixture(scope="module")
def reference(model, prompts):
    return [reference_greedy(model, p, MAX_TOKENS) for p in prompts]


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


# ---------------------------------------------------------------------- greedy: batch = alone = reference = HF
def test_greedy_batch_equals_alone_equals_reference(model, prompts, reference, lookahead):
    assert len(set(map(tuple, reference))) == len(prompts)  # 16 different continuations
    llm = LLM(model, max_num_seqs=16, block_size=4, num_kv_blocks=256)
    together = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    # look-ahead ran for most steps: only the prefill step and the last one cannot queue another
    assert (llm.engine.stats()["num_lookahead_steps"] >= MAX_TOKENS - 2) == lookahead
    assert [o.prompt_token_ids for o in together] == prompts  # input order
    assert token_ids(together) == reference
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in together)
    assert llm.engine.stats()["num_preemptions"] == 0
    alone = [llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0] for p in prompts]
    assert token_ids(alone) == reference
    assert_pools_free(llm.engine)


@pytest.mark.parametrize("budget", [2048, 7], ids=["whole_prompts", "chunked_prefill_7"])
def test_greedy_identical_under_preemption(model, prompts, reference, budget):
    # 47 + 10 tokens need 15 blocks of 4; 16 such sequences together need far more than 20 blocks
    llm = LLM(model, max_num_seqs=16, block_size=4, num_kv_blocks=20, max_num_batched_tokens=budget)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=2)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert llm.engine.stats()["num_preemptions"] > 0
    assert token_ids(outs) == reference
    # prompt logprobs are recorded once per position, even for the recomputed prompts
    for p, o in zip(prompts, outs):
        if len(p) == 1:
            continue  # see test_prompt_logprobs_of_a_one_token_prompt
        assert len(o.prompt_logprobs) == len(p) and o.prompt_logprobs[0] is None
        ref = reference_logprobs(model, p)
        for i in range(1, len(p)):
            assert o.prompt_logprobs[i][p[i]].logprob == pytest.approx(ref[i - 1, p[i]].item(), abs=1e-4)
    assert_pools_free(llm.engine)


def test_greedy_equals_hf_transformers(model, prompts, reference, tmp_path):
    transformers = pytest.importorskip("transformers")
    model.save_pretrained(tmp_path / "ckpt")
    hf = transformers.AfmoeForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    engine_out = token_ids(LLM(model, max_num_seqs=16, block_size=4, num_kv_blocks=256,
                               max_num_batched_tokens=64).generate(prompt_token_ids=prompts, sampling_params=GREEDY))
    assert engine_out == reference
    with torch.inference_mode():
        # teacher-forced: HF's argmax after every prefix is the engine's next token (= HF greedy decoding)
        for p, ref in zip(prompts, engine_out):
            logits = hf(torch.tensor([p + ref])).logits[0]
            assert logits[len(p) - 1:len(p) + len(ref) - 1].argmax(-1).tolist() == ref
        # and HF's own generate loop (with its cache) for a few prompts, short and longer than the window
        for i in (0, 5, 10, 15):
            out = hf.generate(torch.tensor([prompts[i]]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
            assert out[0, len(prompts[i]):].tolist() == engine_out[i]


@pytest.mark.parametrize("overrides", [dict(global_attn_every_n_layers=1),
                                       dict(layer_types=["sliding_attention"] * 4),
                                       dict(sliding_window=1), dict(sliding_window=3)],
                         ids=["all_full", "all_sliding", "window1", "window3"])
def test_greedy_with_other_layer_layouts(overrides):
    model = tiny_model(seed=4, scale=8, **overrides)
    prompts = random_prompts([3, 17, 30], seed=2)
    llm = LLM(model, block_size=4, num_kv_blocks=16, max_num_batched_tokens=7)
    kv = llm.engine.kv
    assert (kv.full.num_blocks > 0) == any(not model.config.is_sliding_layer(i) for i in range(4))
    assert (kv.sliding.num_blocks > 0) == any(model.config.is_sliding_layer(i) for i in range(4))
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert token_ids(outs) == [reference_greedy(model, p, MAX_TOKENS) for p in prompts]
    assert_pools_free(llm.engine)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on():
    from engine_helpers import scripted_model

    model = scripted_model(default=50)
    real_forward = model.forward

    def forward(input_ids, *args, **kw):
        if (input_ids == 99).any():
            raise RuntimeError("boom")
        return real_forward(input_ids, *args, **kw)

    model.forward = forward
    llm = LLM(model, block_size=4, num_kv_blocks=32)
    engine = llm.engine
    engine.add_request("bad", params=SamplingParams(temperature=0, max_tokens=4), prompt_token_ids=[11, 99, 12])
    engine.add_request("mate", params=SamplingParams(temperature=0, max_tokens=4), prompt_token_ids=[11, 12])
    outs = {o.request_id: o for o in engine.step()}
    assert set(outs) == {"bad", "mate"}  # one step, one batch: both fail
    for o in outs.values():
        assert o.finished and o.outputs[0].finish_reason == "error"
        assert "internal error while running the model: RuntimeError" in o.error
    assert not engine.has_unfinished() and not engine.requests
    assert_pools_free(engine)
    ok = llm.generate(prompt_token_ids=[[11, 12]], sampling_params=SamplingParams(temperature=0, max_tokens=3))[0]
    assert ok.outputs[0].token_ids == [50, 50, 50] and ok.error is None


# ---------------------------------------------------------------------- logits: sliding window, chunks, blocks
def check_position(lps, ref_row, token, top_n):
    """One position's returned logprobs against log_softmax of the reference logits."""
    assert token in lps
    chosen = lps[token]
    value = ref_row[token].item()
    assert chosen.logprob == pytest.approx(value, abs=1e-4)
    assert int((ref_row > value + 1e-4).sum()) + 1 <= chosen.rank <= int((ref_row > value - 1e-4).sum()) + 1
    assert len(lps) in (top_n, top_n + 1)
    for tid, lp in lps.items():
        assert lp.logprob == pytest.approx(ref_row[tid].item(), abs=1e-4)
    got = sorted((lp.logprob for lp in lps.values()), reverse=True)[:top_n]
    assert got == pytest.approx(ref_row.topk(top_n).values.tolist(), abs=1e-4)
    ranks = sorted(lp.rank for tid, lp in lps.items() if tid != token or chosen.rank <= top_n)
    assert ranks == list(range(1, top_n + 1))


@pytest.fixture(scope="module")
def model16():
    return tiny_model(seed=1, scale=4, sliding_window=16)


@pytest.mark.parametrize("block_size", [4, 5, 16])
@pytest.mark.parametrize("budget", [2048, 7], ids=["whole", "chunk7"])
def test_prompt_logprobs_match_whole_sequence_reference(model16, block_size, budget):
    prompts = random_prompts([100, 100, 37], seed=block_size)
    llm = LLM(model16, block_size=block_size, max_num_batched_tokens=budget, num_kv_blocks=200)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(prompt_logprobs=20, max_tokens=1))
    if budget == 7:
        assert llm.engine.stats()["num_steps"] >= 237 // 7
    for p, o in zip(prompts, outs):
        ref = reference_logprobs(model16, p)
        assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(p)
        for i in range(1, len(p)):
            check_position(o.prompt_logprobs[i], ref[i - 1], p[i], 20)
        assert len(o.outputs[0].token_ids) == 1
    assert_pools_free(llm.engine)


@pytest.mark.parametrize("block_size,budget", [(4, 2048), (5, 7)])
def test_decode_logprobs_match_whole_sequence_reference(model16, block_size, budget):
    prompts = random_prompts([100, 100, 21], seed=7)
    params = [SamplingParams(temperature=0, max_tokens=24, logprobs=20, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=5, max_tokens=24, logprobs=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, logprobs=5, ignore_eos=True)]
    llm = LLM(model16, block_size=block_size, max_num_batched_tokens=budget, num_kv_blocks=200)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    sampled_not_top = 0
    for p, sp, o in zip(prompts, params, outs):
        gen = o.outputs[0]
        assert len(gen.token_ids) == sp.max_tokens == len(gen.logprobs)
        ref = reference_logprobs(model16, p + gen.token_ids)
        for j, tok in enumerate(gen.token_ids):
            row = ref[len(p) + j - 1]
            check_position(gen.logprobs[j], row, tok, sp.logprobs)
            if sp.temperature == 0:
                assert gen.logprobs[j][tok].rank == 1
            else:
                sampled_not_top += gen.logprobs[j][tok].rank > 1
        assert gen.cumulative_logprob == pytest.approx(sum(ref[len(p) + j - 1, t].item()
                                                           for j, t in enumerate(gen.token_ids)), abs=1e-3)
    assert sampled_not_top > 0  # the sampled request really sampled


def test_prompt_logprobs_of_a_one_token_prompt(model):
    out = LLM(model, num_kv_blocks=16).generate(prompt_token_ids=[[11]],
                                                 sampling_params=SamplingParams(prompt_logprobs=2, max_tokens=1))[0]
    assert out.prompt_logprobs == [None]


# ---------------------------------------------------------------------- aborts
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_aborts_free_everything_and_others_are_unaffected(model, seed):
    rng = random.Random(seed)
    llm = LLM(model, max_num_seqs=4, max_num_batched_tokens=7, block_size=4, num_kv_blocks=48)
    engine = llm.engine
    lengths = [rng.randrange(2, 30) for _ in range(12)]
    prompts = random_prompts(lengths, seed=100 + seed)
    specs = {}
    for i, p in enumerate(prompts):
        n = 2 if i % 3 == 0 else 1
        mt = rng.randrange(3, 9)
        engine.add_request(f"r{i}", params=SamplingParams(temperature=0, max_tokens=mt, n=n, ignore_eos=True),
                           prompt_token_ids=p)
        specs[f"r{i}"] = (p, mt, n)
    assert engine.abort("nope") is None

    def state(rid):
        seqs = engine.requests[rid].seqs
        if all(s.status is Status.WAITING and s.num_computed_tokens == 0 for s in seqs):
            return "waiting"
        if any(0 < s.num_computed_tokens < len(s.prompt_token_ids) for s in seqs):
            return "prefill"
        return "decode"

    wanted = ["waiting", "prefill", "decode", "n2"]
    aborted, finished, kinds = set(), {}, set()
    for step in range(500):
        live = sorted(engine.requests)
        targets = []
        for want in list(wanted):  # aim for each kind of abort once, at a random moment
            cands = [r for r in live if (specs[r][2] == 2 if want == "n2" else state(r) == want)]
            if cands and rng.random() < 0.3:
                targets.append(rng.choice(cands))
                wanted.remove(want)
        if live and rng.random() < 0.1:
            targets.append(rng.choice(live))
        for rid in dict.fromkeys(targets):
            kinds.add(state(rid))
            if specs[rid][2] == 2:
                kinds.add("n2")
            seq_ids = [s.seq_id for s in engine.requests[rid].seqs]
            # a sample of an n = 2 request may have finished already (with prefix caching the second one starts
            # once the first has computed the prompt's blocks); it keeps its reason, the others are aborted
            done = {s.index: s.finish_reason for s in engine.requests[rid].seqs if s.finished}
            out = engine.abort(rid)
            assert out.finished and out.request_id == rid
            assert [c.finish_reason for c in out.outputs] == [done.get(c.index, "abort") for c in out.outputs]
            assert len(done) < len(out.outputs)
            assert [c.index for c in out.outputs] == list(range(specs[rid][2]))
            assert all(engine.kv.tokens_capacity(s) == {"full": 0, "sliding": 0} for s in seq_ids)
            assert engine.abort(rid) is None
            aborted.add(rid)
        if not engine.has_unfinished():
            break
        for out in engine.step():
            assert out.request_id not in aborted
            if out.finished:
                finished[out.request_id] = out
    assert not engine.has_unfinished() and not engine.requests
    assert {"waiting", "prefill", "decode", "n2"} <= kinds, kinds
    assert set(finished) | aborted == set(specs) and not set(finished) & aborted
    assert_pools_free(engine)
    for rid, out in finished.items():
        p, mt, n = specs[rid]
        ref = reference_greedy(model, p, mt)
        assert [c.token_ids for c in out.outputs] == [ref] * n
    # and the engine keeps serving
    p = prompts[0]
    assert token_ids(llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)) == \
        [reference_greedy(model, p, MAX_TOKENS)]
    assert_pools_free(engine)


# ---------------------------------------------------------------------- seeded sampling
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def soft_model():
    return tiny_model(seed=2, scale=2.5)


def test_seeded_sampling_same_alone_in_batch_and_after_preemption(soft_model):
    target = random_prompts([12], seed=3)[0]
    others = random_prompts([5, 9, 14, 20, 25, 3, 30, 11], seed=4)
    other_params = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True),
                    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                    SamplingParams(temperature=0.8, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True),
                    SamplingParams(temperature=1.3, top_k=5, max_tokens=16, ignore_eos=True)] * 2

    def run(prompts, params, **kw):
        return LLM(soft_model, block_size=4, **kw).generate(prompt_token_ids=prompts, sampling_params=params)

    alone = run([target], SEEDED, num_kv_blocks=64)[0].outputs[0].token_ids
    assert len(alone) == 16
    batch = others[:4] + [target] + others[4:]
    together = run(batch, other_params[:4] + [SEEDED] + other_params[4:], num_kv_blocks=256)
    assert together[4].outputs[0].token_ids == alone

    # the target has the lowest priority, so it is the one preempted when the 14-block pool runs out
    engine = LLM(soft_model, block_size=4, num_kv_blocks=14, max_num_seqs=9).engine
    params = other_params[:4] + [SEEDED] + other_params[4:]
    for i, (p, sp) in enumerate(zip(batch, params)):
        engine.add_request(f"r{i}", params=sp, prompt_token_ids=p, priority=1 if i == 4 else 0)
    seq = engine.requests["r4"].seqs[0]
    while engine.has_unfinished():
        engine.step()
    assert seq.num_preemptions > 0 and seq.finish_reason == "length"
    assert seq.output_token_ids == alone

    # not vacuous: another seed, and greedy, give other tokens
    other_seed = run([target], SamplingParams(temperature=0.8, top_p=0.9, seed=1235, max_tokens=16,
                                              ignore_eos=True), num_kv_blocks=64)[0].outputs[0].token_ids
    greedy = run([target], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                 num_kv_blocks=64)[0].outputs[0].token_ids
    assert other_seed != alone and greedy != alone


def test_seeded_n2_samples_differ_and_reproduce(soft_model):
    p = random_prompts([10], seed=5)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    a = LLM(soft_model, num_kv_blocks=64).generate(prompt_token_ids=[p], sampling_params=params)[0]
    b = LLM(soft_model, num_kv_blocks=64, seed=123).generate(prompt_token_ids=[p, p],
                                                              sampling_params=params)[1]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    samples = [tuple(c.token_ids) for c in a.outputs]
    assert len(set(samples)) == 3
    assert [tuple(c.token_ids) for c in b.outputs] == samples


# ---------------------------------------------------------------------- KV accounting
@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("block_size", [4, 5])
def test_sliding_pool_holds_a_window_full_pool_holds_everything(model16, block_size, caching):
    window = 16
    llm = LLM(model16, block_size=block_size, num_kv_blocks=64, max_num_batched_tokens=10,
              enable_prefix_caching=caching)
    engine = llm.engine
    window_blocks = (window + block_size - 2) // block_size + 1  # the most blocks 16 positions touch
    assert engine.stats()["sliding_window_blocks"] == window_blocks == engine.kv.window_blocks
    assert window_blocks * block_size < window + 2 * block_size
    a, b = random_prompts([2 * window, 5], seed=9)
    engine.add_request("a", params=SamplingParams(temperature=0, max_tokens=2 * window, ignore_eos=True),
                       prompt_token_ids=a)  # 4x the window in all
    engine.add_request("b", params=SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       prompt_token_ids=b)
    seen_sliding, seen_full, mid_checks, before = 0, 0, 0, 0
    while "a" in engine.requests:
        engine.step()
        if "a" not in engine.requests:
            break
        seq = engine.requests["a"].seqs[0]
        n = seq.num_computed_tokens
        held = engine.kv_tokens_held("a")
        assert held["full"] == math.ceil(n / block_size) * block_size >= n
        # sliding: the blocks from the first one the last step's first query saw (a decode's at n - 1, a chunk's at
        # `before`) on, or from the first one the next query sees (let go once that step's blocks were registered)
        last = n - 1 if n > len(a) else before
        end, (lo, hi) = math.ceil(n / block_size), [max(0, p + 1 - window) // block_size for p in (last, n)]
        assert (end - hi) * block_size <= held["sliding"] <= (end - lo) * block_size
        assert held["sliding"] == (end - lo) * block_size or caching
        if n > len(a):  # decoding: at most the blocks of a window
            assert held["sliding"] <= window_blocks * block_size
            seen_sliding = max(seen_sliding, held["sliding"])
        seen_full = max(seen_full, held["full"])
        before = n
        stats = engine.stats()
        used = {"full": held["full"] // block_size, "sliding": held["sliding"] // block_size}
        if "b" in engine.requests:
            hb = engine.kv_tokens_held("b")
            used = {k: used[k] + hb[k] // block_size for k in used}
        assert {k: stats["kv_blocks"][k]["used"] for k in used} == used
        assert stats["kv_blocks"]["full"]["total"] == 64
        assert stats["kv_blocks"]["sliding"]["total"] == engine.kv.sliding.num_blocks > 0
        assert stats["kv_cache_usage"] == pytest.approx(
            {k: used[k] / stats["kv_blocks"][k]["total"] for k in used})
        if 0 < len(seq.output_token_ids) < 2 * window - 1:
            mid_checks += 1  # mid-generation, decoding past twice the window
    assert seen_sliding == window_blocks * block_size
    assert seen_full >= 4 * window - 1
    assert mid_checks >= 2 * window - 3
    assert_pools_free(engine)


# ---------------------------------------------------------------------- admission errors
def test_requests_that_can_never_fit_are_rejected_at_add_time(model):
    llm = LLM(model, max_model_len=64, block_size=4, num_kv_blocks=200)
    engine = llm.engine
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) \+ max_tokens \(10\) = 70 exceeds max_model_len \(64\)"):
        engine.add_request("a", params=SamplingParams(max_tokens=10), prompt_token_ids=[11] * 60)
    with pytest.raises(ValueError, match=r"prompt \(64 tokens\) leaves no room.*max_model_len \(64\)"):
        engine.add_request("a", params=SamplingParams(max_tokens=None), prompt_token_ids=[11] * 64)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", prompt_token_ids=[])
    with pytest.raises(ValueError, match=r"prompt token id 512 is out of range \[0, 512\)"):
        engine.add_request("a", prompt_token_ids=[1, 512])
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_request("a", prompt="hello")
    assert not engine.has_unfinished() and not engine.requests

    small = LLM(model, block_size=4, num_kv_blocks=3)
    with pytest.raises(ValueError, match=r"never fit.*15 tokens need 4 blocks of the full-attention pool.*3 blocks of "
                                         r"4 tokens"):
        small.engine.add_request("x", params=SamplingParams(max_tokens=5), prompt_token_ids=[11] * 10)
    # a batch with one impossible request queues nothing at all
    with pytest.raises(ValueError, match="never fit"):
        small.generate(prompt_token_ids=[[11] * 3, [11] * 10],
                       sampling_params=SamplingParams(max_tokens=5))
    assert not small.engine.has_unfinished()
    assert_pools_free(small.engine)
    ok = small.generate(prompt_token_ids=[[11] * 3], sampling_params=SamplingParams(max_tokens=5, temperature=0))
    assert len(ok[0].outputs[0].token_ids) == 5


def test_max_tokens_none_runs_to_max_model_len_and_duplicate_ids(model):
    llm = LLM(model, max_model_len=24, block_size=4, num_kv_blocks=20)
    out = llm.generate(prompt_token_ids=[[11] * 20], sampling_params=SamplingParams(max_tokens=None, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4 and out[0].outputs[0].finish_reason == "length"
    engine = llm.engine
    engine.add_request("same", prompt_token_ids=[11, 12])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("same", prompt_token_ids=[11, 12])
    engine.abort("same")
    assert_pools_free(engine)


def test_greedy_identical_when_the_fair_share_pauses_and_resumes(model, prompts, reference):
    """A big request's sequences paused for a newcomer (`fair_share_seqs`) keep their KV and go on where they
    stopped: every output equals the reference, the table rows never run out (running + paused <= max_num_seqs,
    the newcomer taking a paused sequence's row), and everything is freed at the end."""
    llm = LLM(model, max_num_seqs=8, fair_share_seqs=2, block_size=4)
    engine, params = llm.engine, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, p in enumerate(prompts[:8]):
        engine.enqueue(engine.prepare_request(f"big{i}", prompt_token_ids=p, params=params, fairness_key="B"))
    outs, steps = {}, 0
    while engine.has_unfinished():
        if steps == 3:  # the big request holds all 8 rows, decoding: a newcomer arrives
            assert len(engine.scheduler.running) == 8
            engine.enqueue(engine.prepare_request("small", prompt_token_ids=prompts[8], params=params,
                                                  fairness_key="S"))
        for out in engine.step():
            outs[out.request_id] = out
        assert len(engine.scheduler.running) + len(engine.scheduler.paused) <= 8
        steps += 1
    stats = engine.stats()
    assert stats["num_pauses"] == 6 and stats["num_preemptions"] == 1  # 6 paused, one of them gave its row
    assert [outs[f"big{i}"].outputs[0].token_ids for i in range(8)] + [outs["small"].outputs[0].token_ids] \
        == reference[:9]
    assert_pools_free(engine)
