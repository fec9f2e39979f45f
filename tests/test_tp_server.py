"""`trinity serve --tensor-parallel-size 2` on the CPU: the built-in model split over two processes (gloo), talked
to with the real `openai` client; a worker that dies makes the server fail loudly and exit; SIGTERM leaves no
process behind."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import openai
import pytest
from server_helpers import ServerProcess, httpx

from trinity.loading import BUILTIN_MODEL
from trinity.serve.server import FAILURE_EXIT_CODE
from trinity.synthetic.tools import TOOL_SCHEMAS

pytestmark = [pytest.mark.server, pytest.mark.slow]

FLAGS = ("--model", BUILTIN_MODEL, "--tensor-parallel-size", "2", "--reasoning-parser", "trinity",
         "--tool-call-parser", "hermes", "--enable-auto-tool-choice")


def children(pid: int) -> list[int]:
    """The processes `pid` started (from /proc)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def workers(pid: int) -> list[int]:
    """The tensor-parallel worker processes among them (not multiprocessing's resource tracker)."""
    def cmdline(child: int) -> str:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    return [c for c in children(pid) if "spawn_main" in cmdline(c)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.fixture(scope="module")
def server():
    with ServerProcess(*FLAGS, name="tp2") as s:
        yield s


def test_chat_stream_and_tool_call_over_two_ranks(server):
    assert len(workers(server.proc.pid)) == 1  # rank 1
    client = server.client
    messages = [{"role": "user", "content": "What is 27 + 58?"}]
    r = client.chat.completions.create(model=BUILTIN_MODEL, temperature=0, max_tokens=300, messages=messages)
    assert r.choices[0].message.content.strip() == "The answer is 85."
    assert "27 + 58" in r.choices[0].message.reasoning_content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=BUILTIN_MODEL, temperature=0, max_tokens=300, messages=messages, stream=True) if c.choices)
    assert streamed == r.choices[0].message.content
    tools = [TOOL_SCHEMAS["weather"], TOOL_SCHEMAS["get_time"], TOOL_SCHEMAS["search"]]
    r = client.chat.completions.create(model=BUILTIN_MODEL, temperature=0, max_tokens=300, tools=tools,
                                       messages=[{"role": "user", "content": "What's the weather in Paris in celsius?"}])
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_a_dead_worker_fails_the_server_loudly():
    with ServerProcess(*FLAGS, name="tp2-kill") as s:
        (worker,) = workers(s.proc.pid)
        # a request in flight when the worker dies ends with an error, not a hang
        stream = s.client.chat.completions.create(model=BUILTIN_MODEL, max_tokens=2000, stream=True,
                                                  extra_body={"ignore_eos": True},
                                                  messages=[{"role": "user", "content": "Tell me a story."}])
        first = next(iter(stream))
        assert first is not None
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="engine failure|internal error"):
            for _ in stream:
                pass
        assert wait_until(lambda: httpx.get(f"{s.base_url}/health", timeout=2).status_code == 503, 5)
        body = httpx.get(f"{s.base_url}/health", timeout=2).json()["error"]
        assert body["code"] == "engine_failed" and "rank 1" in body["message"]
        with pytest.raises(openai.APIStatusError) as e:
            s.client.chat.completions.create(model=BUILTIN_MODEL, max_tokens=5,
                                             messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 503
        assert s.wait(timeout=15) == FAILURE_EXIT_CODE
        assert "tensor-parallel worker rank 1" in s.log() and "exited with code -9" in s.log()


def test_sigterm_leaves_no_process():
    s = ServerProcess(*FLAGS, name="tp2-term").start()
    try:
        started = children(s.proc.pid)  # the worker and multiprocessing's resource tracker
        assert len(workers(s.proc.pid)) == 1
        s.terminate()
        assert s.wait(timeout=30) == 0
        assert wait_until(lambda: not any(alive(c) for c in started), 10)
    finally:
        s.stop()


def test_torchrun_standalone_two_ranks():
    """The multi-node launch, on one machine: torchrun starts both ranks; rank 0 serves HTTP, rank 1 runs its part of
    the model; SIGTERM to torchrun stops both."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "trinity"]
    s = ServerProcess(*FLAGS, name="torchrun", launcher=torchrun).start()
    try:
        r = s.client.chat.completions.create(model=BUILTIN_MODEL, temperature=0, max_tokens=300,
                                             messages=[{"role": "user", "content": "What is 27 + 58?"}])
        assert r.choices[0].message.content.strip() == "The answer is 85."
        started = children(s.proc.pid)  # torchrun's two ranks
        assert len(started) == 2
        s.terminate()
        s.wait(timeout=60)
        assert wait_until(lambda: not any(alive(c) for c in started), 10)
    finally:
        s.stop()
