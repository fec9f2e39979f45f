"""Server hardening (issue 26): lone surrogates refused at validation, 500s that keep the connection, the queue
limit counted in sequences at admission, tiny sampling values that must not sample NaN, streams ended with an error
at the shutdown timeout, and min_tokens / response_format checks."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
import torch

from server_helpers import API_KEY, ServerProcess, assert_error, free_port, httpx, shared_server, sse_events
from test_sampler import make_seq, random_logits

from trinity.engine.sampler import Sampler
from trinity.engine.sampling_params import SamplingParams

HI = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BAD = "invalid_request_error"
LONE = '"a\\ud800b"'  # JSON text: a high surrogate with no low one after it


@pytest.fixture(scope="module")
def server():
    return shared_server()


def post_json_text(server, path: str, text: str):
    return server.http.post(path, content=text.encode(), headers={"content-type": "application/json"})


# ---------------------------------------------------------------------- item 2: lone surrogates
SURROGATE_BODIES = [
    ("chat-content", CHAT, '{"messages": [{"role": "user", "content": %s}], "max_tokens": 2}', "messages.0.content"),
    ("chat-system", CHAT, '{"messages": [{"role": "system", "content": %s}, {"role": "user", "content": "x"}]}',
     "messages.0.content"),
    ("chat-tool-arguments", CHAT, '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", '
     '"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": %s}}]}, '
     '{"role": "tool", "tool_call_id": "c", "content": "ok"}]}', "messages.1.tool_calls.0.function.arguments"),
    ("completions-prompt", COMPLETIONS, '{"prompt": %s, "max_tokens": 2}', "prompt"),
    ("completions-prompt-list", COMPLETIONS, '{"prompt": ["ok", %s], "max_tokens": 2}', "prompt.1"),
    ("tokenize", "/tokenize", '{"prompt": %s}', "prompt"),
    ("responses-input", "/v1/responses", '{"input": %s, "max_output_tokens": 2}', "input"),
]


@pytest.mark.server
@pytest.mark.parametrize("path,template,param", [b[1:] for b in SURROGATE_BODIES], ids=[b[0] for b in SURROGATE_BODIES])
def test_lone_surrogate_is_a_bad_request(server, path, template, param):
    r = post_json_text(server, path, template % LONE)
    err = assert_error(r, 400, BAD, param=param, code="invalid_value")
    assert "surrogate" in err["message"]


@pytest.mark.server
def test_lone_surrogate_on_messages_is_anthropic_shaped(server):
    body = '{"model": "x", "max_tokens": 2, "messages": [{"role": "user", "content": %s}]}' % LONE
    r = post_json_text(server, "/v1/messages", body)
    assert r.status_code == 400, r.text
    got = r.json()
    assert got["type"] == "error" and got["error"]["type"] == "invalid_request_error", got
    assert "messages.0.content" in got["error"]["message"]


@pytest.mark.server
def test_surrogate_pair_is_fine(server):
    # an escaped pair is one valid code point (U+1F600): it must not be caught by the check
    r = post_json_text(server, "/tokenize", '{"prompt": "a\\ud83d\\ude00b"}')
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------- item 3: a 500 keeps the connection
def test_unexpected_error_is_a_500_and_keeps_the_connection():
    """An in-process app (the real one plus a route that raises) under uvicorn: one keep-alive connection gets
    the 500, OpenAI-shaped, then serves the next request. Starlette's own handler re-raised, and uvicorn closed
    the connection after the 500."""
    import uvicorn

    from trinity.serve.app import build_app
    from trinity.serve.state import ServerSettings, ServerState

    app = build_app(ServerState(ServerSettings()))

    @app.get("/test-boom")
    async def boom():
        raise ZeroDivisionError("boom")

    @app.get("/test-ok")
    async def ok():
        return {"ok": True}

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not uv.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/test-boom")
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 500, body
        assert body["error"]["type"] == "internal_server_error" and "ZeroDivisionError" in body["error"]["message"]
        sock = conn.sock
        conn.request("GET", "/test-ok")  # the same socket: http.client reconnects only when told to close
        r = conn.getresponse()
        assert conn.sock is sock
        assert r.status == 200 and json.loads(r.read()) == {"ok": True}
        conn.close()
    finally:
        uv.should_exit = True
        thread.join(10)


# ---------------------------------------------------------------------- item 5: the queue limit
@pytest.mark.server
def test_queue_limit_counts_sequences_at_admission():
    """--max-queued-requests 2 with one running slot: a burst is admitted only up to the limit (the engine's
    stats are refreshed after a step, so the old check let a whole burst in), a request with more sequences than
    the limit is a 400, and n counts."""
    with ServerProcess("--max-num-seqs", "1", "--max-queued-requests", "2", api_key=API_KEY, name="queue2") as s:
        # one prompt list with more sequences than the limit can never be admitted
        r = s.http.post(COMPLETIONS, json={"prompt": ["a", "b", "c"], "max_tokens": 1})
        assert_error(r, 400, BAD, param="prompt", code="invalid_value")
        r = s.http.post(CHAT, json={"messages": HI, "max_tokens": 1, "n": 3})
        assert_error(r, 400, BAD, param="n", code="invalid_value")
        statuses: list[int] = []
        # all at once, and each long enough (the running one included) that none finishes during the burst, also
        # on a busy machine where the threads start far apart
        start = threading.Barrier(12)

        def one() -> None:
            start.wait(30)
            r = httpx.post(s.base_url + COMPLETIONS, json={"prompt": "x", "max_tokens": 200, "ignore_eos": True},
                           headers=s.headers, timeout=120)
            statuses.append(r.status_code)
            if r.status_code == 503:
                assert_error(r, 503, "service_unavailable", code="queue_full")
                assert r.headers.get("retry-after") == "1"

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert statuses.count(200) + statuses.count(503) == 12, statuses
        # at most the limit wait at a time, plus what starts generating between arrivals
        assert statuses.count(503) >= 6, statuses
        s.wait_idle()
        r = s.http.post(CHAT, json={"messages": HI, "max_tokens": 1, "n": 2})  # counted and released again
        assert r.status_code == 200, r.text


# ---------------------------------------------------------------------- item 8: tiny sampling values
def test_tiny_temperature_is_greedy():
    assert SamplingParams(temperature=1e-38).greedy and SamplingParams(temperature=9e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = random_logits(4)
    seqs = [make_seq(SamplingParams(temperature=1e-38, max_tokens=4), name=f"s{i}") for i in range(4)]
    assert sampler(logits, seqs).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("params", [dict(top_p=1e-46), dict(top_p=1e-45), dict(temperature=2e-5, top_p=0.5),
                                    dict(repetition_penalty=1e-300, temperature=1.0),
                                    dict(repetition_penalty=1e-300, temperature=0.0)],
                         ids=["top_p-1e-46", "top_p-1e-45", "temperature-2e-5", "rep-1e-300", "rep-1e-300-greedy"])
def test_extreme_values_never_sample_nan(params):
    """Values that underflow fp32 (a top_p or penalty that rounds to 0, a temperature that overflows the logits)
    must still give the top token, not NaN probabilities' token 0."""
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = random_logits(3, vocab=50, seed=1)
    logits[:, 0] = -1e9  # token 0: what a NaN row would pick
    seqs = [make_seq(SamplingParams(max_tokens=4, **params), prompt=(5, 6), name=f"s{i}") for i in range(3)]
    tokens = sampler(logits, seqs).token_ids
    assert 0 not in tokens
    if "repetition_penalty" not in params:  # one token dominates after the filter or the temperature
        assert tokens == logits.argmax(-1).tolist()
    else:  # seen tokens (the prompt's) with positive logits grow without bound: one of them wins
        assert all(t in (5, 6) or logits[i, t] == logits[i].max() for i, t in enumerate(tokens)), tokens


@pytest.mark.server
def test_tiny_sampling_values_end_to_end(server):
    greedy = server.http.post(COMPLETIONS, json={"prompt": "hello", "max_tokens": 6, "temperature": 0,
                                                 "ignore_eos": True}).json()["choices"][0]["text"]
    for extra in ({"temperature": 1e-38}, {"top_p": 1e-46}):
        r = server.http.post(COMPLETIONS, json={"prompt": "hello", "max_tokens": 6, "ignore_eos": True, **extra})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == greedy and choice["finish_reason"] == "length", (extra, choice)


# ---------------------------------------------------------------------- item 9: streams at the shutdown timeout
@pytest.mark.server
def test_shutdown_timeout_ends_streams_with_an_error():
    """SIGTERM with --shutdown-timeout 1: the streams still running after it get an error event
    (server_shutdown) and their terminator; the process exits 0."""
    with ServerProcess("--shutdown-timeout", "1", api_key=API_KEY, name="shutdown") as server:
        model = server.http.get("/v1/models").json()["data"][0]["id"]
        results: dict[str, list] = {}
        started = {k: threading.Event() for k in ("chat", "completions")}

        def consume(kind: str, path: str, body: dict) -> None:
            lines = []
            try:
                with httpx.stream("POST", server.base_url + path, json=body, headers=server.headers,
                                  timeout=120) as r:
                    for line in r.iter_lines():
                        lines.append(line)
                        if len(lines) > 8:
                            started[kind].set()
            except Exception as e:  # noqa: BLE001 - the assertions below say what was missing
                lines.append(f"!{e!r}")
            finally:
                results[kind] = lines
                started[kind].set()

        long = 1500
        threads = [
            threading.Thread(target=consume, args=("chat", CHAT, {
                "messages": HI, "max_tokens": long, "stream": True, "ignore_eos": True})),
            threading.Thread(target=consume, args=("completions", COMPLETIONS, {
                "model": model, "prompt": "x", "max_tokens": long, "stream": True, "ignore_eos": True})),
        ]
        for t in threads:
            t.start()
        for e in started.values():
            assert e.wait(60)
        assert not results, results  # both still streaming
        server.terminate()
        for t in threads:
            t.join(60)
        assert server.wait(30) == 0
        chat = sse_events(results["chat"])
        assert chat[-1] == "[DONE]", results["chat"][-3:]
        assert chat[-2]["error"]["code"] == "server_shutdown", chat[-2]
        completions = sse_events(results["completions"])
        assert completions[-1] == "[DONE]", results["completions"][-3:]
        assert completions[-2]["error"]["code"] == "server_shutdown", completions[-2]


# ---------------------------------------------------------------------- item 10 (parts)
@pytest.mark.server
def test_min_tokens_over_the_rest_of_the_context(server):
    r = server.http.post(CHAT, json={"messages": HI, "min_tokens": 100000})
    err = assert_error(r, 400, BAD, param="min_tokens", code="invalid_value")
    assert "max_model_len" in err["message"]
    r = server.http.post(COMPLETIONS, json={"prompt": "x", "max_tokens": None, "min_tokens": 100000})
    assert_error(r, 400, BAD, param="min_tokens")


@pytest.mark.server
@pytest.mark.parametrize("path,body", [(CHAT, {"messages": HI, "max_tokens": 2}), (COMPLETIONS, {"prompt": "x"})])
@pytest.mark.parametrize("fmt,param", [({}, "response_format"), ({"type": 3}, "response_format.type"),
                                       ({"json_schema": {}}, "response_format.type")])
def test_response_format_without_type(server, path, body, fmt, param):
    r = server.http.post(path, json={**body, "response_format": fmt})
    assert_error(r, 400, BAD, param=param)
