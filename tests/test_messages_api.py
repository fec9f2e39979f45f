"""Anthropic's Messages API (`POST /v1/messages`) end to end, through the real `anthropic` client and raw HTTP.

The server runs the built-in trained model (`trinity-tiny`), greedy, so the answers are exact: it reasons, then
answers arithmetic, and calls the weather tool in Hermes format. The first tests check the request translation
alone (no server): the route reuses the chat pipeline, so what it sends that pipeline is the contract.
"""

from __future__ import annotations

import json

import pytest

from trinity.loading import BUILTIN_MODEL
from trinity.serve.errors import APIError
from trinity.serve.messages import to_chat_request
from trinity.serve.messages_protocol import MessagesRequest
from trinity.synthetic.tools import TOOL_SCHEMAS

from server_helpers import API_KEY, ServerProcess, assert_clean_message, assert_error, httpx

try:  # pinned in the `frameworks` extra; the translation tests run without it
    import anthropic
except ImportError:  # pragma: no cover
    anthropic = None

GREEDY = {"temperature": 0}  # the SDK no longer takes sampling fields as arguments: they go in the body
ARITHMETIC = [{"role": "user", "content": "What is 12 + 30?"}]
WEATHER = [{"role": "user", "content": "What's the weather in Paris in celsius?"}]
TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
          "input_schema": t["function"]["parameters"]} for t in TOOL_SCHEMAS.values()]


def chat_of(**body) -> dict:
    request = MessagesRequest.model_validate({"model": "m", "max_tokens": 50, **body})
    return to_chat_request(request).model_dump(exclude_none=True)


# ---------------------------------------------------------------------- the translation (no server)
def test_blocks_become_chat_messages():
    chat = chat_of(system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}],
                   messages=[
                       {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                       {"role": "assistant", "content": [
                           {"type": "thinking", "thinking": "call it", "signature": "x"},
                           {"type": "text", "text": "Checking."},
                           {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}]},
                       {"role": "user", "content": [
                           {"type": "tool_result", "tool_use_id": "toolu_1",
                            "content": [{"type": "text", "text": "5"}]},
                           {"type": "tool_result", "tool_use_id": "toolu_2", "content": "down", "is_error": True},
                           {"type": "text", "text": "and now?"}]}])
    roles = [(m["role"], m.get("content")) for m in chat["messages"]]
    assert roles == [("system", "Be brief.\nUse tools."), ("user", "weather?"), ("assistant", "Checking."),
                     ("tool", "5"), ("tool", "Error: down"), ("user", "and now?")]
    assistant = chat["messages"][2]
    assert assistant["reasoning_content"] == "call it"  # a thinking block passed back is that turn's reasoning
    assert assistant["tool_calls"] == [{"id": "toolu_1", "type": "function",
                                        "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]
    assert chat["messages"][3]["tool_call_id"] == "toolu_1"


def test_sampling_tools_and_thinking_map_onto_the_chat_request():
    chat = chat_of(messages=ARITHMETIC, temperature=0.5, top_p=0.9, top_k=20, stop_sequences=["END"],
                   tools=TOOLS[:1], tool_choice={"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
                   thinking={"type": "disabled"}, metadata={"user_id": "u"})
    assert (chat["temperature"], chat["top_p"], chat["top_k"], chat["stop"], chat["max_tokens"]) == \
        (0.5, 0.9, 20, ["END"], 50)
    assert chat["tools"] == [TOOL_SCHEMAS["weather"]]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["chat_template_kwargs"] == {"enable_thinking": False}
    for kind, expected in (("auto", "auto"), ("any", "required"), ("none", "none")):
        assert chat_of(messages=ARITHMETIC, tools=TOOLS, tool_choice={"type": kind})["tool_choice"] == expected
    enabled = chat_of(messages=ARITHMETIC, thinking={"type": "enabled", "budget_tokens": 1024})
    assert "chat_template_kwargs" not in enabled  # the template's default: the thinking prefill
    assert enabled["thinking_token_budget"] == 1024


def test_requests_the_chat_pipeline_cannot_honour_are_refused():
    with pytest.raises(APIError, match="prefill"):
        chat_of(messages=[*ARITHMETIC, {"role": "assistant", "content": "The answer"}])
    with pytest.raises(APIError, match="cannot hold a tool_use"):
        chat_of(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}]}])
    with pytest.raises(APIError, match="needs a name"):
        chat_of(messages=ARITHMETIC, tools=TOOLS, tool_choice={"type": "tool"})
    with pytest.raises(ValueError, match="type 'image'"):
        chat_of(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}])


# ---------------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", BUILTIN_MODEL, "--enable-auto-tool-choice", api_key=API_KEY,
                       name="messages") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    if anthropic is None:
        pytest.skip("the anthropic client is not installed (pip install -e '.[frameworks]')")
    # the SDK appends /v1/messages to the server's root
    return anthropic.Anthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120.0)


def create(client, messages, **kw):
    kw.setdefault("max_tokens", 300)
    return client.messages.create(model=BUILTIN_MODEL, messages=messages, extra_body=GREEDY, **kw)


def streamed(client, messages, **kw):
    kw.setdefault("max_tokens", 300)
    with client.messages.stream(model=BUILTIN_MODEL, messages=messages, extra_body=GREEDY, **kw) as stream:
        return stream.get_final_message()


def blocks(message, ids: bool = True) -> list[dict]:
    out = [b.model_dump(exclude_none=True) for b in message.content]
    if not ids:
        for b in out:
            b.pop("id", None)  # tool_use ids are fresh per response
    return out


@pytest.mark.server
def test_answers_with_a_thinking_block_then_text(client):
    r = create(client, ARITHMETIC)
    assert r.id.startswith("msg_") and r.type == "message" and r.role == "assistant" and r.model == BUILTIN_MODEL
    thinking, text = r.content
    assert thinking.type == "thinking" and "12 + 30" in thinking.thinking and "</think>" not in thinking.thinking
    assert thinking.signature
    assert text.type == "text" and text.text.strip() == "The answer is 42."
    assert r.stop_reason == "end_turn" and r.stop_sequence is None
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0


@pytest.mark.server
def test_tool_use_round_trip(client):
    r = create(client, WEATHER, tools=TOOLS)
    assert r.stop_reason == "tool_use"
    assert [b.type for b in r.content] == ["thinking", "tool_use"]
    call = r.content[-1]
    assert call.id.startswith("toolu_") and call.name == "weather"
    assert call.input == {"city": "Paris", "unit": "celsius"}
    # the assistant turn goes back as it came (its thinking included), then the tool's result
    result = {"city": "Paris", "temperature": 17, "unit": "celsius", "condition": "sunny"}
    messages = [*WEATHER, {"role": "assistant", "content": blocks(r)},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                              "content": [{"type": "text", "text": json.dumps(result)}]}]}]
    r = create(client, messages, tools=TOOLS)
    assert r.stop_reason == "end_turn"
    assert r.content[-1].type == "text" and "17" in r.content[-1].text


@pytest.mark.server
def test_count_tokens_is_what_the_model_reads(client, server):
    """`messages.count_tokens` (POST /v1/messages/count_tokens) gives the `usage.input_tokens` the same messages,
    system prompt, tools and thinking get from /v1/messages; tools and a system prompt add their tokens; a bad body
    is an Anthropic-shaped 400."""
    system = "Answer briefly."
    for kw in ({}, {"system": system}, {"tools": TOOLS}, {"system": system, "tools": TOOLS},
               {"thinking": {"type": "disabled"}}):
        counted = client.messages.count_tokens(model=BUILTIN_MODEL, messages=WEATHER, **kw).input_tokens
        assert counted == create(client, WEATHER, max_tokens=1, **kw).usage.input_tokens, kw
    plain = client.messages.count_tokens(model=BUILTIN_MODEL, messages=WEATHER).input_tokens
    both = client.messages.count_tokens(model=BUILTIN_MODEL, messages=WEATHER, system=system, tools=TOOLS)
    assert both.input_tokens > plain + len(system.split())
    r = server.http.post("/v1/messages/count_tokens", json={"model": BUILTIN_MODEL, "messages": []})
    assert "messages" in assert_anthropic_error(r, 400, "invalid_request_error")


@pytest.mark.server
@pytest.mark.parametrize("messages,tools", [(ARITHMETIC, None), (WEATHER, TOOLS)], ids=["text", "tool_use"])
def test_streamed_equals_whole(client, messages, tools):
    kw = {"tools": tools} if tools else {}
    whole, stream = create(client, messages, **kw), streamed(client, messages, **kw)
    assert blocks(stream, ids=False) == blocks(whole, ids=False)
    assert (stream.stop_reason, stream.stop_sequence) == (whole.stop_reason, whole.stop_sequence)
    assert stream.usage.input_tokens == whole.usage.input_tokens
    assert stream.usage.output_tokens == whole.usage.output_tokens


def raw_events(server, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of a raw /v1/messages stream, checking the SSE framing on the way."""
    events, name = [], None
    with server.http.stream("POST", "/v1/messages", json={"stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert data["type"] == name, (name, data)
                events.append((name, data))
            else:
                assert line == "", line
    return events


@pytest.mark.server
def test_stream_event_grammar(server):
    events = raw_events(server, {"model": BUILTIN_MODEL, "max_tokens": 300, "temperature": 0, "messages": WEATHER,
                                 "tools": TOOLS})
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    started = events[0][1]["message"]
    assert started["content"] == [] and started["stop_reason"] is None and started["usage"]["input_tokens"] > 0
    # blocks open and close one at a time, numbered from 0
    open_index, seen, kinds = None, [], {}
    for name, data in events:
        if name == "content_block_start":
            assert open_index is None
            open_index = data["index"]
            seen.append(open_index)
            kinds[open_index] = data["content_block"]["type"]
        elif name == "content_block_delta":
            assert data["index"] == open_index
            expected = {"thinking": ("thinking_delta", "signature_delta"), "text": ("text_delta",),
                        "tool_use": ("input_json_delta",)}[kinds[open_index]]
            assert data["delta"]["type"] in expected
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
    assert open_index is None and seen == list(range(len(seen)))
    assert list(kinds.values()) == ["thinking", "tool_use"]
    thinking_deltas = [d["delta"]["type"] for n, d in events if n == "content_block_delta" and d["index"] == 0]
    assert thinking_deltas[-1] == "signature_delta"  # the signature closes the thinking block
    arguments = "".join(d["delta"]["partial_json"] for n, d in events
                        if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None} and delta["usage"]["output_tokens"] > 0


@pytest.mark.server
def test_max_tokens_cut(client):
    for message in (create(client, ARITHMETIC, max_tokens=10), streamed(client, ARITHMETIC, max_tokens=10)):
        assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 10
        assert [b.type for b in message.content] == ["thinking"]  # cut inside the reasoning


@pytest.mark.server
def test_stop_sequences(client):
    # the model's column arithmetic writes "write 4" on its tens line
    for message in (create(client, ARITHMETIC, stop_sequences=["write 4"]),
                    streamed(client, ARITHMETIC, stop_sequences=["write 4"])):
        assert message.stop_reason == "stop_sequence" and message.stop_sequence == "write 4"
        assert "write 2" in message.content[0].thinking and "write 4" not in message.content[0].thinking


@pytest.mark.server
def test_thinking_disabled_has_no_thinking_block(client):
    enabled = create(client, ARITHMETIC, thinking={"type": "enabled", "budget_tokens": 1024})
    assert enabled.content[0].type == "thinking"
    for message in (create(client, ARITHMETIC, thinking={"type": "disabled"}),
                    streamed(client, ARITHMETIC, thinking={"type": "disabled"})):
        assert [b.type for b in message.content] == ["text"]
        # trinity-tiny always reasoned in training: without the prefill its reasoning is part of the text
        assert "42" in message.content[0].text


@pytest.mark.server
def test_thinking_budget_closes_the_reasoning(client):
    free = create(client, ARITHMETIC)
    budgeted = create(client, ARITHMETIC, thinking={"type": "enabled", "budget_tokens": 8})
    assert budgeted.content[0].type == "thinking" and budgeted.content[-1].type == "text"
    assert len(budgeted.content[0].thinking) < len(free.content[0].thinking)
    assert budgeted.content[0].thinking in free.content[0].thinking  # greedy: the same start, cut short
    assert budgeted.stop_reason == "end_turn"


@pytest.mark.server
def test_named_tool_choice_forces_a_call(client):
    r = create(client, WEATHER, tools=TOOLS, tool_choice={"type": "tool", "name": "weather"}, max_tokens=200)
    assert r.stop_reason == "tool_use"
    (call,) = [b for b in r.content if b.type == "tool_use"]
    assert call.name == "weather" and set(call.input) == {"city", "unit"}


@pytest.mark.server
def test_system_prompt_and_both_key_headers(server):
    body = {"model": BUILTIN_MODEL, "max_tokens": 300, "temperature": 0, "system": "You are a helpful assistant.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What is 12 + 30?"}]}]}
    for headers in ({"x-api-key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}):
        r = server.http.post("/v1/messages", json=body, headers={"Authorization": "", **headers})
        assert r.status_code == 200, r.text
        assert r.json()["content"][-1]["text"].strip() == "The answer is 42."


# ---------------------------------------------------------------------- errors
def assert_anthropic_error(response, status: int, type_: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert body["error"]["type"] == type_, body
    assert_clean_message(body["error"]["message"])
    return body["error"]["message"]


@pytest.mark.server
def test_errors_are_anthropic_shaped(server):
    base = {"model": BUILTIN_MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    post = server.http.post
    missing = dict(base)
    del missing["max_tokens"]
    assert "max_tokens" in assert_anthropic_error(post("/v1/messages", json=missing), 400, "invalid_request_error")
    image = {**base, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}
    assert "image" in assert_anthropic_error(post("/v1/messages", json=image), 400, "invalid_request_error")
    assert_anthropic_error(post("/v1/messages", content=b"{", headers={"content-type": "application/json"}), 400,
                           "invalid_request_error")
    for headers in ({"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}, {}):
        r = httpx_post(server, "/v1/messages", base, headers)
        assert_anthropic_error(r, 401, "authentication_error")
    assert "claude" in assert_anthropic_error(post("/v1/messages", json={**base, "model": "claude-sonnet-4-5"}),
                                              404, "not_found_error")
    assert_anthropic_error(post("/v1/messages/nothing", json=base), 404, "not_found_error")


def httpx_post(server, path: str, body: dict, headers: dict):
    """Without the key `server.http` sends by default."""
    return httpx.post(f"{server.base_url}{path}", json=body, headers=headers, timeout=60.0)


@pytest.mark.server
def test_body_limit_is_anthropic_shaped_on_messages(default_server):
    # the shared server's limit is 200 kB; the limit answers before any route runs, so it picks the shape itself
    big = {"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 300_000}]}
    assert_anthropic_error(default_server.http.post("/v1/messages", json=big), 413, "request_too_large")
    assert_error(default_server.http.post("/v1/chat/completions", json=big), 413, "invalid_request_error")


@pytest.mark.server
def test_the_client_raises_its_own_error_classes(server, client):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=ARITHMETIC)
    assert e.value.body["error"]["type"] == "not_found_error"
    bad_key = anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad_key.messages.create(model=BUILTIN_MODEL, max_tokens=5, messages=ARITHMETIC)


@pytest.mark.server
def test_error_after_the_stream_began_is_an_error_event(server):
    # a forced tool call cut by max_tokens is known to be incomplete only at the end
    events = raw_events(server, {"model": BUILTIN_MODEL, "max_tokens": 3, "temperature": 0, "messages": WEATHER,
                                 "tools": TOOLS, "tool_choice": {"type": "tool", "name": "weather"}})
    assert events[0][0] == "message_start"
    name, data = events[-1]
    assert name == "error" and data["error"]["type"] == "invalid_request_error" and "max_tokens" in \
        data["error"]["message"]


@pytest.mark.server
def test_openai_routes_keep_openai_errors(server):
    r = httpx_post(server, "/v1/chat/completions", {"messages": ARITHMETIC, "max_tokens": 5}, {"x-api-key": "wrong"})
    assert_error(r, 401, "authentication_error", code="invalid_api_key")
    assert_error(server.http.post("/v1/chat/completions", json={"max_tokens": 3}), 400, "invalid_request_error",
                 param="messages")
    assert_error(server.http.post("/v1/chat/completions", json={"model": "claude-x", "messages": ARITHMETIC}), 404,
                 "not_found_error")
    # and the OpenAI route takes the x-api-key header too
    r = httpx_post(server, "/v1/chat/completions", {"messages": ARITHMETIC, "max_tokens": 5}, {"x-api-key": API_KEY})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------- fuzzing: no input makes a 5xx
@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative", "repaired"])
def test_fuzzed_bodies_get_no_server_error(default_server, mode):
    """schemathesis on /v1/messages from the server's own OpenAPI schema (the random-weight `tiny` preset: fast).
    "repaired" bodies name the served model and keep to short generations, so most of them run."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    from server_helpers import AUTH

    schema = schemathesis.openapi.from_url(default_server.base_url + "/openapi.json", headers=AUTH, timeout=30)
    operation = schema["/v1/messages"]["POST"]
    statuses: dict[int, int] = {}

    @settings(max_examples=40, deadline=None, database=None, derandomize=True, print_blob=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=operation.as_strategy(generation_mode=GenerationMode.NEGATIVE if mode == "negative"
                                      else GenerationMode.POSITIVE))
    def run(case):
        body = case.body
        if isinstance(body, dict):
            if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 4:
                body["max_tokens"] = 4  # valid stays valid: only long generations are cut
            if mode == "repaired":
                body["model"] = "tiny"
                body.pop("tools", None)
                body.pop("tool_choice", None)
                if isinstance(body.get("stop_sequences"), list):
                    body["stop_sequences"] = [s for s in body["stop_sequences"] if s] or None
        response = case.call(base_url=default_server.base_url, headers=AUTH, timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (response.status_code, response.text[:2000], case.body)
        if response.status_code >= 400:
            assert response.json()["type"] == "error", response.text

    run()
    assert sum(statuses.values()) >= 1
    if mode == "repaired":
        assert statuses.get(200, 0) > 0, statuses
    default_server.wait_idle(timeout=30)
