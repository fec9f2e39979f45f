"""The live dashboard of `trinity serve` (`GET /dashboard`), seen as a person sees it: the real server, real
streaming requests from the `openai` client on a background thread, and the page in headless Chromium
(Debian's `chromium`, driven by Playwright). The browser test saves a screenshot in its temp folder.

Also: the key check on the page and its event stream, the stream's snapshots against /metrics, an open
dashboard not holding up shutdown, and the latency summary against numpy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from server_helpers import API_KEY, ServerProcess, assert_error, httpx, parse_metrics
from trinity.serve.dashboard.gpu_stats import read_gpu_stats
from trinity.serve.dashboard.routes import COOKIE, cookie_token
from trinity.serve.dashboard.snapshot import latency_summary

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UPDATE_WITHIN_MS = 3000


# ---------------------------------------------------------------------- fixtures
def _find_chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, when installed (`.ci/run` installs it); a test never installs it."""
    path = _find_chromium()
    if path is None:
        pytest.skip("chromium is not installed (no /usr/bin/chromium, chromium or chromium-browser on PATH): "
                    "`apt-get install chromium`, or run .ci/run, which installs it")
    return path


@pytest.fixture(scope="module")
def browser(chromium):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Load:
    """Streaming chat completions on background threads until stopped (bounded in count and time)."""

    def __init__(self, server: ServerProcess, threads: int = 2, max_requests: int = 200, max_seconds: float = 45):
        self.server, self.max_requests, self.deadline = server, max_requests, time.monotonic() + max_seconds
        self.stop = threading.Event()
        self.first_token = threading.Event()
        self.finished = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        client = self.server.make_client(timeout=60)
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                with self._lock:
                    if self.finished >= self.max_requests:
                        return
                # text completions: every chunk carries text (chat output would start inside <think>)
                stream = client.completions.create(model="tiny", prompt="hi", max_tokens=48, stream=True,
                                                   temperature=1.0, extra_body={"ignore_eos": True})
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        self.first_token.set()
                    if self.stop.is_set():
                        break
                stream.close()
                with self._lock:
                    self.finished += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.errors.append(e)
        finally:
            client.close()

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)


def read_events(server: ServerProcess, count: int, **request) -> list[dict]:
    """The first `count` snapshots of /dashboard/events (the stream is left open forever otherwise)."""
    events = []
    with httpx.stream("GET", f"{server.base_url}/dashboard/events", timeout=30, **request) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == count:
                    break
    return events


def number(text: str) -> float:
    return float(text.replace(",", ""))


# ---------------------------------------------------------------------- the page in a browser
@pytest.mark.server
def test_dashboard_live_in_chromium(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    with Load(server) as load:
        assert load.first_token.wait(30), f"no streamed token: {load.errors}"
        response = page.goto(f"{server.base_url}/dashboard?key={API_KEY}")
        assert response.status == 200
        page.wait_for_function("() => document.getElementById('connection').textContent === 'live' && "
                               "document.getElementById('total-tokens').textContent !== '–'", timeout=10000)
        assert "key=" not in page.url  # the page dropped the key from the address bar; the cookie stands in

        # The numbers move while requests run: the total-tokens counter changes within 3 s, and tokens/s is > 0.
        before = number(page.inner_text("#total-tokens"))
        started = time.monotonic()
        page.wait_for_function(f"() => Number(document.getElementById('total-tokens').textContent) > {before}",
                               timeout=UPDATE_WITHIN_MS)
        print(f"\ntotal-tokens changed {time.monotonic() - started:.2f} s after it was read ({before:.0f} before)")
        page.wait_for_function("() => Number(document.getElementById('tokens-per-s').textContent) > 0",
                               timeout=UPDATE_WITHIN_MS)
        # Latencies show once a request has finished in the window; KV pools are drawn from the first tick.
        page.wait_for_function("() => Number(document.getElementById('ttft-count').textContent) > 0 && "
                               "Number(document.getElementById('itl-count').textContent) > 0", timeout=10000)
        tps = number(page.inner_text("#tokens-per-s"))
        running = int(page.inner_text("#running"))
        assert tps > 0 and running >= 0
        assert re.search(r"(ms|s)$", page.inner_text("#ttft-p50")), page.inner_text("#ttft-p50")
        assert re.search(r"(ms|s)$", page.inner_text("#itl-p90")), page.inner_text("#itl-p90")
        for pool in ("full", "sliding"):
            assert re.search(r"\d+ / \d+ blocks \(\d+\.\d%\)", page.inner_text(f"#kv-{pool}")), pool
        hits = re.fullmatch(r"(\d+\.\d)% of (\d+) tokens", page.inner_text("#prefix-hits"))
        assert hits and 0 <= float(hits.group(1)) <= 100 and int(hits.group(2)) > 0, page.inner_text("#prefix-hits")

        # The heatmap: one cell per (MoE layer, expert) as /metrics counts them, painted in several colours.
        page.wait_for_function("() => Number(document.getElementById('expert-heatmap').dataset.cells || 0) > 0",
                               timeout=UPDATE_WITHIN_MS)
        metrics = parse_metrics(httpx.get(f"{server.base_url}/metrics", timeout=10).text)
        pairs = [re.search(r'expert="(\d+)",layer="(\d+)"', k) for k in metrics
                 if k.startswith("trinity:moe_expert_tokens_total")]
        layers = {int(m.group(2)) for m in pairs}
        experts = {int(m.group(1)) for m in pairs}
        canvas = page.eval_on_selector("#expert-heatmap", """c => {
            const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const colours = new Set();
            let painted = 0;
            for (let i = 0; i < data.length; i += 4) {
                if (data[i + 3] > 0) { painted++; colours.add(data[i] + ',' + data[i + 1] + ',' + data[i + 2]); }
            }
            return {painted, colours: colours.size, pixels: c.width * c.height, cells: Number(c.dataset.cells),
                    layers: Number(c.dataset.layers), experts: Number(c.dataset.experts)};
        }""")
        assert (canvas["layers"], canvas["experts"]) == (len(layers), len(experts)), (canvas, layers, experts)
        assert canvas["cells"] == len(layers) * len(experts)
        assert canvas["painted"] > canvas["pixels"] // 4, canvas
        assert canvas["colours"] >= 3, canvas  # a flat fill would be one colour, not a load map

        # GPU rows: "no GPU" without one; real readings with one.
        gpu_rows = [page.inner_text(f"#{row} td") for row in ("gpu-util", "gpu-memory", "gpu-power", "gpu-temp")]
        if read_gpu_stats() is None:
            assert gpu_rows == ["no GPU"] * 4, gpu_rows
        else:
            assert re.fullmatch(r"\d+ %", gpu_rows[0]) and re.search(r"[MG]iB / ", gpu_rows[1]), gpu_rows

        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
    assert not load.errors, load.errors
    page.close()
    print(f"dashboard screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    assert not console_errors, console_errors
    # Self-contained: the browser asked this server for everything (no CDN, no other origin).
    assert requested and all(u.startswith(server.base_url + "/") or u.startswith("data:") for u in requested), \
        requested


# ---------------------------------------------------------------------- auth
@pytest.mark.server
def test_dashboard_needs_the_key(server):
    base = server.base_url
    for path in ("/dashboard", "/dashboard/events"):
        assert_error(httpx.get(base + path, timeout=10), 401, "authentication_error", code="invalid_api_key")
        assert_error(httpx.get(base + path, params={"key": "wrong"}, timeout=10), 401, "authentication_error")
        assert_error(httpx.get(base + path, headers={"Authorization": "Bearer wrong"}, timeout=10), 401,
                     "authentication_error")
        assert_error(httpx.get(base + path, cookies={COOKIE: cookie_token("wrong")}, timeout=10), 401,
                     "authentication_error")
        assert_error(httpx.get(base + path, cookies={COOKIE: API_KEY}, timeout=10), 401,  # the raw key is no token
                     "authentication_error")

    page = httpx.get(base + "/dashboard", params={"key": API_KEY}, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    token = page.cookies.get(COOKIE)
    assert token and API_KEY not in token and "httponly" in page.headers["set-cookie"].lower()
    # the cookie alone, the header alone, and the key in the query each open the page and the stream
    assert httpx.get(base + "/dashboard", cookies={COOKIE: token}, timeout=10).status_code == 200
    assert httpx.get(base + "/dashboard", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).status_code == 200
    for request in ({"cookies": {COOKIE: token}}, {"params": {"key": API_KEY}}, {"headers": server.headers}):
        assert len(read_events(server, 1, **request)) == 1

    # the page's code is public (no server data in it); nothing else is served from that folder
    for asset in ("dashboard.js", "dashboard.css"):
        assert httpx.get(f"{base}/dashboard/static/{asset}", timeout=10).status_code == 200
    for bad in ("routes.py", "index.html", "..%2Froutes.py", "%2e%2e%2fapp.py"):
        assert httpx.get(f"{base}/dashboard/static/{bad}", timeout=10).status_code == 404, bad


# ---------------------------------------------------------------------- the stream's numbers
@pytest.mark.server
def test_event_stream_tracks_the_server(server):
    before = parse_metrics(httpx.get(f"{server.base_url}/metrics", timeout=10).text)
    with Load(server, threads=1, max_requests=3) as load:
        assert load.first_token.wait(30), load.errors
        events = read_events(server, 3, headers=server.headers)
    assert not load.errors, load.errors
    times = [e["time"] for e in events]
    assert all(0.5 < b - a < 2.5 for a, b in zip(times, times[1:])), times  # about once a second
    last = events[-1]
    # totals only grow, and agree with the engine's own counters at least as of before the load
    totals = [e["total_generated_tokens"] for e in events]
    assert totals == sorted(totals) and totals[-1] > 0
    assert last["total_prompt_tokens"] >= before.get("trinity:prompt_tokens_total", 0)
    assert set(last["kv"]["pools"]) == {"full", "sliding"}
    for pool in last["kv"]["pools"].values():
        assert 0 <= pool["used_blocks"] <= pool["total_blocks"] and pool["usage"] == pytest.approx(
            pool["used_blocks"] / pool["total_blocks"])
    experts = last["experts"]
    assert experts and len(experts["tokens"]) == len(experts["layers"]) == len(experts["imbalance"])
    assert all(len(row) == experts["num_experts"] for row in experts["tokens"])
    if experts["basis"] == "recent":
        assert sum(map(sum, experts["tokens"])) > 0
    assert (last["gpus"] is None) == (read_gpu_stats() is None)


@pytest.mark.server
def test_open_dashboard_does_not_hold_up_shutdown():
    with ServerProcess("--max-model-len", "256", "--shutdown-timeout", "20", name="dashboard-drain") as server:
        with httpx.stream("GET", f"{server.base_url}/dashboard/events", timeout=30) as r:  # no --api-key: open
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            started = time.monotonic()
            server.terminate()
            rest = list(lines)  # the server ends the stream itself once it is draining
        assert "event: end" in rest, rest[-5:]
        assert server.wait(15) == 0
        assert time.monotonic() - started < 10


# ---------------------------------------------------------------------- the numbers' arithmetic
@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_latency_summary_matches_numpy(n):
    values = np.random.default_rng(n).exponential(0.05, size=n).tolist()
    summary = latency_summary(values)
    assert summary["count"] == n
    assert summary["mean"] == pytest.approx(np.mean(values))
    assert summary["p50"] == pytest.approx(np.percentile(values, 50))
    assert summary["p90"] == pytest.approx(np.percentile(values, 90))
    assert latency_summary([]) == {"count": 0, "mean": None, "p50": None, "p90": None}


def test_dashboard_files_are_self_contained():
    """No URL in the page's files points anywhere but this server."""
    folder = Path(__file__).resolve().parents[1] / "src" / "trinity" / "serve" / "dashboard"
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        text = (folder / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
