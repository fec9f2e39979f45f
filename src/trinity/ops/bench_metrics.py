"""Scrape a server's Prometheus `/metrics` during a bench run: KV cache usage and queue depth over time.

Understands our names (`trinity:kv_cache_usage_perc{pool=...}`, `trinity:num_requests_running/waiting`) and
vLLM's (`vllm:kv_cache_usage_perc`, older `vllm:gpu_cache_usage_perc`, `vllm:num_requests_running/waiting`).
A server without `/metrics` is fine: the scraper notes it and stops asking.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass, field

from .bench_client import httpx

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
KV_NAMES = ("trinity:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
RUNNING_NAMES = ("trinity:num_requests_running", "vllm:num_requests_running")
WAITING_NAMES = ("trinity:num_requests_waiting", "vllm:num_requests_waiting")


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) for every sample line; lines that do not parse are skipped."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))  # float() reads "+Inf", "-Inf" and "NaN" too
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        samples.append((m.group(1), labels, value))
    return samples


@dataclass(slots=True)
class MetricsSample:
    t: float  # seconds since the start of the run
    kv_usage: dict[str, float]  # pool -> fraction 0-1 ("all" for servers with one pool)
    running: float | None
    waiting: float | None

    def to_json(self) -> dict:
        return {"t": self.t, "kv_usage": self.kv_usage, "running": self.running, "waiting": self.waiting}


def read_sample(text: str, t: float) -> MetricsSample | None:
    """The gauges bench cares about, or None when the exposition has none of them."""
    kv: dict[str, float] = {}
    running = waiting = None
    for name, labels, value in parse_prometheus(text):
        if math.isnan(value):
            continue
        if name in KV_NAMES:
            pool = labels.get("pool", "all")
            kv[pool] = max(kv.get(pool, 0.0), value)  # several engines (vLLM labels): the fullest one
        elif name in RUNNING_NAMES:
            running = (running or 0.0) + value  # summed over engines / model labels
        elif name in WAITING_NAMES:
            waiting = (waiting or 0.0) + value
    if not kv and running is None and waiting is None:
        return None
    return MetricsSample(t, kv, running, waiting)


@dataclass
class MetricsScraper:
    """Polls `url` every `interval` seconds until `stop()`; `available` says whether it ever answered."""

    client: httpx.AsyncClient
    url: str
    clock_zero: float
    interval: float = 1.0
    samples: list[MetricsSample] = field(default_factory=list)
    available: bool | None = None  # None: not asked yet
    note: str | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while not self._stopped.is_set():
            if not await self.scrape_once():
                return
            try:
                await asyncio.wait_for(self._stopped.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    async def scrape_once(self) -> bool:
        """One scrape; False when the endpoint is missing and scraping should stop."""
        try:
            r = await self.client.get(self.url, timeout=5.0)
        except httpx.HTTPError as e:
            if self.available is None:  # never answered: no /metrics here (or no server at all)
                self.available, self.note = False, f"{self.url}: {type(e).__name__}"
                return False
            return True  # a busy server may miss a scrape; keep trying
        if r.status_code != 200:
            if self.available is None:
                self.available, self.note = False, f"{self.url}: HTTP {r.status_code}"
                return False
            return True
        sample = read_sample(r.text, time.perf_counter() - self.clock_zero)
        if sample is None and self.available is None:
            self.available, self.note = False, f"{self.url}: no KV cache or queue gauges"
            return False
        self.available = True
        if sample is not None:
            self.samples.append(sample)
        return True

    def stop(self) -> None:
        self._stopped.set()
