"""`trinity serve` end to end with the real `openai` client: chat and text completions (whole and streamed),
n, stop, seeds, logprobs, the reasoning split, tool calls, structured output, tokenize, models, metrics.

The tiny preset has random weights and a byte-level tokenizer: its text is gibberish, so tests that need
known text steer the sampler with `logit_bias` (a +100 bias on a few tokens makes the model pick only
those) and read the raw tokens back from `logprobs`.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server_helpers import API_KEY, MAX_MODEL_LEN, ServerProcess, assert_error, parse_metrics, token_id

pytestmark = pytest.mark.server

MODEL = "tiny"
HI = [{"role": "user", "content": "hi"}]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                    "celsius": {"type": "boolean"}},
                   "required": ["city", "celsius"], "additionalProperties": False}}}
PING = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, PING]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def client(server):
    return server.client


@pytest.fixture(scope="module")
def alt_server():
    """qwen3_coder tool parser, no reasoning parser, a served name of its own, no prefix caching."""
    with ServerProcess("--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder", "--reasoning-parser",
                       "none", "--served-model-name", "trinity-test", "--max-model-len", str(MAX_MODEL_LEN),
                       "--no-enable-prefix-caching",
                       api_key=API_KEY, name="qwen3-none") as s:
        yield s


def validates(value, schema: dict) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def bias_for(server, *texts: str, value: float = 100) -> dict[str, float]:
    return {str(token_id(server, t)): value for t in texts}


def stream_chat(client, **kw):
    """Streamed chat -> (chunks, reasoning, content, finish_reasons by index)."""
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **kw))
    reasoning, content, finish = {}, {}, {}
    for ch in chunks:
        for c in ch.choices:
            d = c.delta
            r = getattr(d, "reasoning_content", None) or (d.model_extra or {}).get("reasoning_content")
            reasoning[c.index] = reasoning.get(c.index, "") + (r or "")
            content[c.index] = content.get(c.index, "") + (d.content or "")
            if c.finish_reason:
                assert c.index not in finish, "two finish_reasons for one choice"
                finish[c.index] = c.finish_reason
    return chunks, reasoning, content, finish


def reasoning_of(message) -> str | None:
    return (message.model_extra or {}).get("reasoning_content")


# ---------------------------------------------------------------------- basics
def test_models_lists_served_name(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "trinity"
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_chat_plain(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 8
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the default template prefills "<think>\n": unless the model closed it, everything is reasoning
    assert isinstance(choice.message.content, str)


def test_chat_model_may_be_omitted(server):
    r = server.http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL


def test_chat_stream(client):
    chunks, reasoning, content, finish = stream_chat(client, messages=HI, max_tokens=12, seed=4,
                                                     stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True})
    first, last_choice, usage_chunk = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert all(c.delta.role in (None, "assistant") for ch in chunks[1:] for c in ch.choices)
    assert len({ch.id for ch in chunks}) == 1 and all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert last_choice.choices[0].finish_reason == "length"
    assert finish == {0: "length"}
    assert all(c.finish_reason is None for ch in chunks[:-2] for c in ch.choices)
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 12
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 12
    assert reasoning[0] or content[0]  # (seeded: these 12 tokens are not all blank or special)


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, stream=True))
    assert all(ch.usage is None and ch.choices for ch in chunks)


def test_completions_plain(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL
    (choice,) = r.choices
    assert choice.finish_reason == "length" and isinstance(choice.text, str)
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == len("Once upon a time")


def test_completions_echo_and_token_prompts(client, server):
    ids = server.http.post("/tokenize", json={"prompt": "abc"}).json()["tokens"]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, echo=True)
    assert r.choices[0].text.startswith("abc")
    r = client.completions.create(model=MODEL, prompt=["one", "two", "three"], max_tokens=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.prompt_tokens == len("one") + len("two") + len("three")


def test_completions_stream_matches_whole(client):
    kw = dict(model=MODEL, prompt="The weather", max_tokens=10, seed=7, temperature=0.8)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.text for ch in chunks for c in ch.choices)
    assert text == whole.choices[0].text
    finals = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n2_chat_and_completions(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, n=2, seed=3,
                                       extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 10
    _, reasoning, content, finish = stream_chat(client, messages=HI, max_tokens=5, n=2, seed=3,
                                                extra_body={"ignore_eos": True})
    assert finish == {0: "length", 1: "length"}
    for c in r.choices:  # same seed: the streamed choices are the whole ones
        assert content[c.index] == c.message.content
        assert (reasoning[c.index] or None) == reasoning_of(c.message)
    r = client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=3, n=2,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 12


def test_completions_stream_many_prompts_n2(client):
    chunks = list(client.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=4, n=2, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    finals = sorted((c.index, c.finish_reason) for ch in chunks for c in ch.choices if c.finish_reason)
    assert finals == [(0, "length"), (1, "length"), (2, "length"), (3, "length")]
    assert chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == len("one") + len("two")


def test_stop_string(client, server):
    """With only 'a' and 'b' possible, the text stops before the first 'b' of the same seeded sample."""
    bias = bias_for(server, "a", "b")
    kw = dict(model=MODEL, prompt="x", max_tokens=40, seed=11, logit_bias=bias, extra_body={"ignore_eos": True})
    free = client.completions.create(**kw).choices[0]
    assert set(free.text) <= {"a", "b"} and "b" in free.text, free.text
    stopped = client.completions.create(stop=["b"], **kw).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:free.text.index("b")]
    assert stopped.model_extra.get("stop_reason") == "b"
    kept = client.completions.create(stop="b", extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
                                     **{k: v for k, v in kw.items() if k != "extra_body"}).choices[0]
    assert kept.text == stopped.text + "b"


def test_seed_stream_equals_whole_chat(client):
    kw = dict(messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=24, seed=1234, temperature=0.8)
    whole = client.chat.completions.create(model=MODEL, **kw)
    again = client.chat.completions.create(model=MODEL, **kw)
    assert again.choices[0].message.content == whole.choices[0].message.content
    _, reasoning, content, finish = stream_chat(client, **kw)
    message = whole.choices[0].message
    assert content[0] == message.content
    assert (reasoning[0] or None) == reasoning_of(message)
    assert finish[0] == whole.choices[0].finish_reason


def test_different_seeds_differ(client):
    texts = {client.completions.create(model=MODEL, prompt="x", max_tokens=16, seed=s, temperature=1.0,
                                       extra_body={"ignore_eos": True}).choices[0].text for s in range(3)}
    assert len(texts) > 1


def test_logprobs_chat(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6 == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.token, str) and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert entry.logprob <= values[0] + 1e-4
    # streamed: the logprobs of all chunks together cover every token
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, logprobs=True,
                                                 top_logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    streamed = [e for ch in chunks for c in ch.choices if c.logprobs for e in c.logprobs.content]
    assert len(streamed) == 6 and all(len(e.top_logprobs) == 2 for e in streamed)


def test_logprobs_without_top(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, logprobs=True)
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
    assert r.choices[0].logprobs is None


def test_logprobs_completions(client):
    # greedy: a sampled run could draw byte tokens whose one-token strings cannot add up to the decoded text
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=5, logprobs=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)


@pytest.mark.parametrize("skip", [True, False])
def test_logprob_tokens_follow_the_special_token_rule_of_the_text(server, client, skip):
    special = server.http.post("/tokenize", json={"prompt": "<|im_start|>", "add_special_tokens": False}).json()
    (token,) = special["tokens"]
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, logprobs=1, temperature=0,
                                  logit_bias={str(token): 100},
                                  extra_body={"ignore_eos": True, "skip_special_tokens": skip})
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text == ("" if skip else "<|im_start|>" * 3)


def test_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=7,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    # max_completion_tokens wins over the legacy max_tokens
    r = client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=3, max_tokens=9,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_tokenize_detokenize_round_trip(server):
    text = "Hello, wörld! 👋 <think> done"
    r = server.http.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    r = server.http.post("/detokenize", json={"tokens": body["tokens"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": text}


def test_tokenize_messages_matches_chat_usage(server, client):
    r = server.http.post("/tokenize", json={"messages": HI})
    assert r.status_code == 200, r.text
    prompt = server.http.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert prompt.endswith("<think>\n")  # the generation prompt with the thinking prefill
    chat = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    assert chat.usage.prompt_tokens == r.json()["count"]


def test_metrics(server, client):
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    r = server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = parse_metrics(r.text)
    assert 0 <= m['trinity:kv_cache_usage_perc{pool="full"}'] <= 1
    assert 0 <= m['trinity:kv_cache_usage_perc{pool="sliding"}'] <= 1
    assert m['trinity:time_to_first_token_seconds_bucket{le="+Inf"}'] >= 1
    assert any(k.startswith("trinity:time_to_first_token_seconds_bucket") for k in m)
    assert [k for k in m if k.startswith("trinity:moe_load_imbalance")]
    assert all(v >= 1 - 1e-9 for k, v in m.items() if k.startswith("trinity:moe_load_imbalance"))
    assert sum(v for k, v in m.items() if k.startswith("trinity:request_success_total")) >= 1
    assert "trinity:num_requests_running" in m and "trinity:num_requests_waiting" in m
    for name in ("prompt_tokens_total", "generation_tokens_total"):
        assert m[f"trinity:{name}"] > 0
    assert "# TYPE trinity:time_to_first_token_seconds histogram" in r.text


def test_repeated_prompt_reports_cached_tokens(server, client):
    """The second identical prompt takes every whole block but its last token's from the prefix cache, and
    says so in usage (as OpenAI does) and in /metrics."""
    messages = [{"role": "system", "content": "Answer in one word. " * 15 + "Ticket 5821-prefix."},
                {"role": "user", "content": "Which colour is the sky?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    n = first.usage.prompt_tokens
    assert n > 64 and first.usage.prompt_tokens_details.cached_tokens < n // 2  # its text is new
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert second.usage.prompt_tokens == n
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16  # the block size is 16
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16
    for _ in range(2):  # the completions API reports it too
        done = client.completions.create(model=MODEL, prompt="Reply with a number. " * 12, max_tokens=1)
    assert done.usage.prompt_tokens_details.cached_tokens == (done.usage.prompt_tokens - 1) // 16 * 16 > 0
    m = parse_metrics(server.http.get("/metrics").text)
    assert m["trinity:prefix_cache_hits_total"] >= 2 * ((n - 1) // 16 * 16)
    assert m["trinity:prefix_cache_queries_total"] >= 3 * n


def test_cache_salt_separates_tenants(server, client):
    messages = [{"role": "user", "content": "Summarise the ticket. " * 8 + "Ticket 9913-salt."}]

    def cached(**extra):
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, extra_body=extra)
        return r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens

    first, n = cached(cache_salt="tenant-a")
    assert n > 48 and first < n // 2
    assert cached(cache_salt="tenant-b")[0] < n // 2  # another tenant does not see tenant a's blocks
    assert cached(cache_salt="tenant-a")[0] == (n - 1) // 16 * 16
    r = server.http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "cache_salt": ""})
    assert_error(r, 400, "invalid_request_error")


def test_prefix_caching_can_be_turned_off(alt_server):
    messages = [{"role": "user", "content": "Name a colour. " * 10}]
    for _ in range(2):
        r = alt_server.client.chat.completions.create(model="trinity-test", messages=messages, max_tokens=1)
        assert r.usage.prompt_tokens > 32 and r.usage.prompt_tokens_details.cached_tokens == 0
    m = parse_metrics(alt_server.http.get("/metrics").text)
    assert m["trinity:prefix_cache_hits_total"] == 0


def test_openapi(server):
    r = server.http.get("/openapi.json")
    assert r.status_code == 200
    spec = json.loads(r.text)
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    for path, method in [("/v1/chat/completions", "post"), ("/v1/completions", "post"), ("/v1/models", "get"),
                         ("/tokenize", "post"), ("/detokenize", "post"), ("/health", "get"), ("/metrics", "get")]:
        assert method in paths.get(path, {}), path
    assert "ChatCompletionRequest" in spec["components"]["schemas"]


# ---------------------------------------------------------------------- reasoning
def _forced_chat(client, server, seed: int, stream: bool = False, **kw):
    """A chat response made only of 'a', 'b' and '</think>' tokens; the raw text comes from logprobs."""
    bias = bias_for(server, "a", "b", "</think>")
    args = dict(messages=HI, max_tokens=12, seed=seed, logit_bias=bias, logprobs=True,
                extra_body={"ignore_eos": True, **kw})
    if stream:
        return stream_chat(client, **args)
    return client.chat.completions.create(model=MODEL, **args)


def test_reasoning_split_forced(client, server):
    """The prompt ends in the <think>\\n prefill: text up to the first </think> is reasoning, the rest content."""
    for seed in range(20):
        r = _forced_chat(client, server, seed)
        raw = "".join(e.token for e in r.choices[0].logprobs.content)
        head, sep, tail = raw.partition("</think>")
        if head and sep and tail:
            break
    else:
        pytest.fail("no seed gave reasoning, </think> and content")
    message = r.choices[0].message
    assert set(raw.replace("</think>", "")) <= {"a", "b"}
    assert reasoning_of(message) == head
    assert message.model_extra.get("reasoning") == head
    assert message.content == tail  # later </think> tags stay in the content
    # the same seed streamed gives the same split
    _, reasoning, content, finish = _forced_chat(client, server, seed, stream=True)
    assert reasoning[0] == head and content[0] == tail and finish == {0: "length"}


def test_reasoning_unclosed_is_all_reasoning(client, server):
    bias = bias_for(server, "a")
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, logit_bias=bias,
                                       extra_body={"ignore_eos": True})
    assert reasoning_of(r.choices[0].message) == "aaaaa"
    assert r.choices[0].message.content == ""


def test_enable_thinking_false_is_all_content(client, server):
    bias = bias_for(server, "a", "b")
    kw = dict(messages=HI, max_tokens=6, seed=5, logit_bias=bias,
              extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}})
    r = client.chat.completions.create(model=MODEL, **kw)
    message = r.choices[0].message
    assert reasoning_of(message) is None
    assert len(message.content) == 6 and set(message.content) <= {"a", "b"}
    _, reasoning, content, _ = stream_chat(client, **kw)
    assert reasoning[0] == "" and content[0] == message.content
    prompt = server.http.post("/tokenize", json={"messages": HI}).json()["tokens"]
    r2 = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r2.usage.prompt_tokens < len(prompt)  # no "<think>\n" prefill


def test_reasoning_parser_none(alt_server):
    client = alt_server.client
    bias = bias_for(alt_server, "a", "</think>")
    r = client.chat.completions.create(model="trinity-test", messages=HI, max_tokens=8, seed=2, logit_bias=bias,
                                       logprobs=True, extra_body={"ignore_eos": True})
    raw = "".join(e.token for e in r.choices[0].logprobs.content)
    assert reasoning_of(r.choices[0].message) is None
    assert r.choices[0].message.content == raw


def test_served_model_name(alt_server):
    assert [m.id for m in alt_server.client.models.list().data] == ["trinity-test"]
    r = alt_server.http.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 1})
    assert_error(r, 404, "not_found_error", param="model")
    r = alt_server.client.chat.completions.create(model="trinity-test", messages=HI, max_tokens=1)
    assert r.model == "trinity-test"


# ---------------------------------------------------------------------- tools and structured output
def _check_call(call, names=("get_weather", "ping")):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    args = json.loads(call.function.arguments)
    assert validates(args, SCHEMAS[call.function.name]), (call.function.name, args)
    return args


# Forced calls are Hermes blocks after the reasoning: a short reasoning budget leaves the random model room for them,
# and a bias on <|im_end|> ends the answer after the first block.
SHORT_THINKING = {"thinking_token_budget": 8}


def test_tool_choice_required(client, server):
    close = bias_for(server, "<|im_end|>", value=50)  # one call, then stop
    for seed in range(2):
        r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=100, tools=TOOLS,
                                           tool_choice="required", logit_bias=close, seed=seed,
                                           extra_body=SHORT_THINKING)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None and len(choice.message.tool_calls) >= 1
        for call in choice.message.tool_calls:
            _check_call(call)
    # without the bias the model may write several calls; each must still be valid
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=200, tools=[WEATHER],
                                       tool_choice="required", seed=1, extra_body=SHORT_THINKING)
    if r.choices[0].finish_reason == "tool_calls":
        for call in r.choices[0].message.tool_calls:
            _check_call(call, ("get_weather",))


def _stream_tool_calls(client, **kw):
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **kw))
    calls: dict[int, dict] = {}
    finish = None
    for ch in chunks:
        for c in ch.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                if d.index not in calls:  # the first delta of a call: id, type and name
                    assert d.id and d.type == "function" and d.function.name, d
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and not d.function.name, d
                calls[d.index]["arguments"] += d.function.arguments or ""
    return chunks, calls, finish


def test_tool_choice_required_stream(client, server):
    close = bias_for(server, "<|im_end|>", value=50)
    _, calls, _ = _stream_tool_calls(client, messages=HI, max_tokens=100, tools=TOOLS, tool_choice="required",
                                     logit_bias=close, seed=0, extra_body=SHORT_THINKING)
    assert calls
    for call in calls.values():
        assert call["name"] in SCHEMAS
        assert validates(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    # same seed, whole response: the same calls
    whole = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=100, tools=TOOLS,
                                           tool_choice="required", logit_bias=close, seed=0,
                                           extra_body=SHORT_THINKING)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls] == \
        [(c["name"], json.loads(c["arguments"])) for c in calls.values()]


def test_tool_choice_required_stream_finish_reason(client, server):
    close = bias_for(server, "<|im_end|>", value=50)
    _, calls, finish = _stream_tool_calls(client, messages=HI, max_tokens=100, tools=TOOLS,
                                          tool_choice="required", logit_bias=close, seed=0, extra_body=SHORT_THINKING)
    assert calls
    assert finish == "tool_calls"


def test_named_tool_choice(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=100, tools=TOOLS, tool_choice=choice,
                                       extra_body=SHORT_THINKING)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    _check_call(call, ("get_weather",))
    assert r.choices[0].finish_reason == "tool_calls"
    _, calls, _ = _stream_tool_calls(client, messages=HI, max_tokens=100, tools=TOOLS, tool_choice=choice,
                                     extra_body=SHORT_THINKING)
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    assert validates(json.loads(calls[0]["arguments"]), SCHEMAS["get_weather"])


def test_tool_choice_none_and_auto(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.tool_calls is None
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, tools=TOOLS)  # auto (hermes)
    for call in r.choices[0].message.tool_calls or []:
        _check_call(call)


def test_auto_tool_call_qwen3_coder(alt_server):
    """Auto tool choice parsed by qwen3_coder. The random model cannot write a call by itself, so a
    response_format JSON string (an enum of one value) makes it write the XML call inside quotes."""
    xml = ("<tool_call><function=get_weather><parameter=city>Rome</parameter>"
           "<parameter=celsius>true</parameter></function></tool_call>")
    fmt = {"type": "json_schema", "json_schema": {"name": "call", "schema": {"type": "string", "enum": [xml]}}}
    client = alt_server.client
    r = client.chat.completions.create(model="trinity-test", messages=HI, max_tokens=200, tools=TOOLS,
                                       tool_choice="auto", response_format=fmt)
    choice = r.choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Rome", "celsius": True}
    assert choice.message.content == '""'  # the JSON string's quotes are all that is left
    assert choice.finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(model="trinity-test", messages=HI, max_tokens=200, tools=TOOLS,
                                                 tool_choice="auto", response_format=fmt, stream=True))
    calls, content, finish = {}, "", None
    for ch in chunks:
        for c in ch.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.type == "function" and d.function.name == "get_weather"
                    calls[d.index] = ""
                calls[d.index] += d.function.arguments or ""
    assert list(calls) == [0] and json.loads(calls[0]) == {"city": "Rome", "celsius": True}
    assert content == '""' and finish == "tool_calls"


def test_response_format_json_schema(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "color": {"type": "string", "enum": ["red", "green", "blue"]},
                                               "tags": {"type": "array", "items": {"type": "string",
                                                                                  "enum": ["x", "y"]},
                                                        "maxItems": 3}},
              "required": ["ok", "color"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=100, response_format=fmt, seed=seed,
                                           extra_body=SHORT_THINKING)
        choice = r.choices[0]
        assert choice.finish_reason == "stop"
        value = json.loads(choice.message.content)
        assert validates(value, schema), value
    _, _, content, finish = stream_chat(client, messages=HI, max_tokens=100, response_format=fmt, seed=0,
                                        extra_body=SHORT_THINKING)
    assert validates(json.loads(content[0]), schema) and finish == {0: "stop"}


def test_response_format_json_object(client, server):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=100,
                                       response_format={"type": "json_object"}, logit_bias=bias_for(server, "}"))
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    for seed in range(3):  # unsteered: whenever it finishes, it is an object
        r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=60, seed=seed,
                                           response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=MODEL, prompt="{", max_tokens=100, logit_bias=bias_for(server, "}"),
                                  extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].text), dict)


def test_response_format_text(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, response_format={"type": "text"})
    assert r.choices[0].finish_reason in ("length", "stop")


# ---------------------------------------------------------------------- incoming messages
def test_incoming_message_shapes_accepted(client, server):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"},
                                     {"type": "input_text", "text": "And Rome?"}]},
        {"role": "assistant", "content": None, "reasoning_content": "REASON-ONE",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "celsius": true}'}},
                        {"id": "call_2", "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Rome", "celsius": False}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "19 C"}]},
        {"role": "assistant", "content": "Sunny.", "reasoning": "REASON-TWO"},
        {"role": "user", "content": "Thanks", "name": "alice"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    tokens = server.http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    prompt = server.http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    for text in ("REASON-ONE", "REASON-TWO", "Answer in French.", "And Rome?", "21 C", "19 C", "Sunny."):
        assert text in prompt, text
    # an assistant turn last, continued without a generation prompt
    r = server.http.post("/v1/chat/completions", json={
        "messages": [*HI, {"role": "assistant", "content": [{"type": "output_text", "text": "Hel"}]}],
        "add_generation_prompt": False, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_unknown_fields_ignored(server):
    r = server.http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "metadata": {"a": 1},
                                                        "store": False, "service_tier": "auto", "user": "u1"})
    assert r.status_code == 200, r.text


def test_openai_client_error_types(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, temperature=5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HI)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
