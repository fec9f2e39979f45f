"""Scoring text through /v1/completions (`echo` + `logprobs`, `max_tokens=0`), the way lm-eval and other
harnesses use it, and the engine's prompt-only requests (max_tokens=0) under it.

The served values are checked against the log-softmax of the built-in model's logits computed here, in-process
and in fp32, for the same tokens: the server must return the model's own prompt scores, not merely well-formed
numbers.
"""

from __future__ import annotations

import math

import pytest
import torch

from trinity.engine.llm import LLM
from trinity.engine.sampling_params import SamplingError, SamplingParams
from trinity.loading import BUILTIN_MODEL, load_model

from engine_helpers import assert_pools_free, random_prompts, reference_logprobs, tiny_model
from server_helpers import ServerProcess, assert_error, sse_events

COMPLETIONS = "/v1/completions"
CAPITAL = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n<think>\n"
           "The capital of France is")
SUM = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n<think>\n12 + 30\n"


# ---------------------------------------------------------------------- the engine: prompt-only requests
@pytest.fixture(scope="module")
def model16():
    return tiny_model(seed=1, scale=4, sliding_window=16)


@pytest.mark.parametrize("budget", [2048, 7], ids=["whole", "chunk7"])
@pytest.mark.parametrize("lookahead", [False, True], ids=["sync", "lookahead"])
def test_max_tokens_zero_scores_the_prompt_and_samples_nothing(model16, budget, lookahead):
    prompts = random_prompts([30, 12, 25, 9], seed=3)
    llm = LLM(model16, block_size=4, max_num_batched_tokens=budget, num_kv_blocks=200, async_scheduling=lookahead)
    generating = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    params = [SamplingParams(prompt_logprobs=3, max_tokens=0), generating,
              SamplingParams(prompt_logprobs=0, max_tokens=0, n=2), generating]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    for p, o, sp in zip(prompts, outs, params):
        if sp.max_tokens == 0:
            assert all(c.token_ids == [] and c.text == "" and c.finish_reason == "length" for c in o.outputs)
            assert len(o.prompt_logprobs) == len(p) and o.prompt_logprobs[0] is None
            ref = reference_logprobs(model16, p)
            for i in range(1, len(p)):
                assert o.prompt_logprobs[i][p[i]].logprob == pytest.approx(ref[i - 1, p[i]].item(), abs=1e-4)
        else:
            assert len(o.outputs[0].token_ids) == 6  # the generating requests beside them are unaffected
    # the prompt-only ones alone: the same tokens for the others as when they run without them
    alone = llm.generate(prompt_token_ids=[prompts[1], prompts[3]], sampling_params=generating)
    assert [o.outputs[0].token_ids for o in alone] == [outs[1].outputs[0].token_ids, outs[3].outputs[0].token_ids]
    assert llm.engine.num_generated_tokens == 4 * 6
    assert_pools_free(llm.engine)


def test_max_tokens_zero_abort_and_validation(model16):
    llm = LLM(model16, block_size=4, max_num_batched_tokens=7, num_kv_blocks=200)
    engine = llm.engine
    engine.add_request("r", params=SamplingParams(prompt_logprobs=1, max_tokens=0),
                       prompt_token_ids=random_prompts([40])[0])
    engine.step()  # a first chunk of its prompt
    final = engine.abort("r")
    assert final.finished and final.outputs[0].finish_reason == "abort" and final.outputs[0].token_ids == []
    assert not engine.has_unfinished()
    assert_pools_free(engine)
    # 0 means "score the prompt": without prompt_logprobs there is nothing to return
    with pytest.raises(SamplingError) as info:
        SamplingParams(max_tokens=0)
    assert info.value.param == "max_tokens"
    with pytest.raises(SamplingError) as info:
        SamplingParams(max_tokens=0, prompt_logprobs=0, min_tokens=1)
    assert info.value.param == "min_tokens"


# ---------------------------------------------------------------------- the server, with the built-in model
@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", BUILTIN_MODEL, "--dtype", "float32", "--device", "cpu", name="scoring") as s:
        yield s


@pytest.fixture(scope="module")
def reference():
    """The built-in model in this process, fp32: prompt ids -> log-softmax of its logits [T, V]."""
    loaded = load_model(BUILTIN_MODEL, dtype="float32", device="cpu")

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(loaded.model(torch.tensor([ids])).float()[0], dim=-1)

    logprobs.tokenizer = loaded.tokenizer
    return logprobs


def _score(server, **kw) -> dict:
    r = server.http.post(COMPLETIONS, json={"model": BUILTIN_MODEL, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def assert_offsets_index_the_text(lp: dict, text: str) -> None:
    """Each token's text starts at its offset in the returned text, and the tokens make up all of it."""
    assert "".join(lp["tokens"]) == text
    ends = lp["text_offset"][1:] + [len(text)]
    for token, start, end in zip(lp["tokens"], lp["text_offset"], ends):
        assert text[start:end] == token, (token, start, end)


def assert_prompt_scores(lp: dict, ids: list[int], ref: torch.Tensor, top_n: int) -> None:
    """The first len(ids) entries of `lp` are the prompt's: null first, then the reference's values."""
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        top = lp["top_logprobs"][i]
        assert len(top) == top_n
        assert sorted(top.values(), reverse=True) == pytest.approx(ref[i - 1].topk(top_n).values.tolist(), abs=1e-4)


@pytest.mark.server
@pytest.mark.parametrize("as_ids", [False, True], ids=["text", "token_ids"])
def test_echo_logprobs_are_the_models_own(server, reference, as_ids):
    ids = reference.tokenizer.encode(CAPITAL)
    body = _score(server, prompt=ids if as_ids else CAPITAL, max_tokens=1, echo=True, logprobs=2)
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    ref = reference(ids)
    assert choice["text"] == CAPITAL + " Paris" and choice["finish_reason"] == "length"
    assert len(lp["tokens"]) == len(ids) + 1
    assert_prompt_scores(lp, ids, ref, 2)
    # the generated token: the greedy one, scored at the prompt's last position
    paris = reference.tokenizer.encode(" Paris")
    assert len(paris) == 1 and lp["token_logprobs"][-1] == pytest.approx(ref[-1, paris[0]].item(), abs=1e-4)
    assert ref[-1].argmax().item() == paris[0]
    assert_offsets_index_the_text(lp, choice["text"])
    assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (len(ids), 1)


@pytest.mark.server
def test_max_tokens_zero_scores_the_prompt_only(server, reference):
    ids = reference.tokenizer.encode(SUM)
    body = _score(server, prompt=SUM, max_tokens=0, echo=True, logprobs=1)
    (choice,) = body["choices"]
    assert choice["text"] == SUM and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    assert_prompt_scores(choice["logprobs"], ids, reference(ids), 1)
    assert_offsets_index_the_text(choice["logprobs"], SUM)
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == len(ids)
    # without logprobs: the prompt comes back, unscored
    body = _score(server, prompt=SUM, max_tokens=0, echo=True)
    assert body["choices"][0]["text"] == SUM and body["choices"][0]["logprobs"] is None
    server.wait_idle()  # every prompt-only request gave its blocks back


@pytest.mark.server
@pytest.mark.parametrize("body,param", [
    ({"prompt": "Hello", "max_tokens": 0}, "max_tokens"),  # nothing generated, nothing echoed: vLLM refuses it too
    ({"prompt": [1, 2], "max_tokens": 0, "logprobs": 1}, "max_tokens"),
    ({"prompt": "Hello", "max_tokens": -1, "echo": True}, "max_tokens"),
    ({"prompt": "Hello", "max_tokens": 0, "echo": True, "min_tokens": 1}, "min_tokens"),
])
def test_max_tokens_zero_errors(server, body, param):
    assert_error(server.http.post(COMPLETIONS, json=body), 400, "invalid_request_error", param=param)


@pytest.mark.server
@pytest.mark.parametrize("max_tokens", [0, 1])
def test_batched_prompts_each_get_their_own_prompt_scores(server, reference, max_tokens):
    tok = reference.tokenizer
    texts = [CAPITAL, SUM, "Hello"]
    for prompt in (texts, [tok.encode(t) for t in texts]):
        body = _score(server, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=1)
        choices = sorted(body["choices"], key=lambda c: c["index"])
        assert [c["index"] for c in choices] == [0, 1, 2]
        for text, choice in zip(texts, choices):
            ids = tok.encode(text)
            lp = choice["logprobs"]
            assert choice["text"].startswith(text) and len(lp["tokens"]) == len(ids) + max_tokens
            assert_prompt_scores(lp, ids, reference(ids), 1)
            assert_offsets_index_the_text(lp, choice["text"])
            # the same as the prompt alone
            alone = _score(server, prompt=text, max_tokens=max_tokens, echo=True, logprobs=1)["choices"][0]
            assert alone["logprobs"]["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)


def _streamed(server, **kw) -> list[dict]:
    """The choices of a streamed response, each put back together from its chunks (text and logprobs joined)."""
    with server.http.stream("POST", COMPLETIONS, json={"model": BUILTIN_MODEL, "temperature": 0, "stream": True,
                                                       **kw}) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    joined: dict[int, dict] = {}
    for event in events[:-1]:
        for c in event["choices"]:
            into = joined.setdefault(c["index"], {"index": c["index"], "text": "", "logprobs": None,
                                                  "finish_reason": None})
            if not into["text"] and not into["logprobs"]:
                # the first chunk of a choice carries its whole prompt (text and scores)
                assert c["text"].startswith(kw["prompt"] if isinstance(kw["prompt"], str) else "")
            into["text"] += c["text"]
            if c["logprobs"] is not None:
                into["logprobs"] = c["logprobs"] if into["logprobs"] is None else {
                    k: into["logprobs"][k] + c["logprobs"][k] for k in c["logprobs"]}
            into["finish_reason"] = c["finish_reason"] or into["finish_reason"]
    return [joined[i] for i in sorted(joined)]


@pytest.mark.server
@pytest.mark.parametrize("kw", [
    dict(prompt=CAPITAL, max_tokens=0),
    dict(prompt=SUM, max_tokens=12),
    dict(prompt=SUM, max_tokens=40, stop=["write 2"]),  # text held back for a stop string: offsets still agree
    dict(prompt=[CAPITAL, SUM], max_tokens=3, n=2),
], ids=["max_tokens_0", "generating", "stop_string", "batched_n2"])
def test_streamed_equals_whole(server, kw):
    whole = _score(server, echo=True, logprobs=2, **kw)
    choices = sorted(whole["choices"], key=lambda c: c["index"])
    streamed = _streamed(server, echo=True, logprobs=2, **kw)
    if "stop" in kw:
        assert choices[0]["finish_reason"] == "stop" and choices[0]["text"].endswith("= 2, ")
    assert [c["index"] for c in streamed] == [c["index"] for c in choices]
    for s, w in zip(streamed, choices):
        assert s["text"] == w["text"] and s["finish_reason"] == w["finish_reason"]
        assert s["logprobs"]["tokens"] == w["logprobs"]["tokens"]
        assert s["logprobs"]["text_offset"] == w["logprobs"]["text_offset"]
        assert s["logprobs"]["token_logprobs"][0] is None
        assert s["logprobs"]["token_logprobs"][1:] == pytest.approx(w["logprobs"]["token_logprobs"][1:], abs=1e-5)


@pytest.mark.server
def test_openai_client_reads_the_scores(server, reference):
    """The `openai` client's typed view of an lm-eval-style request (echo, logprobs=1, max_tokens=1)."""
    ids = reference.tokenizer.encode(CAPITAL)
    r = server.client.completions.create(model=BUILTIN_MODEL, prompt=CAPITAL + " Paris", max_tokens=1, echo=True,
                                         logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    continuation = lp.token_logprobs[len(ids):-1]  # lm-eval's slice: after the context, before the generated token
    assert len(continuation) == 1 and math.isclose(continuation[0], reference(ids)[-1].max().item(), abs_tol=1e-4)
    assert all(tok == max(top.values()) for tok, top in zip(continuation, lp.top_logprobs[len(ids):-1]))


@pytest.mark.server
def test_offsets_of_a_prompt_with_characters_split_across_tokens(server, reference):
    text = "Café ☕ in Reykjavík"
    ids = reference.tokenizer.encode(text)
    pieces = [reference.tokenizer.decode([t]) for t in ids]
    assert any("\ufffd" in p for p in pieces)  # some token holds part of a character
    lp = _score(server, prompt=ids, max_tokens=0, echo=True, logprobs=0)["choices"][0]["logprobs"]
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < len(text)
    # a token's offset is where the character holding its first byte starts, so the text between consecutive
    # offsets is what the tokens before the next one decode to
    for i, start in enumerate(offsets):
        assert text[:start] == reference.tokenizer.decode(ids[:i]).rstrip("\ufffd")
