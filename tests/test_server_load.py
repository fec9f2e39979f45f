"""`trinity serve` under concurrent load: 64 streaming clients at once, a fifth of them hanging up mid-stream.
Everyone who stays gets the whole answer; afterwards no request runs and both KV pools are empty again.
A client that hangs up on a non-streamed request frees its blocks too. Both with plain steps and with
look-ahead decoding (`--async-scheduling`, on by default only on CUDA)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server_helpers import DEFAULT_FLAGS, httpx, shared_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

CLIENTS = 64
MAX_TOKENS = 24


@pytest.fixture(scope="module", params=["plain", "lookahead"])
def server(request, default_server):
    server = default_server if request.param == "plain" else \
        shared_server("lookahead", DEFAULT_FLAGS + ("--async-scheduling",))
    server.wait_idle(timeout=30)
    return server


async def _one(client, i: int, seeded: bool) -> dict:
    disconnect = i % 5 == 0
    # a per-request seed keys the sampling noise by output position, which rules look-ahead out for that request
    kw = dict(max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True},
              extra_body={"ignore_eos": True}, logprobs=True, **({"seed": i} if seeded else {}))
    if i % 2:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Client {i} says hello."}], **kw)
    else:
        kw["logprobs"] = 0
        stream = await client.completions.create(model="tiny", prompt=f"Client {i}:", **kw)
    tokens, finish, usage, chunks = 0, [], None, 0
    async for chunk in stream:
        chunks += 1
        if disconnect and chunks == 3:
            await stream.close()  # hang up mid-stream
            return {"i": i, "closed": True}
        for c in chunk.choices:
            if c.logprobs is not None:
                tokens += len(c.logprobs.content) if i % 2 else len(c.logprobs.tokens)
            if c.finish_reason:
                finish.append(c.finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    return {"i": i, "closed": False, "tokens": tokens, "finish": finish, "usage": usage}


def test_concurrent_streams_with_disconnects(server):
    lookahead = server.name == "lookahead"
    before = server.metrics()["trinity:num_lookahead_steps_total"]

    async def main():
        client = server.async_client(timeout=120)
        try:
            return await asyncio.gather(*(_one(client, i, seeded=not lookahead) for i in range(CLIENTS)))
        finally:
            await client.close()

    results = asyncio.run(main())
    closed = [r for r in results if r["closed"]]
    done = [r for r in results if not r["closed"]]
    assert len(closed) == len(range(0, CLIENTS, 5)) and len(done) + len(closed) == CLIENTS
    for r in done:
        assert r["finish"] == ["length"], r
        assert r["tokens"] == MAX_TOKENS, r
        assert r["usage"].completion_tokens == MAX_TOKENS, r
    m = server.wait_idle(timeout=30)
    assert m["trinity:num_requests_running"] == 0 and m["trinity:num_requests_waiting"] == 0
    assert m['trinity:kv_cache_usage_perc{pool="full"}'] == 0
    assert m['trinity:kv_cache_usage_perc{pool="sliding"}'] == 0
    assert (m["trinity:num_lookahead_steps_total"] > before) == lookahead
    # the server is still healthy and serving
    r = server.http.post("/v1/completions", json={"prompt": "after", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_disconnect_non_streamed_frees_blocks(server):
    """A long non-streamed request whose client gives up: the server notices, aborts it, frees its blocks."""
    before = server.metrics()
    outcome: dict = {}

    def request():
        try:
            server.http.post("/v1/completions", json={"prompt": "long", "max_tokens": 2000, "ignore_eos": True},
                             timeout=httpx.Timeout(10.0, read=1.5))
            outcome["result"] = "completed"
        except httpx.ReadTimeout:
            outcome["result"] = "gave up"

    thread = threading.Thread(target=request)
    thread.start()
    # while the client waits, the request runs and holds KV blocks
    deadline = time.monotonic() + 10
    while True:
        m = server.metrics()
        if m["trinity:num_requests_running"] == 1 and m['trinity:kv_cache_usage_perc{pool="full"}'] > 0:
            break
        assert time.monotonic() < deadline and thread.is_alive(), m
        time.sleep(0.02)
    thread.join(30)
    assert outcome == {"result": "gave up"}
    # the server notices the disconnect (it polls every 0.5 s) and aborts the request
    m = server.wait_idle(timeout=15)
    # an aborted request is not counted as a finished one
    assert m["trinity:generation_tokens_total"] == before["trinity:generation_tokens_total"]
    r = server.http.post("/v1/completions", json={"prompt": "after", "max_tokens": 2})
    assert r.status_code == 200
