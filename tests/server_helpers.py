"""End-to-end harness for `trinity serve`: the real server in a subprocess on a free port of 127.0.0.1.

    with ServerProcess("--max-num-seqs", "4", api_key="k") as server:
        server.client.chat.completions.create(...)      # openai.OpenAI pointed at the server
        server.http.post("/tokenize", json={...})       # raw HTTP with the key (the client openai uses)

`shared_server()` / the `default_server` fixture (conftest.py): one server with DEFAULT_FLAGS for the whole session.

The server's stdout and stderr go to a log file; when the server fails to come up the log is in the
exception, and conftest.py's autouse `log_on_failure` prints it (`report_failure`) when a test fails.
Stopping sends SIGTERM, then SIGKILL after 15 s.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import openai

try:  # the HTTP client the installed openai package is built on
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older openai releases use httpx
    import httpx  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "testkey"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0

# Every server started by this module, so that a failing test can show the logs.
_LIVE: list["ServerProcess"] = []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class ServerProcess:
    """`python -m trinity serve [flags]` on a free port; use as a context manager (or start() / stop())."""

    def __init__(self, *flags: str, api_key: str | None = None, name: str = "server",
                 env: dict[str, str] | None = None, launcher: list[str] | None = None):
        """`launcher`: the command that runs `trinity` (default `python -m trinity`; e.g. torchrun's)."""
        self.launcher = launcher or [sys.executable, "-m", "trinity"]
        self.flags = list(flags)
        self.api_key = api_key
        self.name = name
        self.env = env
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._log_file = None
        self._http: httpx.Client | None = None
        self._client: openai.OpenAI | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ServerProcess":
        for attempt in range(3):
            try:
                return self._start()
            except ServerError as e:
                # the free port was taken between probing and binding: try another one
                if "address already in use" not in str(e).lower() or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start(self) -> "ServerProcess":
        self.port = free_port()
        fd, path = tempfile.mkstemp(prefix=f"trinity-{self.name}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(path)
        self._log_file = open(self.log_path, "wb")
        # The random-weight `tiny` preset unless a test names a model: fast, and what the tests' expectations
        # (vocabulary, byte-level tokenizer) are written for. The built-in trained model has its own tests.
        model = [] if "--model" in self.flags else ["--model", "tiny"]
        args = [*self.launcher, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "info", *model, *self.flags]
        if self.api_key is not None:
            args += ["--api-key", self.api_key]
        # One intra-op thread: the tiny model gains nothing from more, and on a small shared machine (2 cores,
        # the test client beside the server) OpenMP threads spinning for a busy core make every step ~20x slower.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               **(self.env or {})}
        env.pop("TRINITY_API_KEY", None)
        self.proc = subprocess.Popen(args, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)
        _LIVE.append(self)
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode} before it was healthy:\n"
                                  f"{self.log()}")
            try:
                r = httpx.get(f"{self.base_url}/health", timeout=2.0)
                last = r.status_code
                if r.status_code == 200:
                    return
            except httpx.HTTPError as e:
                last = type(e).__name__
            time.sleep(0.1)
        raise ServerError(f"{self.name} not healthy after {timeout:.0f} s (last: {last}):\n{self.log()}")

    def terminate(self) -> None:
        """SIGTERM only (the server drains); see `wait`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit status."""
        for c in (self._client, self._http):
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()
        self._client = self._http = None
        code = None
        if self.proc is not None:
            self.terminate()
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                code = self.proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
            self._last_log = self.log()  # kept in memory; the file goes
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        return code

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ access
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def client(self) -> openai.OpenAI:
        if self._client is None:
            self._client = self.make_client()
        return self._client

    def make_client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "none", max_retries=0,
                             timeout=kw.pop("timeout", 120.0), **kw)

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "none", max_retries=0,
                                  timeout=kw.pop("timeout", 120.0), **kw)

    @property
    def http(self) -> httpx.Client:
        """Raw HTTP with the API key; paths relative to the server root."""
        if self._http is None:
            self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=120.0)
        return self._http

    def log(self, tail: int = 20000) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        if self.log_path is None or not self.log_path.exists():
            text = getattr(self, "_last_log", "(no log)")
        else:
            text = self.log_path.read_text(errors="replace")
        return text if len(text) <= tail else "...\n" + text[-tail:]

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, float]:
        """`/metrics` as {'name{labels}': value} (no key needed)."""
        r = httpx.get(f"{self.base_url}/metrics", timeout=10.0)
        assert r.status_code == 200, r.text
        return parse_metrics(r.text)

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Poll /metrics until no request runs or waits and both KV pools are empty."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if idle(m):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout} s: "
                                     f"{ {k: v for k, v in m.items() if k.startswith(IDLE_KEYS)} }")
            time.sleep(0.1)


IDLE_KEYS = ("trinity:num_requests_running", "trinity:num_requests_waiting", "trinity:kv_cache_usage_perc")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"bad exposition line {line!r}"
        value = m.group(2)
        out[m.group(1)] = math.inf if value == "+Inf" else -math.inf if value == "-Inf" else float(value)
    return out


def idle(m: dict[str, float]) -> bool:
    return (m.get("trinity:num_requests_running") == 0 and m.get("trinity:num_requests_waiting") == 0
            and m.get('trinity:kv_cache_usage_perc{pool="full"}') == 0
            and m.get('trinity:kv_cache_usage_perc{pool="sliding"}') == 0)


MAX_MODEL_LEN = 2048
# The server most tests share (one start for the whole session): API key, auto tool choice (hermes),
# a 200 kB body limit, room for 64 concurrent sequences, and a context short enough that oversized
# requests fail fast (the byte-level tokenizer makes a prompt with tools ~900 tokens).
DEFAULT_FLAGS = ("--enable-auto-tool-choice", "--max-request-bytes", "200000", "--max-num-seqs", "64",
                 "--max-model-len", str(MAX_MODEL_LEN))
_SHARED: dict[str, ServerProcess] = {}


def shared_server(name: str = "default", flags: tuple[str, ...] = DEFAULT_FLAGS,
                  api_key: str | None = API_KEY) -> ServerProcess:
    """One server per name for the whole pytest session (started on first use, stopped at exit)."""
    server = _SHARED.get(name)
    if server is None or server.proc is None or server.proc.poll() is not None:
        server = _SHARED[name] = ServerProcess(*flags, api_key=api_key, name=name).start()
    elif server not in _LIVE:
        _LIVE.append(server)
    return server


@atexit.register
def _stop_shared() -> None:
    for server in list(_SHARED.values()):
        server.stop()
    _SHARED.clear()


@contextlib.contextmanager
def running_server(*flags: str, api_key: str | None = None, name: str = "server") -> Iterator[ServerProcess]:
    with ServerProcess(*flags, api_key=api_key, name=name) as server:
        yield server


def report_failure(test_id: str, failed: bool) -> None:
    """After each test (conftest.py's `log_on_failure`): print the logs of the servers it used when it failed,
    bypassing output capture; then forget the servers that have stopped."""
    if failed:
        for server in list(_LIVE):
            sys.__stderr__.write(f"\n----- {server.name} log ({server.log_path}) for {test_id} -----\n"
                                 f"{server.log(6000)}\n----- end of {server.name} log -----\n")
            sys.__stderr__.flush()
    _LIVE[:] = [s for s in _LIVE if s.proc is not None and s.proc.poll() is None]


# ---------------------------------------------------------------------- SSE and error helpers
def sse_events(lines: Iterator[str]) -> list:
    """`data:` payloads of a server-sent event stream: dicts, and the string "[DONE]"."""
    events = []
    for line in lines:
        if not line.startswith("data: "):
            assert line.strip() == "", f"unexpected SSE line {line!r}"
            continue
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(response, status: int, type_: str, param=..., code=...) -> dict:
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}}, and no internals leaked."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["type"] == type_, err
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"], err
    assert_clean_message(err["message"])
    return err


def assert_clean_message(message: str) -> None:
    assert "Traceback" not in message, message
    assert "/work" not in message and str(ROOT) not in message, message
    assert 'File "' not in message, message


def token_id(server: ServerProcess, text: str) -> int:
    r = server.http.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert len(tokens) == 1, (text, tokens)
    return tokens[0]
