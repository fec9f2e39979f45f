"""`trinity bench`: a load driver for any OpenAI-compatible endpoint (ours or vLLM's).

Every request is a streamed `/v1/chat/completions`; per request we keep TTFT, chunk arrival times and token
counts (see bench_client), and summarise them per run and per sweep level (bench_stats). `/metrics` is
scraped once a second when the server has it (bench_metrics). Modes:

- chat:      one request at a time (the latency view), for --duration or --num-requests
- sustained: open-loop arrivals every --cadence seconds, or Poisson at --request-rate, prompts rotating
- sweep:     closed loop at each --concurrency level for --duration (or --num-requests) each

Module-level imports stay in the standard library so that `trinity --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MODES = ("chat", "sustained", "sweep")
# Seed 000's scripted benchmark: 15 rotating long technical prompts, one every 1.5 s, for 5 minutes.
PRESETS = {"seed000": {"mode": "sustained", "cadence": 1.5, "duration": 300.0, "num_prompts": 15}}
DEFAULTS = {"mode": "chat", "duration": 60.0, "cadence": 1.0, "concurrency": "1,4,16", "max_tokens": 256}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                   help="the OpenAI-compatible API root, with or without /v1 (default %(default)s)")
    p.add_argument("--model", default=None, help="model name to request (default: the first of GET /v1/models)")
    p.add_argument("--mode", choices=MODES, default=None, help="chat (default), sustained or sweep")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="seed000: sustained, 15 prompts, 1.5 s cadence, 5 minutes (flags given still win)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of load (per level in sweep); default 60 unless --num-requests is given")
    p.add_argument("--num-requests", type=int, default=None, help="stop after this many requests (per level)")
    p.add_argument("--cadence", type=float, default=None, help="sustained: seconds between arrivals (default 1)")
    p.add_argument("--request-rate", type=float, default=None,
                   help="sustained: Poisson arrivals at this many requests/s instead of a fixed cadence")
    p.add_argument("--concurrency", default=None, help="sweep: comma-separated levels (default 1,4,16)")
    p.add_argument("--prompts", default=None,
                   help="prompt file: .json list, .jsonl, or text with one prompt per line (default: built-in 15)")
    p.add_argument("--max-tokens", type=int, default=None, help="per request (default 256)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--api-key", default=None, help="Bearer key (default: $OPENAI_API_KEY)")
    p.add_argument("--slo", default=None, help="goodput limits in seconds, e.g. ttft=0.5,tpot=0.05,e2e=10")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a request counts as a timeout")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.add_argument("--out", default=None, help="folder for result.json and the PNG charts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also off when not a terminal)")


@dataclass(slots=True)
class BenchConfig:
    api_base: str  # ends with /v1
    model: str | None
    mode: str
    duration: float | None
    num_requests: int | None
    cadence: float
    request_rate: float | None
    concurrency: list[int]
    prompts: list[str]
    max_tokens: int
    temperature: float
    api_key: str | None
    slo: dict[str, float]
    timeout: float
    seed: int = 0
    progress: bool = True
    out_dir: Path | None = None
    preset: str | None = None

    @property
    def metrics_url(self) -> str:
        return self.api_base.removesuffix("/v1") + "/metrics"


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Flags over preset over defaults, validated with messages that name the flag."""
    from .bench_prompts import DEFAULT_PROMPTS, load_prompts
    from .bench_stats import parse_slo

    preset = PRESETS[args.preset] if args.preset else {}

    def pick(name: str):
        given = getattr(args, name)
        return given if given is not None else preset.get(name, DEFAULTS.get(name))

    duration = args.duration if args.duration is not None else preset.get("duration")
    if duration is None and args.num_requests is None:
        duration = DEFAULTS["duration"]
    if duration is not None and not duration > 0:
        raise ValueError(f"--duration {duration}: must be > 0 seconds")
    if args.num_requests is not None and args.num_requests < 1:
        raise ValueError(f"--num-requests {args.num_requests}: must be >= 1")
    cadence = float(pick("cadence"))
    if not cadence > 0:
        raise ValueError(f"--cadence {cadence}: must be > 0 seconds")
    if args.request_rate is not None and not args.request_rate > 0:
        raise ValueError(f"--request-rate {args.request_rate}: must be > 0 requests/s")
    try:
        levels = [int(x) for x in str(pick("concurrency")).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency {args.concurrency!r}: expected comma-separated integers") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency {args.concurrency!r}: levels must be integers >= 1")
    max_tokens = int(pick("max_tokens"))
    if max_tokens < 1:
        raise ValueError(f"--max-tokens {max_tokens}: must be >= 1")
    if args.timeout <= 0:
        raise ValueError(f"--timeout {args.timeout}: must be > 0 seconds")
    prompts = load_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    if "num_prompts" in preset and not args.prompts:
        prompts = prompts[:preset["num_prompts"]]
    base = args.base_url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"--base-url {args.base_url!r}: expected an http:// or https:// URL")
    return BenchConfig(
        api_base=base if base.endswith("/v1") else base + "/v1", model=args.model, mode=pick("mode"),
        duration=duration, num_requests=args.num_requests, cadence=cadence, request_rate=args.request_rate,
        concurrency=levels, prompts=prompts, max_tokens=max_tokens, temperature=args.temperature,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY"), slo=parse_slo(args.slo), timeout=args.timeout,
        seed=args.seed, progress=not args.no_progress, out_dir=Path(args.out) if args.out else None,
        preset=args.preset)


@dataclass
class _Run:
    """Shared state of one run: the clock, the records, and the counters the progress bar shows."""

    cfg: BenchConfig
    client: object
    model: str
    t0: float = field(default_factory=time.perf_counter)
    records: list = field(default_factory=list)
    sent: int = 0
    in_flight: int = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def one(self, level: int | None = None):
        from .bench_client import RequestRecord, chat_body, stream_chat

        i = self.sent
        self.sent += 1
        prompt_index = i % len(self.cfg.prompts)
        record = RequestRecord(index=i, prompt_index=prompt_index, start=self.now(), level=level)
        self.records.append(record)
        self.in_flight += 1
        try:
            body = chat_body(self.model, self.cfg.prompts[prompt_index], self.cfg.max_tokens, self.cfg.temperature)
            await stream_chat(self.client, self.cfg.api_base + "/chat/completions", body, record, self.t0)
        except Exception as e:  # noqa: BLE001 - a bug or odd failure in one request must not end the run
            record.error, record.error_message = "client_error", f"{type(e).__name__}: {e}"[:200]
        finally:
            self.in_flight -= 1
        return record

    def more(self, start: float, sent_at_start: int) -> bool:
        """Whether the current phase (run or sweep level) may send another request."""
        cfg = self.cfg
        if cfg.duration is not None and self.now() - start >= cfg.duration:
            return False
        return cfg.num_requests is None or self.sent - sent_at_start < cfg.num_requests


async def _chat(run: _Run) -> None:
    while run.more(0.0, 0):
        await run.one()


async def _sustained(run: _Run) -> None:
    """Open loop: arrivals follow the clock, never the responses, so a slow server builds a queue."""
    cfg = run.cfg
    rng = random.Random(cfg.seed)
    tasks: list[asyncio.Task] = []
    next_at = 0.0
    # The schedule alone decides how many requests go out (duration / cadence), however late the loop runs.
    # (counted here: a created task has not yet run `one`, so run.sent lags behind)
    while ((cfg.duration is None or next_at < cfg.duration)
           and (cfg.num_requests is None or len(tasks) < cfg.num_requests)):
        delay = next_at - run.now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(run.one()))
        next_at += rng.expovariate(cfg.request_rate) if cfg.request_rate else cfg.cadence
    await asyncio.gather(*tasks)


async def _sweep(run: _Run) -> list[tuple[int, float, float]]:
    """Closed loop per level: `c` workers each send their next request when the last one finished."""
    spans = []
    for c in run.cfg.concurrency:
        start, sent_at_start = run.now(), run.sent

        async def worker() -> None:
            while run.more(start, sent_at_start):
                await run.one(level=c)

        await asyncio.gather(*(worker() for _ in range(c)))
        spans.append((c, start, run.now()))
    return spans


async def _discover_model(client, api_base: str) -> str:
    from .bench_client import httpx

    try:
        r = await client.get(api_base + "/models", timeout=10.0)
        r.raise_for_status()
        models = r.json().get("data") or []
        return models[0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"--model not given and GET {api_base}/models gave no model "
                         f"({type(e).__name__}: {str(e)[:120]}); pass --model") from None


async def _progress(run: _Run, stop: asyncio.Event, console) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    cfg = run.cfg
    by_time = cfg.duration is not None
    levels = len(cfg.concurrency) if cfg.mode == "sweep" else 1
    total = (cfg.duration if by_time else cfg.num_requests) * levels
    columns = (TextColumn("[bold]bench {task.description}"), BarColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(cfg.mode, total=total, status="")
        while not stop.is_set():
            done = [r for r in run.records if r.e2e is not None or r.error is not None]
            failed = sum(r.error is not None for r in done)
            tokens = sum(r.output_tokens if r.e2e is not None else len(r.token_times) for r in run.records)
            bar.update(task, completed=min(total, run.now() if by_time else len(done)),
                       status=f"{len(done) - failed} ok · {failed} failed · {run.in_flight} in flight · "
                              f"{tokens} tokens")
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except asyncio.TimeoutError:
                pass


async def run_bench(cfg: BenchConfig, console=None) -> tuple[dict, list]:
    """Runs the load and returns (result, per-request records). Request failures are in the result."""
    from rich.console import Console

    from .bench_client import httpx
    from .bench_metrics import MetricsScraper
    from .bench_stats import metrics_summary, summarize

    console = console or Console(stderr=True)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)  # open loop: never queue here
    timeout = httpx.Timeout(cfg.timeout, connect=min(cfg.timeout, 10.0))
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = cfg.model or await _discover_model(client, cfg.api_base)
        run = _Run(cfg, client, model)
        scraper = MetricsScraper(client, cfg.metrics_url, run.t0)
        scraping = asyncio.create_task(scraper.run())
        stop = asyncio.Event()
        showing = (asyncio.create_task(_progress(run, stop, console))
                   if cfg.progress and console.is_terminal else None)
        spans = []
        try:
            if cfg.mode == "chat":
                await _chat(run)
            elif cfg.mode == "sustained":
                await _sustained(run)
            else:
                spans = await _sweep(run)
        finally:
            end = run.now()
            stop.set()
            scraper.stop()
            await asyncio.gather(scraping, *([showing] if showing else []), return_exceptions=True)
    result = {"mode": cfg.mode, "preset": cfg.preset, "base_url": cfg.api_base, "model": model, "t0": 0.0,
              "config": {"duration_s": cfg.duration, "num_requests": cfg.num_requests, "cadence_s": cfg.cadence,
                         "request_rate": cfg.request_rate, "concurrency": cfg.concurrency if spans else None,
                         "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "prompts": len(cfg.prompts),
                         "slo_s": cfg.slo or None, "timeout_s": cfg.timeout},
              **summarize(run.records, 0.0, end, cfg.slo),
              "metrics": metrics_summary(scraper.samples, scraper.available, scraper.note)}
    if spans:
        result["levels"] = [{"concurrency": c, "t0": s, "t1": e,
                             **summarize([r for r in run.records if r.level == c], s, e, cfg.slo)}
                            for c, s, e in spans]
    return result, run.records


def main(args: argparse.Namespace) -> int:
    """The `trinity bench` command: run, print the table (and --json), write --out. 0 if any request succeeded."""
    from rich.console import Console

    from .bench_report import print_report

    cfg = config_from_args(args)
    err_console = Console(stderr=True)
    result, records = asyncio.run(run_bench(cfg, err_console))
    if cfg.out_dir is not None:
        from .bench_charts import write_charts

        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        result["charts"] = [str(p) for p in write_charts(result, records, cfg.out_dir)]
        result["out_dir"] = str(cfg.out_dir)
        detail = {**result, "request_records": [r.to_json() for r in records]}
        (cfg.out_dir / "result.json").write_text(json.dumps(detail, indent=1) + "\n", encoding="utf-8")
    # With --json, stdout carries only the JSON line; the table goes to stderr for the person watching.
    print_report(result, err_console if args.json else Console())
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0 if result["requests"]["succeeded"] else 1
