"""`trinity bench` against our real server (and a deliberately broken stand-in for foreign servers).

The figures are checked against what the server itself reports (/metrics token counters, usage) and against
each other (per-request records vs summaries), so a counting bug cannot pass by matching a constant.
"""

from __future__ import annotations

import json
import math
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from trinity import cli
from trinity.ops.bench_client import RequestRecord, StreamError, StreamReader
from trinity.ops.bench_metrics import read_sample
from trinity.ops.bench_prompts import DEFAULT_PROMPTS, load_prompts
from trinity.ops.bench_stats import meets_slo, parse_slo, peak_rate, summarize, token_series

from server_helpers import API_KEY, MAX_MODEL_LEN, free_port


def run_cli(capsys, *argv: str) -> tuple[int, dict | None, str]:
    """`trinity bench ... --json --no-progress` in-process: (exit code, the JSON last line, stderr)."""
    code = cli.main(["bench", *argv, "--json", "--no-progress"])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), captured.err


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def generated_tokens(server) -> float:
    return server.metrics().get("trinity:generation_tokens_total", 0.0)


# ---------------------------------------------------------------------- against our server
@pytest.mark.server
def test_sustained_run_produces_every_figure(default_server, capsys, tmp_path):
    server = default_server
    before = generated_tokens(server)
    cadence, duration, max_tokens = 0.25, 2.5, 12
    code, result, _ = run_cli(capsys, "--base-url", server.base_url, "--api-key", API_KEY, "--mode", "sustained",
                              "--cadence", str(cadence), "--duration", str(duration), "--max-tokens", str(max_tokens),
                              "--slo", "ttft=60,tpot=60,e2e=120", "--out", str(tmp_path))
    assert code == 0
    server.wait_idle()
    expected = math.ceil(duration / cadence)  # open loop: arrivals at 0, cadence, ... < duration
    assert result["requests"] == {"total": expected, "succeeded": expected, "failed": 0}
    assert result["errors"] == {}
    assert result["model"] == "tiny"

    detail = json.loads((tmp_path / "result.json").read_text())
    records = detail.pop("request_records")
    assert detail == result  # the file holds the printed result plus the per-request records
    assert [r["prompt_index"] for r in records] == [i % len(DEFAULT_PROMPTS) for i in range(expected)]
    starts = [r["start"] for r in records]
    assert all(abs(s - i * cadence) < 0.5 for i, s in enumerate(starts)), starts  # on the clock, not on replies
    for r in records:
        assert 0 < r["ttft"] <= r["e2e"]
        assert 1 <= r["output_tokens"] <= max_tokens
        assert r["prompt_tokens"] > 0

    # Token counts come from usage: they must equal what the server says it generated for these requests.
    tp = result["throughput"]
    assert tp["output_tokens"] == sum(r["output_tokens"] for r in records) == generated_tokens(server) - before
    assert tp["prompt_tokens"] == sum(r["prompt_tokens"] for r in records)
    # and what the prefix cache served of the prompts, as the server reports it in usage
    assert tp["cached_prompt_tokens"] == sum(r["cached_prompt_tokens"] for r in records)
    assert all(0 <= r["cached_prompt_tokens"] < r["prompt_tokens"] for r in records)
    assert tp["output_tokens_per_s"] == pytest.approx(tp["output_tokens"] / result["duration_s"])
    assert 0 < tp["output_tokens_per_s"] <= tp["output_tokens_per_s_under_load"]
    assert tp["peak_output_tokens_per_s"] > 0
    # the 1-second series adds up to the total (the last window is as long as what is left of the run)
    widths = [1.0] * (len(tp["output_tokens_per_s_series"]) - 1)
    widths.append(result["duration_s"] - len(widths))
    assert sum(v * w for v, w in zip(tp["output_tokens_per_s_series"], widths)) == pytest.approx(tp["output_tokens"])

    lat = result["latency_s"]
    assert lat["ttft"]["n"] == lat["e2e"]["n"] == expected
    for key in ("ttft", "tpot", "itl", "e2e"):
        d = lat[key]
        assert d["n"] > 0 and 0 < d["min"] <= d["median"] <= d["p90"] <= d["p99"] <= d["max"], (key, d)
        assert d["min"] <= d["mean"] <= d["max"]
    assert lat["ttft"]["mean"] == pytest.approx(sum(r["ttft"] for r in records) / expected)
    assert lat["e2e"]["max"] == pytest.approx(max(r["e2e"] for r in records))
    assert result["goodput"]["requests"] == expected and result["goodput"]["fraction"] == 1.0

    m = result["metrics"]
    assert m["available"] and m["samples"] >= 2 and len(m["series"]) == m["samples"]
    assert set(m["kv_cache_usage"]) == {"full", "sliding"}
    assert all(0 <= v["mean"] <= v["max"] <= 1 for v in m["kv_cache_usage"].values())
    assert m["running_max"] >= 0 and m["waiting_max"] >= 0

    names = sorted(Path(p).name for p in result["charts"])
    assert names == ["kv_cache.png", "latency.png", "throughput.png"]
    for p in result["charts"]:
        w, h = png_size(Path(p))
        assert w >= 600 and h >= 300


@pytest.mark.server
def test_sweep_levels_and_chat_mode(default_server, capsys, tmp_path):
    server = default_server
    code, result, _ = run_cli(capsys, "--base-url", server.base_url + "/v1", "--api-key", API_KEY,
                              "--mode", "sweep", "--concurrency", "1,3", "--num-requests", "3",
                              "--max-tokens", "6", "--out", str(tmp_path / "sweep"))
    assert code == 0
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 3]
    assert [lv["requests"]["succeeded"] for lv in result["levels"]] == [3, 3]
    assert result["requests"]["succeeded"] == 6
    assert sum(lv["throughput"]["output_tokens"] for lv in result["levels"]) == result["throughput"]["output_tokens"]
    assert result["levels"][0]["t1"] <= result["levels"][1]["t0"]
    records = json.loads((tmp_path / "sweep" / "result.json").read_text())["request_records"]
    one = sorted((r for r in records if r["level"] == 1), key=lambda r: r["start"])
    assert all(a["start"] + a["e2e"] <= b["start"] for a, b in zip(one, one[1:]))  # concurrency 1: one at a time
    assert (tmp_path / "sweep" / "sweep.png").exists() and png_size(tmp_path / "sweep" / "sweep.png")[0] > 0

    code, result, _ = run_cli(capsys, "--base-url", server.base_url, "--api-key", API_KEY, "--num-requests", "2",
                              "--max-tokens", "4")
    assert code == 0 and result["mode"] == "chat" and result["requests"]["succeeded"] == 2
    assert "levels" not in result and "charts" not in result


@pytest.mark.server
def test_failed_requests_are_counted_not_fatal(default_server, capsys, tmp_path):
    server = default_server
    prompts = tmp_path / "prompts.jsonl"
    too_long = "x" * (MAX_MODEL_LEN + 500)  # byte-level tokenizer: more tokens than the context holds -> 400
    prompts.write_text(json.dumps("Say something short.") + "\n" + json.dumps({"prompt": too_long}) + "\n")
    code, result, _ = run_cli(capsys, "--base-url", server.base_url, "--api-key", API_KEY, "--mode", "sustained",
                              "--cadence", "0.1", "--num-requests", "4", "--max-tokens", "4",
                              "--prompts", str(prompts), "--slo", "e2e=600", "--out", str(tmp_path / "out"))
    assert code == 0
    assert result["requests"] == {"total": 4, "succeeded": 2, "failed": 2}
    assert result["errors"] == {"http_400": 2}
    assert result["goodput"]["requests"] == 2 and result["goodput"]["fraction"] == 0.5
    records = json.loads((tmp_path / "out" / "result.json").read_text())["request_records"]
    assert [r["error"] for r in records] == [None, "http_400", None, "http_400"]
    assert all("token" in r["error_message"] for r in records if r["error"])  # the server's message is kept
    assert len(result["charts"]) == 3

    # every request refused (wrong key): still a complete report, exit status 1
    code, result, _ = run_cli(capsys, "--base-url", server.base_url, "--api-key", "wrong", "--model", "tiny",
                              "--num-requests", "3", "--max-tokens", "4")
    assert code == 1 and result["errors"] == {"http_401": 3} and result["requests"]["succeeded"] == 0

    # nothing listening: connection errors, and no /metrics to scrape
    code, result, _ = run_cli(capsys, "--base-url", f"http://127.0.0.1:{free_port()}", "--model", "m",
                              "--mode", "sustained", "--cadence", "0.05", "--num-requests", "3")
    assert code == 1 and result["errors"] == {"connection": 3}
    assert result["metrics"]["available"] is False and result["metrics"]["note"]


@pytest.mark.server
def test_bad_flags_are_clear_errors(default_server, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    # model discovery needs the key: without it the command says what to do instead of failing inside
    assert cli.main(["bench", "--base-url", default_server.base_url, "--num-requests", "1", "--no-progress"]) == 2
    assert "--model" in capsys.readouterr().err
    for argv, needle in ((["--concurrency", "0"], "--concurrency"), (["--slo", "ttft=fast"], "--slo"),
                         (["--slo", "latency=1"], "--slo"), (["--duration", "-1"], "--duration"),
                         (["--prompts", str(tmp_path / "missing.txt")], "--prompts"),
                         (["--base-url", "localhost:8000"], "--base-url")):
        assert cli.main(["bench", *argv, "--no-progress"]) == 2, argv
        assert needle in capsys.readouterr().err, argv


# ---------------------------------------------------------------------- foreign or broken servers
class _Foreign(BaseHTTPRequestHandler):
    """A stand-in for other servers: behaviour picked by the requested model name."""

    def log_message(self, *args) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        if self.path != "/metrics":
            self.send_error(404)
            return
        body = ('# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
                'vllm:num_requests_running{engine="0",model_name="m"} 3\n'
                'vllm:num_requests_waiting{engine="0",model_name="m"} 1\n').encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model = body["model"]
        if model == "slow":
            time.sleep(1.5)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def event(data) -> None:
            self.wfile.write(f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode())
            self.wfile.flush()

        delta = {"choices": [{"index": 0, "delta": {"content": "ab"}}]}
        event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for _ in range(3):
            event(delta)
            time.sleep(0.01)
        if model == "error-event":
            event({"error": {"message": "engine died", "type": "server_error"}})
        if model != "broken":
            event("[DONE]")


@pytest.fixture(scope="module")
def foreign_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("model,kind", [("broken", "stream_error"), ("error-event", "stream_error"),
                                        ("slow", "timeout")])
def test_foreign_failures_by_kind(foreign_server, capsys, model, kind):
    code, result, _ = run_cli(capsys, "--base-url", foreign_server, "--model", model, "--num-requests", "2",
                              "--timeout", "0.5")
    assert code == 1 and result["errors"] == {kind: 2}


def test_foreign_server_without_usage_and_vllm_metrics(foreign_server, capsys):
    code, result, _ = run_cli(capsys, "--base-url", foreign_server, "--model", "plain", "--num-requests", "2")
    assert code == 0
    assert result["throughput"]["output_tokens"] == 6  # no usage sent: one token per output chunk, 3 chunks each
    assert result["latency_s"]["itl"]["n"] == 4  # two gaps per request
    m = result["metrics"]
    assert m["available"] and m["kv_cache_usage"]["all"]["max"] == 0.25
    assert m["running_max"] == 3 and m["waiting_max"] == 1


# ---------------------------------------------------------------------- pieces
def test_stream_reader_counts_reasoning_and_tool_calls_not_role_chunks():
    reader = StreamReader()
    lines = ['data: {"choices":[{"delta":{"role":"assistant","content":""}}]}', "",
             'data: {"choices":[{"delta":{"reasoning_content":"hm","reasoning":"hm"}}]}',
             ": keep-alive",
             'data: {"choices":[{"delta":{"content":"hi"}}]}',
             'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}',
             'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}',
             'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}', "data: [DONE]"]
    assert [reader.feed(line) for line in lines] == [False, False, True, False, True, True, False, False, False]
    assert reader.done and reader.chunk_tokens == 3 and reader.output_tokens == 9 and reader.prompt_tokens == 5
    assert reader.cached_prompt_tokens is None  # a server that does not report it
    cached = StreamReader()
    cached.feed('data: {"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":2,'
                '"prompt_tokens_details":{"cached_tokens":32}}}')
    assert (cached.prompt_tokens, cached.cached_prompt_tokens) == (40, 32)
    with pytest.raises(StreamError, match="boom"):
        StreamReader().feed('data: {"error": {"message": "boom"}}')
    with pytest.raises(StreamError):
        StreamReader().feed("data: {not json")


def _record(i: int, start: float, ttft: float, e2e: float, tokens: int, error: str | None = None) -> RequestRecord:
    times = [start + ttft + k * (e2e - ttft) / max(tokens - 1, 1) for k in range(tokens)]
    return RequestRecord(i, i, start, ttft=None if error else ttft, e2e=None if error else e2e,
                         output_tokens=0 if error else tokens, token_times=[] if error else times, error=error)


def test_stats_goodput_windows_and_peak():
    records = [_record(0, 0.0, 0.1, 1.0, 10), _record(1, 0.5, 0.8, 2.0, 5), _record(2, 1.0, 0, 0, 0, "http_503")]
    slo = parse_slo("ttft=500ms,e2e=1.5")
    assert slo == {"ttft": 0.5, "e2e": 1.5}
    assert [meets_slo(r, slo) for r in records] == [True, False, False]
    s = summarize(records, 0.0, 2.5, slo)
    assert s["requests"] == {"total": 3, "succeeded": 2, "failed": 1} and s["errors"] == {"http_503": 1}
    assert s["goodput"]["requests"] == 1 and s["goodput"]["fraction"] == pytest.approx(1 / 3)
    assert s["latency_s"]["tpot"]["mean"] == pytest.approx(((1.0 - 0.1) / 9 + (2.0 - 0.8) / 4) / 2)
    out, _ = token_series(records, 0.0, 2.5)
    assert len(out) == 3 and out[0] + out[1] + out[2] * 0.5 == pytest.approx(15)
    # sliding window: the busiest second is (0, 1.0], all 10 tokens of request 0; fixed windows never see 10
    assert peak_rate(records, 2.5) == pytest.approx(10)
    assert s["throughput"]["output_tokens_per_s_under_load"] == pytest.approx(15 / 2.5)  # every window busy
    # a request in the first second only, then 2.5 idle seconds: under load counts the first window alone
    lone = [_record(0, 0.0, 0.1, 0.9, 9)]
    s = summarize(lone, 0.0, 3.5, {})
    assert s["throughput"]["output_tokens_per_s_under_load"] == pytest.approx(9)
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(9 / 3.5)
    assert summarize([], 0.0, 1.0, {})["latency_s"]["ttft"]["mean"] is None


def test_metrics_parsing_and_prompt_files(tmp_path):
    text = ('# HELP x\ntrinity:kv_cache_usage_perc{pool="full"} 0.5\ntrinity:kv_cache_usage_perc{pool="sliding"} '
            '0.125\ntrinity:num_requests_running 2\ntrinity:num_requests_waiting 0\nother_metric 7\n')
    s = read_sample(text, 1.0)
    assert s.kv_usage == {"full": 0.5, "sliding": 0.125} and s.running == 2 and s.waiting == 0
    assert read_sample("other_metric 1\n", 0.0) is None
    assert read_sample('vllm:gpu_cache_usage_perc{model_name="a"} 0.3\n', 0.0).kv_usage == {"all": 0.3}

    (tmp_path / "p.json").write_text(json.dumps(["one", {"prompt": "two"}]))
    (tmp_path / "p.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "bad.json").write_text(json.dumps([{"text": "no prompt key"}]))
    assert load_prompts(tmp_path / "p.json") == ["one", "two"]
    assert load_prompts(tmp_path / "p.txt") == ["first line", "second line"]
    with pytest.raises(ValueError, match="entry 0"):
        load_prompts(tmp_path / "bad.json")
    assert len(DEFAULT_PROMPTS) == 15 and len(set(DEFAULT_PROMPTS)) == 15
    assert all(len(p) > 300 for p in DEFAULT_PROMPTS)  # long-form, as the seed protocol asks


def test_seed000_preset_and_flags_over_it():
    from trinity.ops.bench import config_from_args

    def config(*argv: str):
        return config_from_args(cli.build_parser().parse_args(["bench", *argv]))

    cfg = config("--preset", "seed000")
    assert (cfg.mode, cfg.cadence, cfg.duration, len(cfg.prompts)) == ("sustained", 1.5, 300.0, 15)
    cfg = config("--preset", "seed000", "--duration", "20", "--cadence", "0.5", "--base-url", "http://h:1/v1/")
    assert (cfg.mode, cfg.cadence, cfg.duration) == ("sustained", 0.5, 20.0)
    assert cfg.api_base == "http://h:1/v1" and cfg.metrics_url == "http://h:1/metrics"
    cfg = config("--num-requests", "5")
    assert cfg.mode == "chat" and cfg.duration is None and cfg.num_requests == 5
