"""The sampler (on hand-built sequences and controlled logits), SamplingParams validation, and the engine's
stop logic (stop strings, stop ids, eos, min_tokens, lengths) with a scripted model and the byte tokenizer."""

import dataclasses
import math

import pytest
import torch

from engine_helpers import byte_ids, chain, random_prompts, run_llm_both_ways, scripted_model, tiny_model
from trinity.engine import LLM, SamplingError, SamplingParams
from trinity.engine.request import Sequence
from trinity.engine.sampler import Sampler

EOS = (0, 2)  # <|endoftext|>, <|im_end|> of the byte-level tokenizer


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "lookahead"])
def lookahead(request, monkeypatch):
    """The engine-level tests run with plain steps and with look-ahead decoding; the results must be the same."""
    return run_llm_both_ways(request, monkeypatch)


def make_seq(params, prompt=(1, 2, 3), output=(), seed=None, name="s"):
    params = dataclasses.replace(params, eos_token_ids=EOS)
    seq = Sequence(seq_id=name, request_id=name, index=0, prompt_token_ids=list(prompt), params=params,
                   max_tokens=params.max_tokens or 100, sampling_seed=seed)
    seq.output_token_ids = list(output)
    return seq


def random_logits(rows, vocab=50, seed=0, scale=3.0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture
def sampler():
    return Sampler(torch.device("cpu"), seed=0)


# ---------------------------------------------------------------------- greedy and its equivalents
def test_temperature_zero_is_argmax(sampler):
    logits = random_logits(8)
    seqs = [make_seq(SamplingParams(temperature=0), name=f"s{i}") for i in range(8)]
    assert sampler(logits, seqs).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.5, top_p=1e-6),
    SamplingParams(temperature=2.0, min_p=0.999),
    SamplingParams(temperature=1.0, min_p=1.0),
], ids=["top_k_1", "top_p_tiny", "min_p_0.999", "min_p_1"])
def test_filters_that_leave_one_token_are_greedy(sampler, params):
    logits = random_logits(64, seed=1)
    # rows drawn from the sampler's generator and rows with their own seeds
    seqs = [make_seq(params, seed=None if i % 2 else i, name=f"s{i}") for i in range(64)]
    assert sampler(logits, seqs).token_ids == logits.argmax(-1).tolist()
    # control: without the filter, the same rows do not all come out greedy
    loose = dataclasses.replace(params, top_k=0, top_p=1.0, min_p=0.0)
    seqs = [make_seq(loose, seed=None if i % 2 else i, name=f"s{i}") for i in range(64)]
    assert sampler(logits, seqs).token_ids != logits.argmax(-1).tolist()


def test_logit_bias_forces_and_bans(sampler):
    logits = random_logits(4, seed=2)
    lowest = logits.argmin(-1).tolist()
    seqs = [make_seq(SamplingParams(temperature=t, logit_bias={lowest[i]: 100}, seed=i), name=f"s{i}")
            for i, t in enumerate([0, 0.7, 1.0, 2.0])]
    assert sampler(logits, seqs).token_ids == lowest
    top2 = logits.topk(2, dim=-1).indices
    seqs = [make_seq(SamplingParams(temperature=0, logit_bias={int(top2[i, 0]): -100}), name=f"s{i}")
            for i in range(4)]
    assert sampler(logits, seqs).token_ids == top2[:, 1].tolist()
    # the bias is added exactly (token ids outside the vocabulary are ignored)
    seq = make_seq(SamplingParams(logit_bias={3: 1.5, 7: -2.0, 10_000: 5.0}))
    x = sampler._process(logits[:1], [seq])
    expected = logits[:1].clone()
    expected[0, 3] += 1.5
    expected[0, 7] -= 2.0
    torch.testing.assert_close(x, expected)
    assert torch.equal(logits, random_logits(4, seed=2))  # the caller's logits are left alone


def test_min_tokens_blocks_eos_and_stop_ids_until_reached(sampler):
    logits = torch.zeros(1, 20)
    logits[0, 2] = 5.0  # eos is the favourite
    logits[0, 9] = 4.0  # then a stop id
    logits[0, 11] = 3.0
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[9])
    for produced in range(3):
        seq = make_seq(params, output=[11] * produced)
        x = sampler._process(logits, [seq])
        assert x[0, 0] == x[0, 2] == x[0, 9] == float("-inf")
        assert torch.equal(x[0, [1, 3, 11]], logits[0, [1, 3, 11]])
        assert sampler(logits, [seq]).token_ids == [11]
    seq = make_seq(params, output=[11] * 3)
    assert torch.equal(sampler._process(logits, [seq]), logits)
    assert sampler(logits, [seq]).token_ids == [2]
    # ignore_eos: eos is not a stop id, so it is not blocked; stop ids still are
    seq = make_seq(dataclasses.replace(params, ignore_eos=True))
    x = sampler._process(logits, [seq])
    assert x[0, 2] == 5.0 and x[0, 9] == float("-inf")


# ---------------------------------------------------------------------- penalties, exactly as defined
def expected_penalised(x, prompt, output, presence=0.0, frequency=0.0, repetition=1.0):
    x = x.clone()
    for t in range(x.shape[-1]):
        count = output.count(t)
        if t in prompt or count:
            x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
        x[t] -= frequency * count + presence * (count > 0)
    return x


@pytest.mark.parametrize("presence,frequency,repetition", [
    (0.5, 0.0, 1.0), (0.0, 0.3, 1.0), (0.0, 0.0, 1.5), (0.0, 0.0, 0.7), (-0.4, 1.2, 1.3), (2.0, -2.0, 2.0),
])
def test_penalties_change_logits_exactly(sampler, presence, frequency, repetition):
    logits = random_logits(2, vocab=30, seed=3)
    prompt, output = [3, 4, 4, 20], [4, 5, 5, 5, 7, 29]
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition)
    other = make_seq(SamplingParams(), prompt=prompt, output=output, name="plain")  # no penalties: untouched
    x = sampler._process(logits, [make_seq(params, prompt=prompt, output=output), other])
    torch.testing.assert_close(x[0], expected_penalised(logits[0], prompt, output, presence, frequency, repetition))
    torch.testing.assert_close(x[1], logits[1])
    untouched = [t for t in range(30) if t not in prompt + output]
    torch.testing.assert_close(x[0, untouched], logits[0, untouched])


def test_penalties_steer_greedy_choice(sampler):
    logits = torch.zeros(1, 10)
    logits[0, 4], logits[0, 6] = 2.0, 1.8
    seq = make_seq(SamplingParams(temperature=0, repetition_penalty=1.2), prompt=[4])
    assert sampler(logits, [seq]).token_ids == [6]  # 2.0 / 1.2 < 1.8
    seq = make_seq(SamplingParams(temperature=0, frequency_penalty=0.1), output=[4])
    assert sampler(logits, [seq]).token_ids == [4]  # 2.0 - 0.1 > 1.8
    seq = make_seq(SamplingParams(temperature=0, frequency_penalty=0.1), output=[4, 4, 4])
    assert sampler(logits, [seq]).token_ids == [6]  # 2.0 - 0.3 < 1.8
    seq = make_seq(SamplingParams(temperature=0, presence_penalty=0.1), output=[4, 4, 4])
    assert sampler(logits, [seq]).token_ids == [4]  # presence counts once: 1.9 > 1.8
    seq = make_seq(SamplingParams(temperature=0, presence_penalty=0.3), output=[4])
    assert sampler(logits, [seq]).token_ids == [6]
    seq = make_seq(SamplingParams(temperature=0, presence_penalty=-0.5), output=[6])
    assert sampler(logits, [seq]).token_ids == [6]


# ---------------------------------------------------------------------- logprobs
def test_logprobs_are_raw_log_softmax_with_chosen_and_top_n(sampler):
    logits = random_logits(3, vocab=40, seed=4)
    raw = torch.log_softmax(logits, dim=-1)
    lowest = int(logits[0].argmin())
    seqs = [make_seq(SamplingParams(temperature=0.5, logprobs=3, logit_bias={lowest: 100},
                                    repetition_penalty=1.7), prompt=[1, 5], name="a"),
            make_seq(SamplingParams(temperature=0, logprobs=20), name="b"),
            make_seq(SamplingParams(temperature=0, logprobs=0), name="c")]
    res = sampler(logits, seqs)
    assert res.token_ids[0] == lowest
    lp = res.logprobs[0]
    assert len(lp) == 4 and lp[lowest].rank == 40
    assert lp[lowest].logprob == pytest.approx(raw[0, lowest].item(), abs=1e-6)  # raw, not biased/tempered
    top3 = raw[0].topk(3)
    assert {t: v.rank for t, v in lp.items() if t != lowest} == {int(t): r for r, t in enumerate(top3.indices, 1)}
    for t, v in zip(top3.indices.tolist(), top3.values.tolist()):
        assert lp[t].logprob == pytest.approx(v, abs=1e-6)
    assert res.token_logprobs[0] == pytest.approx(raw[0, lowest].item())
    lp = res.logprobs[1]
    assert len(lp) == 20 and lp[res.token_ids[1]].rank == 1
    assert sorted(v.rank for v in lp.values()) == list(range(1, 21))
    for t, v in lp.items():
        assert v.logprob == pytest.approx(raw[1, t].item(), abs=1e-6)
    assert set(lp) == set(raw[1].topk(20).indices.tolist())
    assert list(res.logprobs[2]) == [res.token_ids[2]] and res.logprobs[2][res.token_ids[2]].rank == 1
    no = sampler(logits[:1], [make_seq(SamplingParams(temperature=0))])
    assert no.logprobs == [None] and no.token_logprobs == [None]


# ---------------------------------------------------------------------- seeds and statistics
def test_seeded_rows_do_not_depend_on_batch_or_sampler_state():
    logits = random_logits(1, vocab=100, seed=5, scale=1.0)
    params = SamplingParams(temperature=1.0)
    picks = []
    for sampler_seed, batch in ((0, 1), (1, 5), (None, 9)):
        sampler = Sampler(torch.device("cpu"), seed=sampler_seed)
        seqs = [make_seq(params, seed=None, name=f"o{i}") for i in range(batch - 1)] + \
               [make_seq(params, seed=42, output=[1, 2])]
        picks.append(sampler(logits.repeat(batch, 1), seqs).token_ids[-1])
    assert len(set(picks)) == 1
    # a different output position or seed draws different noise
    s = Sampler(torch.device("cpu"), seed=0)
    draws = {s(logits, [make_seq(params, seed=42, output=[1] * k)]).token_ids[0] for k in range(12)}
    assert len(draws) > 3


def freqs(tokens, vocab):
    return [tokens.count(t) / len(tokens) for t in range(vocab)]


def test_sampling_statistics():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log()[None].repeat(1500, 1)
    s = Sampler(torch.device("cpu"), seed=0)

    def draw(params, seeded=True):
        seqs = [make_seq(params, seed=i if seeded else None, name=f"s{i}") for i in range(1500)]
        return freqs(s(logits, seqs).token_ids, 3)

    f = draw(SamplingParams(temperature=1.0))
    assert 0.6 <= f[0] <= 0.8 and 0.14 <= f[1] <= 0.26 and 0.05 <= f[2] <= 0.15
    f = draw(SamplingParams(temperature=1.0), seeded=False)
    assert 0.6 <= f[0] <= 0.8 and 0.05 <= f[2] <= 0.15
    f = draw(SamplingParams(temperature=1.0, top_p=0.75))  # keeps 0.7 and 0.2 -> 7/9, 2/9
    assert f[2] == 0 and 0.72 <= f[0] <= 0.84
    f = draw(SamplingParams(temperature=1.0, top_k=2))
    assert f[2] == 0 and 0.72 <= f[0] <= 0.84
    f = draw(SamplingParams(temperature=1.0, min_p=0.2))  # 0.1 < 0.2 * 0.7 is dropped
    assert f[2] == 0 and 0.72 <= f[0] <= 0.84
    f = draw(SamplingParams(temperature=0.5))  # p^2: 0.49 : 0.04 : 0.01
    assert 0.87 <= f[0] <= 0.95 and f[2] <= 0.04
    f = draw(SamplingParams(temperature=4.0))  # p^(1/4) flattens
    assert 0.35 <= f[0] <= 0.5 and 0.2 <= f[2] <= 0.32


# ---------------------------------------------------------------------- SamplingParams validation
@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1.5), ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", float("nan")), ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", float("nan")),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", float("inf")),
    ("frequency_penalty", -3.0), ("frequency_penalty", float("nan")),
    ("repetition_penalty", 0.0), ("repetition_penalty", 2.5), ("repetition_penalty", float("inf")),
    ("repetition_penalty", float("nan")),
    ("min_tokens", -1), ("max_tokens", 0), ("max_tokens", 2.0),
    ("logprobs", 21), ("logprobs", -1), ("prompt_logprobs", 21), ("prompt_logprobs", 1.0),
    ("logit_bias", {5: 100.5}), ("logit_bias", {5: float("nan")}), ("logit_bias", {5: -float("inf")}),
    ("stop", [""]), ("stop", ["ok", ""]), ("seed", "7"), ("seed", 1.0),
])
def test_sampling_params_validation(field, value):
    with pytest.raises(SamplingError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)


def test_sampling_params_valid_edges_and_normalisation():
    SamplingParams(temperature=0, top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2,
                   repetition_penalty=2, logprobs=20, prompt_logprobs=0, logit_bias={1: -100, 2: 100}, max_tokens=None)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    with pytest.raises(SamplingError) as info:
        SamplingParams(min_tokens=5, max_tokens=4)
    assert info.value.param == "min_tokens"
    p = SamplingParams(stop_token_ids=[7], eos_token_ids=(0, 2))
    assert p.stop_ids() == {0, 2, 7}
    assert dataclasses.replace(p, ignore_eos=True).stop_ids() == {7}
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.1).greedy


# ---------------------------------------------------------------------- the engine's stop logic
def run(tok, successors, prompt="x", second=None, llm_kw=None, **params):
    model = scripted_model(successors, second=second)
    llm = LLM(model, tokenizer=tok, num_kv_blocks=64, **(llm_kw or {}))
    params.setdefault("temperature", 0)
    out = llm.generate(prompt_token_ids=[byte_ids(tok, prompt)], sampling_params=SamplingParams(**params))[0]
    return out.outputs[0], llm


def spelled(tok, text):
    return byte_ids(tok, text)


def test_script_runs_as_written(tok):
    succ = chain(tok, "xabcdefgh.")
    succ[spelled(tok, ".")[0]] = spelled(tok, ".")[0]
    out, _ = run(tok, succ, max_tokens=12)
    assert out.text == "abcdefgh...." and out.finish_reason == "length" and out.stop_reason is None
    assert out.token_ids == spelled(tok, "abcdefgh....")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(tok, include):
    succ = chain(tok, "xabcdefgh.")
    out, llm = run(tok, succ, stop="cd", include_stop_str_in_output=include, max_tokens=12)
    assert out.finish_reason == "stop" and out.stop_reason == "cd"
    assert out.text == ("abcd" if include else "ab")
    assert out.token_ids == spelled(tok, "abcd")  # generation ends on the token that completes the match
    # the earliest match of several wins
    out, _ = run(tok, succ, stop=["fg", "bcd", "zz"], include_stop_str_in_output=include, max_tokens=12)
    assert out.stop_reason == "bcd" and out.text == ("abcd" if include else "a")
    # a stop string inside one token's text, and a multi-byte character split over two tokens
    out, _ = run(tok, chain(tok, "xaé!b."), stop="é", include_stop_str_in_output=include, max_tokens=12)
    assert out.text == ("aé" if include else "a") and out.stop_reason == "é"
    assert out.token_ids == spelled(tok, "aé")


def test_stop_string_is_never_streamed_partially(tok):
    model = scripted_model(chain(tok, "xabcdefgh."))
    engine = LLM(model, tokenizer=tok, num_kv_blocks=64).engine
    engine.add_request("r", params=SamplingParams(temperature=0, stop="cde", max_tokens=12),
                       prompt_token_ids=byte_ids(tok, "x"))
    texts = []
    while engine.has_unfinished():
        for out in engine.step():
            texts.append((out.outputs[0].text, out.finished))
    assert texts[-1] == ("ab", True)
    for text, _ in texts:
        assert "ab".startswith(text), texts  # "abc" or "abcd" never shown


def test_stop_string_inside_a_long_token():
    from trinity.tokenizer import TrinityTokenizer, _assemble_byte_level

    merges = [("a", "b")] + [("ab" + "x" * i, "x") for i in range(40)]
    long_tok = TrinityTokenizer(_assemble_byte_level(merges))
    (long_id,) = long_tok.encode("ab" + "x" * 40)  # one token, 42 characters
    q, dot = long_tok.encode("q")[0], long_tok.encode(".")[0]
    model = scripted_model({q: long_id, long_id: dot, dot: dot})
    out = LLM(model, tokenizer=long_tok, num_kv_blocks=16).generate(
        prompt_token_ids=[[q]], sampling_params=SamplingParams(temperature=0, max_tokens=4, stop="ab"))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "ab"
    assert out.text == "" and out.token_ids == [long_id]


def test_stop_token_ids_set_stop_reason(tok):
    succ = chain(tok, "xabcdefgh.")
    c = spelled(tok, "c")[0]
    out, _ = run(tok, succ, stop_token_ids=[c], max_tokens=12)
    assert out.finish_reason == "stop" and out.stop_reason == c
    assert out.token_ids == spelled(tok, "abc")
    assert out.text.startswith("ab") and len(out.text) <= 3


def test_eos_and_ignore_eos(tok):
    a, b = spelled(tok, "ab")
    succ = {spelled(tok, "x")[0]: a, a: b, b: 2, 2: a}
    out, _ = run(tok, succ, max_tokens=10)
    assert out.token_ids == [a, b, 2] and out.finish_reason == "stop" and out.stop_reason is None
    assert out.text == "ab"
    out, _ = run(tok, succ, max_tokens=7, ignore_eos=True)
    assert out.token_ids == [a, b, 2, a, b, 2, a] and out.finish_reason == "length"
    assert out.text == "ababa"  # the special token is skipped in text
    out, _ = run(tok, succ, max_tokens=7, ignore_eos=True, skip_special_tokens=False)
    assert out.text == "ab<|im_end|>ab<|im_end|>a"


def test_min_tokens_in_the_engine(tok):
    z, q = spelled(tok, "zq")
    every = {t: 2 for t in range(512)}  # eos is always the favourite, z the runner-up
    second = {t: z for t in range(512)}
    out, _ = run(tok, every, second=second, max_tokens=10)
    assert out.token_ids == [2]
    out, _ = run(tok, every, second=second, max_tokens=10, min_tokens=3)
    assert out.token_ids == [z, z, z, 2] and out.finish_reason == "stop"
    out, _ = run(tok, {t: q for t in range(512)}, second=second, max_tokens=10, min_tokens=2, stop_token_ids=[q])
    assert out.token_ids == [z, z, q] and out.stop_reason == q


def test_max_tokens_gives_length(tok):
    succ = {t: spelled(tok, "y")[0] for t in range(512)}
    out, llm = run(tok, succ, max_tokens=5)
    assert out.token_ids == spelled(tok, "yyyyy") and out.finish_reason == "length" and out.text == "yyyyy"
    assert llm.engine.stats()["num_generated_tokens"] == 5


# ---------------------------------------------------------------------- n, prompt logprobs with a real model
def test_n_samples_are_different_and_indexed():
    model = tiny_model(seed=3, scale=1.0)
    p = random_prompts([6], seed=11)[0]
    out = LLM(model, num_kv_blocks=64).generate(
        prompt_token_ids=[p], sampling_params=SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in out.outputs)


def test_prompt_logprobs_first_is_none_and_tokens_decoded(tok):
    model = tiny_model(seed=0)
    llm = LLM(model, tokenizer=tok, num_kv_blocks=64)
    ids = byte_ids(tok, "hello")
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(prompt_logprobs=3, logprobs=2,
                                                                               max_tokens=2, temperature=0))[0]
    raw = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for i in range(1, len(ids)):
        lp = out.prompt_logprobs[i]
        assert ids[i] in lp and len(lp) in (3, 4)
        assert lp[ids[i]].logprob == pytest.approx(raw[i - 1, ids[i]].item(), abs=1e-4)
        assert lp[ids[i]].decoded_token == tok.decode([ids[i]])
    gen = out.outputs[0]
    assert len(gen.logprobs) == 2 and all(len(lp) == 2 for lp in gen.logprobs)  # greedy: chosen is the top
    assert gen.cumulative_logprob == pytest.approx(sum(lp[t].logprob for lp, t in zip(gen.logprobs, gen.token_ids)))
    assert not math.isnan(gen.cumulative_logprob)
