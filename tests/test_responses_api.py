"""POST /v1/responses (OpenAI's Responses API) end to end, through the real `openai` client against the built-in
model (greedy): text and message input, instructions, a function call and its output, json_schema, the token
limit (incomplete), streamed events that build the same items as a whole response, stored responses
(previous_response_id, GET / DELETE, scoped to the API key, LRU-bounded) and OpenAI-shaped errors.
The pieces that need no server (input items -> messages, output items and their events, the store) are tested
directly first.
"""

from __future__ import annotations

import json

import openai
import pytest

from trinity.loading import BUILTIN_MODEL
from trinity.serve.errors import APIError
from trinity.serve.responses import _Output, _Stripped
from trinity.serve.responses_protocol import ResponsesRequest, chat_request, input_items
from trinity.serve.responses_store import ResponseStore, StoredResponse, owner_of
from trinity.serve.tools import ToolCallDelta
from trinity.synthetic.tools import TOOL_SCHEMAS

from server_helpers import ServerProcess, assert_error, httpx

WEATHER_Q = "What's the weather in Paris in celsius?"
PARIS = {"city": "Paris", "temperature": 17, "unit": "celsius", "condition": "sunny"}
TOOLS = [{"type": "function", **TOOL_SCHEMAS[name]["function"]} for name in ("weather", "get_time", "search")]
GREEDY = {"model": BUILTIN_MODEL, "temperature": 0, "max_output_tokens": 300}


# ---------------------------------------------------------------------- without a server
def _messages(items, **body):
    return [m.model_dump(exclude_none=True) for m in chat_request(ResponsesRequest(input=items, **body),
                                                                  items).messages]


def test_items_fold_into_chat_turns():
    items = [{"role": "user", "content": [{"type": "input_text", "text": "q"}]},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "t"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"x\": 1}"},
             {"type": "function_call_output", "call_id": "c1", "output": "r1"},
             {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "r2"}]},
             {"type": "reasoning", "summary": [{"type": "summary_text", "text": "s"}]},
             {"role": "assistant", "content": "done"}]
    out = _messages(items, instructions="be brief")
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert out[0]["content"] == "be brief"
    turn = out[2]
    assert turn["reasoning_content"] == "t" and turn["content"][0]["text"] == "a"
    assert [(c["id"], c["function"]["name"]) for c in turn["tool_calls"]] == [("c1", "f"), ("c2", "g")]
    assert out[3] == {"role": "tool", "tool_call_id": "c1", "content": "r1"}
    assert out[4]["content"] == "r2"
    assert out[5]["reasoning_content"] == "s" and out[5]["content"] == "done"


def test_a_second_reasoning_item_starts_a_new_assistant_turn():
    items = [{"role": "user", "content": "q"},
             {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "1"}]},
             {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
             {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "2"}]},
             {"role": "assistant", "content": "x"}]
    out = _messages(items)
    assert [(m["role"], m.get("reasoning_content")) for m in out] == [("user", None), ("assistant", "1"),
                                                                      ("assistant", "2")]


@pytest.mark.parametrize("items, param", [
    ([{"type": "web_search_call"}], "input[0].type"),
    ([{"role": "robot", "content": "x"}], "input[0].role"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}], "input[0].content[0]"),
    ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id"),
    (["hello"], "input[0]"),
])
def test_bad_items_name_the_item(items, param):
    with pytest.raises(APIError) as e:
        body = ResponsesRequest(input=items)
        chat_request(body, input_items(body))
    assert e.value.status == 400 and e.value.param == param


def test_flat_tools_and_text_format_become_chat_fields():
    body = ResponsesRequest(input="q", tools=TOOLS[:1], tool_choice={"type": "function", "name": "weather"},
                            text={"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}},
                            max_output_tokens=7)
    chat = chat_request(body, [{"role": "user", "content": "q"}])
    assert chat.tools == [TOOL_SCHEMAS["weather"]]
    assert chat.response_format == {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}
    assert chat.max_completion_tokens == 7


def test_stripped_stream_is_strip_of_the_whole():
    for pieces in (["\n\n", " a", " b \n", "", "c\n", "\n "], ["   "], ["x"], ["\n", "y", " "]):
        s = _Stripped()
        assert "".join(s.feed(p) for p in pieces) == "".join(pieces).strip()


def test_output_items_are_the_same_whole_or_piecewise():
    call = [ToolCallDelta(0, id="c0", name="f", arguments=""), ToolCallDelta(0, arguments="{\"a\": 1}"),
            ToolCallDelta(1, id="c1", name="g", arguments="{}")]
    whole = _Output(True)
    events_whole = whole.add("think ", "\n\nanswer \n", call) + whole.finish(False)
    pieces = _Output(True)
    events = pieces.add("thi", "", []) + pieces.add("nk ", "\n\n", call[:1]) + pieces.add("", "ans", call[1:])
    events += pieces.add("", "wer \n", []) + pieces.finish(False)

    def without_ids(items):
        return [{k: v for k, v in item.items() if k != "id"} for item in items]

    assert without_ids(whole.items) == without_ids(pieces.items)
    assert [i["type"] for i in whole.items] == ["reasoning", "message", "function_call", "function_call"]
    assert whole.items[1]["content"][0]["text"] == "answer" and whole.items[2]["arguments"] == "{\"a\": 1}"
    # the events of both tell the same story, except how the text was split into deltas
    def story(evs):
        types = [e["type"] for e in evs]
        return [t for i, t in enumerate(types) if not (t.endswith(".delta") and i and types[i - 1] == t)]

    assert story(events_whole) == story(events)
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == pieces.items


def test_cut_off_marks_the_item_being_written_incomplete_and_parallel_off_keeps_one_call():
    out = _Output(False)
    out.add("thinking", "", [ToolCallDelta(0, id="a", name="f", arguments="{}"),
                             ToolCallDelta(1, id="b", name="g", arguments="{}")])
    out.finish(True)
    assert [(i["type"], i["status"]) for i in out.items] == [("reasoning", "incomplete"), ("function_call",
                                                                                            "completed")]


def test_store_is_lru_bounded_and_scoped_to_the_key():
    store = ResponseStore(2)
    alice, bob = owner_of({"authorization": "Bearer alice"}), owner_of({"x-api-key": "bob"})
    assert alice != bob and owner_of({}) is None and "alice" not in alice
    for i in range(3):
        store.put(f"r{i}", StoredResponse(alice, {"output": []}, []))
        store.get("r0", alice)  # r0 stays in use
    assert store.get("r1", alice) is None and store.get("r0", alice) and store.get("r2", alice)
    assert store.get("r0", bob) is None and store.get("r0", None) is None
    assert not store.delete("r0", bob) and store.delete("r0", alice) and store.get("r0", alice) is None
    ResponseStore(0).put("x", StoredResponse(None, {}, []))
    with pytest.raises(ValueError):
        ResponseStore(-1)


# ---------------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def server():
    # no server-side key: any bearer token is accepted, so stored responses can be scoped to different keys
    with ServerProcess("--model", BUILTIN_MODEL, "--enable-auto-tool-choice", name="responses") as s:
        yield s


def client_for(server: ServerProcess, key: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=120.0)


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


def plain(items) -> list[dict]:
    """Output items as dicts without their random ids, for comparing two responses."""
    out = []
    for item in items:
        d = item if isinstance(item, dict) else item.model_dump(exclude_none=True)
        out.append({k: v for k, v in d.items() if k not in ("id", "call_id", "parsed_arguments")})
    return out


@pytest.mark.server
def test_text_input_reasons_then_answers(client):
    r = client.responses.create(input="What is 27 + 58?", **GREEDY)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed"
    assert r.model == BUILTIN_MODEL and r.incomplete_details is None
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and "27 + 58" in reasoning.content[0].text
    assert reasoning.content[0].type == "reasoning_text" and "</think>" not in reasoning.content[0].text
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.content[0].type == "output_text" and r.output_text == "The answer is 85."
    u = r.usage
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.input_tokens > 0
    assert 0 < u.output_tokens_details.reasoning_tokens < u.output_tokens
    assert u.input_tokens_details.cached_tokens >= 0


@pytest.mark.server
def test_message_input_with_instructions(client):
    question = [{"role": "user", "content": [{"type": "input_text", "text": "What is 27 + 58?"}]}]
    bare = client.responses.create(input=question, **GREEDY)
    r = client.responses.create(input=question, instructions="You are a helpful assistant.", **GREEDY)
    assert r.instructions == "You are a helpful assistant."
    assert r.usage.input_tokens > bare.usage.input_tokens  # the instructions are in the prompt
    assert "85" in r.output_text


@pytest.mark.server
def test_function_call_and_its_output_round_trip(client):
    first = client.responses.create(input=WEATHER_Q, tools=TOOLS, **GREEDY)
    call = first.output[-1]
    assert call.type == "function_call" and call.name == "weather" and call.status == "completed"
    assert json.loads(call.arguments) == {"city": "Paris", "unit": "celsius"} and call.call_id
    # the caller keeps the conversation: earlier items go back as they came, with the tool's result
    items = [{"role": "user", "content": WEATHER_Q}] + [i.model_dump(exclude_none=True) for i in first.output] + \
        [{"type": "function_call_output", "call_id": call.call_id, "output": json.dumps(PARIS)}]
    second = client.responses.create(input=items, tools=TOOLS, store=False, **GREEDY)
    assert second.status == "completed" and "17" in second.output_text
    assert [i.type for i in second.output] == ["reasoning", "message"]


@pytest.mark.server
def test_forced_tool_choice(client):
    r = client.responses.create(input=WEATHER_Q, tools=TOOLS, tool_choice={"type": "function", "name": "weather"},
                                **GREEDY)
    *thinking, call = r.output  # whether it thinks first is the chat pipeline's choice
    assert [i.type for i in thinking] in ([], ["reasoning"])
    assert call.type == "function_call" and call.name == "weather"
    assert json.loads(call.arguments)["city"] == "Paris"
    none = client.responses.create(input="What is 27 + 58?", tools=TOOLS, tool_choice="none", **GREEDY)
    assert all(i.type != "function_call" for i in none.output)


@pytest.mark.server
def test_json_schema_text_format(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "city": {"type": "string"}},
              "required": ["name", "age", "city"], "additionalProperties": False}
    r = client.responses.create(
        instructions="Reply with a JSON object with the keys name (string), age (integer), city (string).",
        input="Anna Smith is 34 years old and lives in Lisbon.",
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}}, **GREEDY)
    value = json.loads(r.output_text)
    assert set(value) == {"name", "age", "city"} and value["age"] == 34
    assert r.text.format.type == "json_schema"
    obj = client.responses.create(input="Answer only with JSON, keys: answer (boolean), capital (string).\n"
                                        "Is Paris the capital of France?", text={"format": {"type": "json_object"}},
                                  **GREEDY)
    assert isinstance(json.loads(obj.output_text), dict)


@pytest.mark.server
def test_max_output_tokens_makes_it_incomplete(client):
    r = client.responses.create(input="What is 27 + 58?", **{**GREEDY, "max_output_tokens": 5})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5
    (reasoning,) = r.output  # cut off inside its thinking
    assert reasoning.type == "reasoning" and reasoning.status == "incomplete"
    with client.responses.stream(input="What is 27 + 58?", **{**GREEDY, "max_output_tokens": 5}) as stream:
        types = [e.type for e in stream]
    assert types[-1] == "response.incomplete"


def _stream_items(client, **kw):
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    return events, final


@pytest.mark.server
@pytest.mark.parametrize("question, tools", [("What is 27 + 58?", None), (WEATHER_Q, TOOLS)],
                         ids=["text", "tool-call"])
def test_streamed_and_whole_give_the_same_items(client, question, tools):
    kw = dict(input=question, **GREEDY, **({"tools": tools} if tools else {}))
    whole = client.responses.create(**kw)
    events, final = _stream_items(client, **kw)
    assert plain(final.output) == plain(whole.output) and final.status == whole.status == "completed"
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type == "response.completed" and events[-1].response.id == events[0].response.id
    # the items done in the stream are the final ones, in output order
    done = [e for e in events if e.type == "response.output_item.done"]
    assert [e.output_index for e in done] == list(range(len(whole.output)))
    assert plain([e.item for e in done]) == plain(whole.output)
    # and the deltas add up to them
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert reasoning == whole.output[0].content[0].text
    if tools:
        args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert args == whole.output[-1].arguments
    else:
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text


@pytest.mark.server
def test_sse_frames_name_their_event(server):
    with httpx.stream("POST", f"{server.base_url}/v1/responses", timeout=120.0,
                      json={"input": "What is 27 + 58?", "stream": True, **GREEDY}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in r.read().decode().split("\n\n") if f.strip()]
    for frame in frames:
        event_line, data_line = frame.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        assert json.loads(data_line[6:])["type"] == event_line[7:]
    assert "[DONE]" not in frames[-1]


@pytest.mark.server
def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(input=WEATHER_Q, tools=TOOLS, **GREEDY)
    call = first.output[-1]
    # only the tool's result is sent: the question and the call come from the stored response
    second = client.responses.create(previous_response_id=first.id, tools=TOOLS, **GREEDY, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps(PARIS)}])
    assert second.previous_response_id == first.id and "17" in second.output_text
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 5
    # streamed continuation: the same answer
    _, streamed = _stream_items(client, previous_response_id=first.id, tools=TOOLS, **GREEDY, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps(PARIS)}])
    assert plain(streamed.output) == plain(second.output)
    # retrieved as it was returned; deleted, it is gone
    got = client.responses.retrieve(second.id)
    assert got.id == second.id and plain(got.output) == plain(second.output) and got.usage == second.usage
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)


@pytest.mark.server
def test_store_false_is_not_kept(client):
    r = client.responses.create(input="What is 27 + 58?", store=False, **GREEDY)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


@pytest.mark.server
def test_unknown_ids_are_404(server):
    for stream in (False, True):  # a stream refused before it begins is a plain JSON error
        r = server.http.post("/v1/responses", json={"input": "hi", "previous_response_id": "resp_nope",
                                                    "stream": stream})
        assert_error(r, 404, "not_found_error", param="previous_response_id", code="response_not_found")
    assert_error(server.http.get("/v1/responses/resp_nope"), 404, "not_found_error", code="response_not_found")
    assert_error(server.http.delete("/v1/responses/resp_nope"), 404, "not_found_error", code="response_not_found")


@pytest.mark.server
def test_stored_responses_belong_to_their_key(server, client):
    r = client.responses.create(input="What is 27 + 58?", **{**GREEDY, "max_output_tokens": 3})
    bob = client_for(server, "bob")
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(input="hi", previous_response_id=r.id, **GREEDY)
    assert_error(httpx.get(f"{server.base_url}/v1/responses/{r.id}"), 404, "not_found_error")  # no key
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(r.id)
    assert client.responses.retrieve(r.id).id == r.id  # still there for its owner


@pytest.mark.server
def test_store_size_bounds_it_least_recently_used_first():
    with ServerProcess("--model", BUILTIN_MODEL, "--responses-store-size", "2", api_key="k", name="lru") as s:
        c = s.client
        ids = [c.responses.create(input="What is 27 + 58?", **{**GREEDY, "max_output_tokens": 2}).id
               for _ in range(2)]
        c.responses.retrieve(ids[0])  # used: now the second is the least recently used
        ids.append(c.responses.create(input="hi", **{**GREEDY, "max_output_tokens": 2}).id)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(ids[1])
        assert c.responses.retrieve(ids[0]).id == ids[0] and c.responses.retrieve(ids[2]).id == ids[2]
        # the server's own key guards the route
        assert_error(httpx.post(f"{s.base_url}/v1/responses", json={"input": "hi"}), 401, "authentication_error")


BAD = [
    ("no-input", {}, "input"),
    ("empty-input", {"input": []}, "input"),
    ("hosted-tool", {"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ("bad-tool-name", {"input": "hi", "tools": [{"type": "function", "name": "a b"}]}, "tools[0].name"),
    ("unknown-tool-choice", {"input": "hi", "tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice"),
    ("image-part", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ("unknown-item", {"input": [{"type": "computer_call"}]}, "input[0].type"),
    ("schema-missing", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
     "text.format.schema"),
    ("format-type", {"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ("max-output-zero", {"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ("temperature", {"input": "hi", "temperature": 3}, "temperature"),
    ("background", {"input": "hi", "background": True}, "background"),
    ("bad-arguments", {"input": [{"role": "user", "content": "hi"},
                                 {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]},
     "input[1].arguments"),
    ("too-long", {"input": "hi", "max_output_tokens": 10 ** 7}, "max_output_tokens"),
]


@pytest.mark.server
@pytest.mark.parametrize("body, param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_are_openai_shaped_400s(server, body, param):
    assert_error(server.http.post("/v1/responses", json=body), 400, "invalid_request_error", param=param)


@pytest.mark.server
def test_unknown_model_is_404(server):
    assert_error(server.http.post("/v1/responses", json={"input": "hi", "model": "gpt-9"}), 404, "not_found_error",
                 param="model")
