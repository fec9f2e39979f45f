"""`trinity serve` error handling end to end: every error is OpenAI-shaped ({"error": {message, type, param,
code}}), has the right status and param, leaks no traceback or path, and leaves the server serving (each
error is followed by a normal request). Also: auth on every route, the body-size limit, the queue limit,
errors after a stream began, and draining on SIGTERM.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from server_helpers import API_KEY, ServerProcess, assert_clean_message, assert_error, httpx, sse_events

pytestmark = pytest.mark.server

HI = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
TOOL = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
BAD_REQUEST = "invalid_request_error"


def still_serving(server: ServerProcess) -> None:
    """A normal request right after an error succeeds."""
    r = server.http.post(CHAT, json={"messages": HI, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def post_raw(server: ServerProcess, path: str, raw: bytes, headers: dict | None = None):
    return server.http.post(path, content=raw, headers={"content-type": "application/json", **(headers or {})})


# ---------------------------------------------------------------------- 400s from the request body
# (id, path, body, param); body is bytes for raw payloads
BAD_BODIES = [
    ("invalid-json", CHAT, b'{"messages": [', None),
    ("invalid-json-completions", COMPLETIONS, b"{'prompt': 'x'}", None),
    ("non-object-list", CHAT, b"[1, 2, 3]", None),
    ("non-object-string", COMPLETIONS, b'"hello"', None),
    ("non-object-null", CHAT, b"null", None),
    ("empty-body", CHAT, b"", None),
    ("messages-string", CHAT, {"messages": "x"}, "messages"),
    ("messages-missing", CHAT, {"max_tokens": 3}, "messages"),
    ("messages-empty", CHAT, {"messages": []}, "messages"),
    ("unknown-role", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("bad-content-part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image", "x": 1}]}]},
     "messages.0.content"),
    ("temperature-high", CHAT, {"messages": HI, "temperature": 2.5}, "temperature"),
    ("temperature-negative", COMPLETIONS, {"prompt": "x", "temperature": -0.1}, "temperature"),
    ("top-p-zero", CHAT, {"messages": HI, "top_p": 0}, "top_p"),
    ("top-p-high", COMPLETIONS, {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("n-zero", CHAT, {"messages": HI, "n": 0}, "n"),
    ("n-high", CHAT, {"messages": HI, "n": 17}, "n"),
    ("top-logprobs-high", CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top-logprobs-negative", CHAT, {"messages": HI, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("top-logprobs-without-logprobs", CHAT, {"messages": HI, "top_logprobs": 2}, "top_logprobs"),
    ("completion-logprobs-high", COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("presence-penalty-low", CHAT, {"messages": HI, "presence_penalty": -2.5}, "presence_penalty"),
    ("frequency-penalty-high", CHAT, {"messages": HI, "frequency_penalty": 3}, "frequency_penalty"),
    ("repetition-penalty-zero", CHAT, {"messages": HI, "repetition_penalty": 0}, "repetition_penalty"),
    ("max-tokens-zero", CHAT, {"messages": HI, "max_tokens": 0}, "max_tokens"),
    ("max-completion-tokens-zero", CHAT, {"messages": HI, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("min-tokens-over-max", CHAT, {"messages": HI, "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ("temperature-string", CHAT, {"messages": HI, "temperature": "hot"}, "temperature"),
    ("nan", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    ("infinity", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "top_p"),
    ("minus-infinity", COMPLETIONS, b'{"prompt": "x", "presence_penalty": -Infinity}', "presence_penalty"),
    ("nan-logit-bias", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": NaN}}',
     "logit_bias.5"),
    ("logit-bias-key", CHAT, {"messages": HI, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("logit-bias-id", CHAT, {"messages": HI, "logit_bias": {"99999": 1}}, "logit_bias"),
    ("logit-bias-value", CHAT, {"messages": HI, "logit_bias": {"5": 101}}, "logit_bias.5"),
    ("stop-empty", CHAT, {"messages": HI, "stop": [""]}, "stop"),
    ("stop-token-id", CHAT, {"messages": HI, "stop_token_ids": [99999]}, "stop_token_ids"),
    ("tools-not-list", CHAT, {"messages": HI, "tools": {"type": "function"}}, "tools"),
    ("tool-name-space", CHAT, {"messages": HI, "tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools[0].function.name"),
    ("tool-name-missing", CHAT, {"messages": HI, "tools": [TOOL, {"type": "function", "function": {}}]},
     "tools[1].function.name"),
    ("tool-name-duplicate", CHAT, {"messages": HI, "tools": [TOOL, TOOL]}, "tools[1].function.name"),
    ("tool-type", CHAT, {"messages": HI, "tools": [{"type": "retrieval", "function": {"name": "a"}}]},
     "tools[0].type"),
    ("tool-parameters-array", CHAT, {"messages": HI, "tools": [
        {"type": "function", "function": {"name": "a", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ("tool-choice-missing-tool", CHAT, {"messages": HI, "tools": [TOOL],
                                        "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("tool-choice-without-tools", CHAT, {"messages": HI, "tool_choice": "required"}, "tool_choice"),
    ("tool-choice-unknown", CHAT, {"messages": HI, "tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ("response-format-type", CHAT, {"messages": HI, "response_format": {"type": "xml"}}, "response_format.type"),
    ("response-format-no-schema", CHAT, {"messages": HI, "response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
    ("response-format-bad-schema", CHAT, {"messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
     "response_format.json_schema.schema"),
    ("response-format-schema-not-object", COMPLETIONS, {"prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}}, "response_format.json_schema.schema"),
    ("tool-message-without-content", CHAT, {"messages": [*HI, {"role": "tool", "tool_call_id": "c"}]}, "messages"),
    ("prompt-missing", COMPLETIONS, {"max_tokens": 3}, "prompt"),
    ("prompt-empty-list", COMPLETIONS, {"prompt": []}, "prompt"),
    ("prompt-empty-string", COMPLETIONS, {"prompt": ""}, "prompt"),
    ("prompt-token-out-of-range", COMPLETIONS, {"prompt": [1, 2, 99999]}, "prompt"),
    ("tokenize-neither", "/tokenize", {}, "prompt"),
    ("tokenize-both", "/tokenize", {"prompt": "x", "messages": HI}, "prompt"),
    ("detokenize-out-of-range", "/detokenize", {"tokens": [1, 99999]}, "tokens"),
    ("detokenize-negative", "/detokenize", {"tokens": [-1]}, "tokens.0"),
]


@pytest.mark.parametrize("path,body,param", [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES])
def test_bad_request(server, path, body, param):
    if isinstance(body, bytes):
        r = post_raw(server, path, body)
    else:
        r = server.http.post(path, json=body)
    assert_error(r, 400, BAD_REQUEST, param=param)
    still_serving(server)


def test_nan_is_rejected_as_non_finite(server):
    r = post_raw(server, CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
    err = assert_error(r, 400, BAD_REQUEST, param="temperature")
    assert "finite" in err["message"]
    still_serving(server)


def test_invalid_streaming_request_is_a_plain_error(server):
    """Validation happens before streaming starts: a JSON error response, not an event stream."""
    for path, body in [(CHAT, {"messages": HI, "stream": True, "temperature": 5}),
                       (COMPLETIONS, {"prompt": "x" * 3000, "stream": True}),
                       (CHAT, {"messages": HI, "stream": True, "model": "nope"})]:
        r = server.http.post(path, json=body)
        assert r.status_code in (400, 404) and r.headers["content-type"].startswith("application/json"), r.text
        assert_clean_message(r.json()["error"]["message"])
    still_serving(server)


def test_error_codes(server):
    assert assert_error(post_raw(server, CHAT, b"{"), 400, BAD_REQUEST)["code"] == "invalid_json"
    assert assert_error(post_raw(server, CHAT, b"[]"), 400, BAD_REQUEST)["code"] == "invalid_body"
    still_serving(server)


@pytest.mark.parametrize("path,body,param", [
    (CHAT, {"messages": [{"role": "user", "content": "x" * 2100}], "max_tokens": 10}, "max_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "x" * 1900}], "max_tokens": 500}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x" * 1000, "max_tokens": 1500}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x" * 3000}, "max_tokens"),
    (COMPLETIONS, {"prompt": [[1] * 3000]}, "max_tokens"),
], ids=["chat-prompt-too-long", "chat-max-tokens", "completions-max-tokens", "completions-prompt-too-long",
        "completions-token-prompt-too-long"])
def test_context_length_exceeded(server, path, body, param):
    r = server.http.post(path, json=body)
    err = assert_error(r, 400, BAD_REQUEST, code="context_length_exceeded")
    assert err["param"] in ("max_tokens", "messages", "prompt"), err
    assert "2048" in err["message"], err  # max_model_len
    if "max_tokens" in body:
        assert str(body["max_tokens"]) in err["message"], err
        assert err["param"] == "max_tokens"
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        assert str(len(prompt)) in err["message"], err  # byte-level tokenizer: one token per character
    still_serving(server)


def test_chat_without_max_tokens_uses_the_rest_of_the_context(server):
    """No max_tokens: whatever the prompt leaves of max_model_len (a prompt that fills it is an error)."""
    r = server.http.post(CHAT, json={"messages": [{"role": "user", "content": "x" * 2048}]})
    err = assert_error(r, 400, BAD_REQUEST, param="messages")
    assert "2048" in err["message"]
    still_serving(server)


@pytest.mark.parametrize("method,path,body", [
    ("POST", CHAT, {"model": "gpt-4", "messages": HI}),
    ("POST", COMPLETIONS, {"model": "gpt-4", "prompt": "x"}),
    ("POST", "/tokenize", {"model": "gpt-4", "prompt": "x"}),
    ("POST", "/detokenize", {"model": "gpt-4", "tokens": [1]}),
], ids=["chat", "completions", "tokenize", "detokenize"])
def test_unknown_model(server, method, path, body):
    r = server.http.request(method, path, json=body)
    err = assert_error(r, 404, "not_found_error", param="model", code="model_not_found")
    assert "gpt-4" in err["message"] and "tiny" in err["message"]
    still_serving(server)


def test_unknown_route(server):
    r = server.http.get("/v1/embeddings")
    err = assert_error(r, 404, "not_found_error", param=None)
    assert "/v1/embeddings" in err["message"]
    r = server.http.post("/v2/chat/completions", json={"messages": HI})
    assert_error(r, 404, "not_found_error")
    r = server.http.delete("/v1/models")
    assert_error(r, 405, BAD_REQUEST)
    r = server.http.get(CHAT)
    assert_error(r, 405, BAD_REQUEST)
    still_serving(server)


# ---------------------------------------------------------------------- auth
INFERENCE_ROUTES = [("GET", "/v1/models", None), ("POST", CHAT, {"messages": HI, "max_tokens": 1}),
                    ("POST", COMPLETIONS, {"prompt": "x", "max_tokens": 1}), ("POST", "/tokenize", {"prompt": "x"}),
                    ("POST", "/detokenize", {"tokens": [100]})]


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Bearer testkey2", "Bearer", "Basic testkey", "testkey",
                                  f"Bearer {API_KEY[:-1]}"],
                         ids=["missing", "wrong", "longer", "empty", "basic", "no-scheme", "prefix"])
@pytest.mark.parametrize("method,path,body", INFERENCE_ROUTES, ids=[p for _, p, _ in INFERENCE_ROUTES])
def test_auth_required(server, method, path, body, auth):
    headers = {} if auth is None else {"Authorization": auth}
    r = httpx.request(method, server.base_url + path, json=body, headers=headers, timeout=30)
    assert_error(r, 401, "authentication_error", param=None, code="invalid_api_key")
    # the same request with the key succeeds
    r = server.http.request(method, path, json=body)
    assert r.status_code == 200, r.text


def test_auth_bearer_scheme_case_insensitive(server):
    r = httpx.get(server.base_url + "/v1/models", headers={"Authorization": f"bearer {API_KEY}"})
    assert r.status_code == 200, r.text


def test_auth_checked_before_body_validation(server):
    """No key and a schema-invalid body: 401 (the key is checked before the body's fields)."""
    r = httpx.post(server.base_url + CHAT, json={"messages": "x", "temperature": 9})
    assert_error(r, 401, "authentication_error", code="invalid_api_key")
    # a body that is not even JSON is refused one way or the other, never with a 5xx
    r = httpx.post(server.base_url + CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code in (400, 401)
    assert_clean_message(r.json()["error"]["message"])
    still_serving(server)


@pytest.mark.parametrize("path", ["/health", "/metrics", "/openapi.json"])
def test_public_routes_need_no_key(server, path):
    r = httpx.get(server.base_url + path)
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------- body size
def test_body_over_limit_declared(server):
    body = json.dumps({"messages": [{"role": "user", "content": "a" * 250_000}]}).encode()
    r = post_raw(server, CHAT, body)
    err = assert_error(r, 413, BAD_REQUEST, code="request_too_large")
    assert "200000" in err["message"]
    still_serving(server)


def test_body_under_limit_accepted(server):
    body = json.dumps({"prompt": "a" * 1000, "max_tokens": 1, "user": "u" * 150_000}).encode()
    r = post_raw(server, COMPLETIONS, body)
    assert r.status_code == 200, r.text


def test_body_over_limit_chunked(server):
    def chunks():
        for _ in range(30):
            yield b"a" * 10_000
    r = server.http.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, BAD_REQUEST, code="request_too_large")


def test_body_over_limit_chunked_is_rejected(server):
    """Whatever the status, a chunked body over the limit is refused with a 4xx and the server keeps serving."""
    def chunks():
        for _ in range(30):
            yield b"a" * 10_000
    r = server.http.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    assert_clean_message(r.json()["error"]["message"])
    still_serving(server)


# ---------------------------------------------------------------------- errors inside a stream
def test_error_after_stream_began(server):
    """tool_choice='required' with max_tokens too small for the JSON: the failure comes after the first chunk,
    so it is sent as an error event, then [DONE]."""
    body = {"messages": HI, "tools": [TOOL], "tool_choice": "required", "max_tokens": 3, "stream": True}
    with server.http.stream("POST", CHAT, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    error = events[-2]
    assert set(error) == {"error"}, error
    assert set(error["error"]) >= {"message", "type", "param", "code"}
    assert_clean_message(error["error"]["message"])
    assert "max_tokens" in error["error"]["message"] or "cut off" in error["error"]["message"]
    assert all("error" not in e for e in events[:-2])
    still_serving(server)


def test_error_after_stream_began_matches_whole(server):
    body = {"messages": HI, "tools": [TOOL], "tool_choice": "required", "max_tokens": 3}
    whole = assert_error(server.http.post(CHAT, json=body), 400, BAD_REQUEST, param="max_tokens")
    with server.http.stream("POST", CHAT, json={**body, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    error = events[-2]["error"]
    assert (error["type"], error["param"]) == (whole["type"], whole["param"])


def test_cut_off_tool_call_whole(server):
    body = {"messages": HI, "tools": [TOOL], "tool_choice": "required", "max_tokens": 3}
    err = assert_error(server.http.post(CHAT, json=body), 400, BAD_REQUEST, param="max_tokens")
    assert "max_tokens" in err["message"]
    still_serving(server)


# ---------------------------------------------------------------------- found by fuzzing

@pytest.mark.parametrize("path,body", [(COMPLETIONS, {"prompt": "x", "max_tokens": 2, "top_k": 2 ** 63}),
                                       (CHAT, {"messages": HI, "max_tokens": 2, "top_k": 2 ** 64})],
                         ids=["completions", "chat"])
def test_huge_top_k_is_a_bad_request(server, path, body):
    r = httpx.post(server.base_url + path, json=body, headers=server.headers, timeout=30)  # a fresh connection
    assert_error(r, 400, BAD_REQUEST, param="top_k")


def test_large_top_k_is_fine(server):
    for top_k in (513, 100_000, 2 ** 63 - 1):
        r = server.http.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2, "top_k": top_k})
        assert r.status_code == 200, r.text


def test_bad_request_does_not_fail_other_requests(server):
    """One request that breaks the sampler must not take the requests batched with it down too."""
    result: dict = {}
    started = threading.Event()

    def innocent():
        body = {"prompt": "innocent", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.base_url + COMPLETIONS, json=body, headers=server.headers, timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) > 4:
                    started.set()
            result["events"] = sse_events(lines)
        started.set()

    thread = threading.Thread(target=innocent)
    thread.start()
    try:
        assert started.wait(30)
        httpx.post(server.base_url + COMPLETIONS, json={"prompt": "x", "max_tokens": 2, "top_k": 2 ** 63},
                   headers=server.headers, timeout=30)
    finally:
        thread.join(60)
    events = result["events"]
    assert all("error" not in e for e in events[:-1]), events[-2:]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("kwargs", [{"add_generation_prompt": False}, {"tools": []}, {"messages": []},
                                    {"tokenize": True}], ids=["add_generation_prompt", "tools", "messages", "tokenize"])
def test_chat_template_kwargs_colliding_with_arguments(server, kwargs):
    r = httpx.post(server.base_url + CHAT, json={"messages": HI, "max_tokens": 2, "chat_template_kwargs": kwargs},
                   headers=server.headers, timeout=30)  # a fresh connection (a 500 may reset it)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert_error(r, 400, BAD_REQUEST, param="chat_template_kwargs")


def test_chat_template_kwargs_accepted(server):
    for kwargs in ({"enable_thinking": False}, {"enable_thinking": True}, {"some_template_variable": [1, 2]}):
        r = server.http.post(CHAT, json={"messages": HI, "max_tokens": 2, "chat_template_kwargs": kwargs})
        assert r.status_code == 200, (kwargs, r.text)


# ---------------------------------------------------------------------- queue limit
@pytest.fixture(scope="module")
def queue_server():
    with ServerProcess("--max-num-seqs", "1", "--max-queued-requests", "1", api_key=API_KEY, name="queue") as s:
        yield s


def _open_stream(server: ServerProcess, client: httpx.Client, max_tokens: int = 4000):
    body = {"prompt": "busy", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    request = client.build_request("POST", server.base_url + COMPLETIONS, json=body, headers=server.headers)
    response = client.send(request, stream=True)
    assert response.status_code == 200, response.read()
    return response


def _wait_metrics(server: ServerProcess, running: int, waiting: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["trinity:num_requests_running"] == running and m["trinity:num_requests_waiting"] == waiting:
            return
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


def test_queue_full(queue_server):
    server = queue_server
    with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2:
        running = _open_stream(server, c1)
        _wait_metrics(server, running=1, waiting=0)
        waiting = _open_stream(server, c2)
        _wait_metrics(server, running=1, waiting=1)
        for path, body in [(CHAT, {"messages": HI, "max_tokens": 2}), (COMPLETIONS, {"prompt": "x"}),
                           ("/tokenize", {"prompt": "x"})]:
            r = server.http.post(path, json=body)
            err = assert_error(r, 503, "service_unavailable", param=None, code="queue_full")
            assert r.headers.get("retry-after") == "1", r.headers
            assert "queue" in err["message"]
        # health and metrics still answer while the queue is full
        assert httpx.get(server.base_url + "/health").status_code == 200
        running.close()
        waiting.close()
    server.wait_idle(timeout=30)
    still_serving(server)


# ---------------------------------------------------------------------- draining
def test_drain_on_sigterm():
    """SIGTERM: new requests get 503 "draining" while the requests in flight (one streamed, one not) run to
    their end; then the process exits 0."""
    # max_tokens: long enough that the stream is surely still running when the 503 comes back
    max_tokens = 600
    with ServerProcess("--shutdown-timeout", "60", api_key=API_KEY, name="drain") as server:
        result: dict = {}
        started = threading.Event()

        def consume():
            body = {"messages": HI, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            try:
                with httpx.stream("POST", server.base_url + CHAT, json=body, headers=server.headers,
                                  timeout=120) as r:
                    result["status"] = r.status_code
                    lines = []
                    for line in r.iter_lines():
                        lines.append(line)
                        if len(lines) > 6:  # a few tokens are out: generation is under way
                            started.set()
                    result["events"] = sse_events(lines)
            except Exception as e:  # noqa: BLE001 - reported by the assertions below
                result["error"] = repr(e)
            finally:
                started.set()

        def whole():  # a non-streamed request in flight at the same time
            try:
                r = httpx.post(server.base_url + COMPLETIONS, json={"prompt": "x", "max_tokens": 300,
                                                                     "ignore_eos": True},
                               headers=server.headers, timeout=120)
                result["whole"] = (r.status_code, r.json())
            except Exception as e:  # noqa: BLE001
                result["whole"] = (None, repr(e))

        reader = threading.Thread(target=consume)
        reader.start()
        assert started.wait(60), result
        other = threading.Thread(target=whole)
        other.start()
        deadline = time.monotonic() + 30
        while server.metrics()["trinity:num_requests_running"] < 2:
            assert time.monotonic() < deadline and other.is_alive(), result
            time.sleep(0.02)
        assert "error" not in result and "events" not in result, result
        server.terminate()  # with two requests in flight
        deadline = time.monotonic() + 10
        while True:  # the signal is handled asynchronously: poll until new requests are refused
            r = httpx.post(server.base_url + CHAT, json={"messages": HI, "max_tokens": 1}, headers=server.headers,
                           timeout=10)
            if r.status_code == 503:
                stream_running = reader.is_alive()
                break
            assert r.status_code == 200 and time.monotonic() < deadline, r.text
            time.sleep(0.02)
        err = assert_error(r, 503, "service_unavailable", param=None, code="draining")
        assert r.headers.get("retry-after"), r.headers
        assert "shutting down" in err["message"]
        assert stream_running, "the stream ended before the server refused new requests"
        r = httpx.post(server.base_url + "/tokenize", json={"prompt": "x"}, headers=server.headers, timeout=10)
        assert_error(r, 503, "service_unavailable", code="draining")
        reader.join(120)
        other.join(120)
        assert not reader.is_alive() and not other.is_alive()
        status, body = result["whole"]
        assert status == 200 and body["usage"]["completion_tokens"] == 300, result["whole"]
        assert "error" not in result and result["status"] == 200, result
        events = result["events"]
        assert events[-1] == "[DONE]"
        assert all("error" not in e for e in events[:-1]), events
        assert [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c.get("finish_reason")] == ["length"]
        assert events[-2]["usage"]["completion_tokens"] == max_tokens
        assert server.wait(30) == 0, server.log()
        assert "Traceback" not in server.log(), server.log()
