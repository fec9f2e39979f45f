"""Server hardening for structured output (issue 26): schemas compile off the event loop, within a time limit and
size limits; remote $refs are refused and `required` names an undeclared property only as JSON Schema means it;
a forced tool call cut by the client's stop is a 400, never a 500; /openapi.json documents the real errors."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("xgrammar")

from trinity.serve import structured  # noqa: E402
from trinity.serve.structured import GrammarBackend, StructuredOutputError  # noqa: E402
from trinity.tokenizer import build_byte_level_tokenizer  # noqa: E402

from server_helpers import assert_error, sse_events, token_id  # noqa: E402

VOCAB = 512  # the tiny preset's


def _enum_schema(n: int) -> dict:
    return {"type": "object", "properties": {"x": {"type": "string", "enum": [f"value number {i}" for i in range(n)]}},
            "required": ["x"]}


@pytest.fixture(scope="module")
def tok():
    return build_byte_level_tokenizer()


@pytest.fixture(scope="module")
def backend(tok):
    return GrammarBackend(tok, VOCAB)


def _accepts(backend, tok, schema: dict, text: str) -> bool:
    matcher = backend.json_schema(schema)().matcher
    return all(matcher.accept_token(t) for t in tok.encode(text)) and matcher.is_completed()


def test_the_backend_is_built_before_the_server_is_ready():
    """Importing xgrammar holds the GIL for about half a second: done at the first request with a schema, it stalled
    every stream (benchmarks/fairness.py: a short request took 0.37 s, 12x its time alone). The server builds the
    backend while it loads, before it says it is ready."""
    from engine_helpers import tiny_model
    from trinity.engine.async_engine import AsyncEngine
    from trinity.engine.engine import LLMEngine
    from trinity.serve.state import ServerSettings, ServerState

    state = ServerState(ServerSettings())
    state.attach(AsyncEngine(LLMEngine(tiny_model(seed=0), build_byte_level_tokenizer())))
    try:
        assert state.ready and state._grammar is not None and state._grammar.vocab_size == state.vocab_size
    finally:
        state.engine.shutdown()


# ---------------------------------------------------------------------- limits, checked before compiling
@pytest.mark.parametrize("schema,limit", [
    (_enum_schema(1001), "1000 enum values"),
    ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5001)}}, "5000 object properties"),
    ({"type": "object", "properties": {"a": {"type": "string", "description": "x" * (300 << 10)}}}, "262144 bytes"),
])
def test_limits_are_refused_by_name(backend, schema, limit):
    before = backend.num_compiles
    with pytest.raises(StructuredOutputError) as e:
        backend.compile_json_schema(schema)
    assert limit in e.value.message and e.value.code == "schema_too_complex", e.value.message
    assert backend.num_compiles == before


def test_depth_limit(backend):
    schema: dict = {"type": "integer"}
    for _ in range(40):
        schema = {"type": "array", "items": schema}
    with pytest.raises(StructuredOutputError, match="deeper than the limit of 32 levels"):
        backend.compile_json_schema(schema)


def test_limits_are_configurable(tok):
    small = GrammarBackend(tok, VOCAB, limits=structured.SchemaLimits(max_enum_values=3))
    with pytest.raises(StructuredOutputError, match="more than 3 enum values"):
        small.compile_json_schema(_enum_schema(4))
    assert small.compile_json_schema(_enum_schema(3)) is not None


# ---------------------------------------------------------------------- what the schema means
def test_remote_ref_is_refused(backend):
    schema = {"type": "object", "properties": {"a": {"$ref": "http://example.com/a.json"}}, "required": ["a"]}
    with pytest.raises(StructuredOutputError, match=r'"\$ref" to another document'):
        backend.compile_json_schema(schema)
    local = {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "required": ["a"],
             "$defs": {"a": {"type": "integer"}}}
    assert backend.compile_json_schema(local) is not None


def test_required_undeclared_property_is_enforced(backend, tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}
    original = json.dumps(schema)
    assert not _accepts(backend, tok, schema, '{"a":1}')  # JSON Schema: "b" must be present
    assert _accepts(backend, tok, schema, '{"a":1,"b":[1,{"x":"y"}]}')  # with any value
    assert json.dumps(schema) == original  # the caller's schema is not modified
    typed = {**schema, "additionalProperties": {"type": "boolean"}}
    assert _accepts(backend, tok, typed, '{"a":1,"b":true}') and not _accepts(backend, tok, typed, '{"a":1,"b":2}')


def test_required_undeclared_with_no_additional_properties_is_refused(backend):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"],
              "additionalProperties": False}
    with pytest.raises(StructuredOutputError, match="no JSON value matches"):
        backend.compile_json_schema(schema)


# ---------------------------------------------------------------------- off the loop, time limit, one compile
def test_compile_runs_off_the_event_loop(tok):
    """A slow compile (well past 1 s here) leaves the event loop free: a 10 ms ticker keeps ticking."""
    be = GrammarBackend(tok, VOCAB, limits=structured.SchemaLimits(max_enum_values=100_000, max_bytes=1 << 22),
                        compile_seconds=60)

    async def main():
        gaps, done = [], False

        async def ticker():
            last = time.perf_counter()
            while not done:
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = asyncio.ensure_future(ticker())
        start = time.perf_counter()
        await be.json_schema_async(_enum_schema(12_000))
        took = time.perf_counter() - start
        done = True
        await task
        return took, max(gaps)

    took, worst = asyncio.run(main())
    assert took > 0.5, took  # the schema is slow enough for the check to mean something
    assert worst < 0.3, (took, worst)


def test_compile_time_limit(tok):
    be = GrammarBackend(tok, VOCAB, limits=structured.SchemaLimits(max_enum_values=100_000, max_bytes=1 << 22),
                        compile_seconds=0.01)
    with pytest.raises(StructuredOutputError) as e:
        asyncio.run(be.json_schema_async(_enum_schema(6000)))
    assert e.value.status == 400 and e.value.code == "schema_too_complex", e.value.message
    assert "0.01 s (--max-grammar-compile-seconds)" in e.value.message


def test_concurrent_identical_schemas_compile_once(tok):
    be = GrammarBackend(tok, VOCAB)
    schema = _enum_schema(900)

    async def main():
        return await asyncio.gather(*(be.json_schema_async(json.loads(json.dumps(schema))) for _ in range(6)))

    factories = asyncio.run(main())
    assert be.num_compiles == 1
    assert len({id(f.compiled_grammar) for f in factories}) == 1


# ---------------------------------------------------------------------- the server
WEATHER = {"type": "function", "function": {"name": "weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
NAMED = {"type": "function", "function": {"name": "weather"}}


def _chat(server, **extra):
    body = {"messages": [{"role": "user", "content": "weather in Paris?"}], "max_tokens": 32,
            "chat_template_kwargs": {"enable_thinking": False}, **extra}
    return server.http.post("/v1/chat/completions", json=body, timeout=30)


def _format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.server
def test_server_refuses_a_huge_enum_at_once(default_server):
    # 5,000 values (110 kB: under the shared server's body limit); 20,000 kept the old server busy for 20 s
    start = time.perf_counter()
    r = _chat(default_server, response_format=_format(_enum_schema(5000)))
    err = assert_error(r, 400, "invalid_request_error", param="response_format.json_schema.schema",
                       code="schema_too_complex")
    assert "1000 enum values" in err["message"]
    assert time.perf_counter() - start < 5
    r = default_server.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                                          "response_format": _format(_enum_schema(5000))})
    assert_error(r, 400, "invalid_request_error", code="schema_too_complex")


@pytest.mark.server
def test_server_refuses_remote_ref(default_server):
    schema = {"type": "object", "properties": {"a": {"$ref": "http://example.com/a.json"}}, "required": ["a"]}
    r = _chat(default_server, response_format=_format(schema))
    assert_error(r, 400, "invalid_request_error", param="response_format.json_schema.schema")


@pytest.mark.server
@pytest.mark.parametrize("stream", [False, True])
def test_forced_call_cut_by_stop_is_a_400(default_server, stream):
    # the call's JSON opens with "{": a stop there cuts every forced call short
    for field, value in (("stop", ["{"]), ("stop_token_ids", [token_id(default_server, "{")])):
        r = _chat(default_server, tools=[WEATHER], tool_choice=NAMED, stream=stream, **{field: value})
        if not stream:
            assert_error(r, 400, "invalid_request_error", param=field, code="tool_call_incomplete")
            continue
        assert r.status_code == 200, r.text  # the stream had begun: the error is its last event
        events = sse_events(r.text.splitlines())
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert errors and errors[-1]["error"]["param"] == field, events[-3:]
        assert errors[-1]["error"]["code"] == "tool_call_incomplete"


@pytest.mark.server
def test_forced_call_without_stop_still_works(default_server):
    r = _chat(default_server, tools=[WEATHER], tool_choice=NAMED, max_tokens=64)
    assert r.status_code in (200, 400), r.text  # 400 only when max_tokens ran out
    if r.status_code == 200:
        assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "weather"
