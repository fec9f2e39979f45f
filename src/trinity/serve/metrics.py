"""Prometheus metrics (text exposition format 0.0.4), written here: small, dependency-free.

Names carry the `trinity:` prefix. Gauges that mirror the engine are filled at scrape time.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Iterable

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels.items())
    return "{" + inner + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Gauge:
    """A value set from outside. kind="counter" for a monotonic total mirrored from the engine."""

    def __init__(self, name: str, help: str, kind: str = "gauge"):
        self.name, self.help, self.kind = name, help, kind
        self._values: dict[tuple, float] = {}

    def set(self, value: float, **labels: str) -> None:
        self._values[tuple(sorted(labels.items()))] = float(value)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for key, v in sorted(self._values.items()):
            yield f"{self.name}{_labels(dict(key))} {_num(v)}"


class Counter(Gauge):
    """A total counted in this process (`inc`), not mirrored from the engine."""

    def __init__(self, name: str, help: str):
        super().__init__(name, help, "counter")
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()
        # The latest raw observations with their monotonic time: the dashboard's recent mean and percentiles,
        # which the buckets are too coarse for. Bounded, so a busy server keeps only its last moments.
        self.recent: deque[tuple[float, float]] = deque(maxlen=4096)

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value
            self.recent.append((time.monotonic(), value))

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        running = 0
        for bound, n in zip(self.buckets + (math.inf,), self._counts):
            running += n
            yield f'{self.name}_bucket{{le="{_num(bound)}"}} {running}'
        yield f"{self.name}_sum {_num(self._sum)}"
        yield f"{self.name}_count {running}"


class ServerMetrics:
    def __init__(self):
        p = "trinity:"
        self.running = Gauge(p + "num_requests_running", "Sequences being computed.")
        self.waiting = Gauge(p + "num_requests_waiting",
                             "Sequences waiting for the scheduler (those paused by the fair share included).")
        self.kv_usage = Gauge(p + "kv_cache_usage_perc", "Fraction of each KV pool's blocks in use (0-1).")
        self.preemptions = Gauge(p + "num_preemptions_total", "Sequences preempted (recomputed) so far.", "counter")
        self.pauses = Gauge(p + "num_pauses_total", "Running sequences paused for the fair share so far.", "counter")
        self.lookahead_steps = Gauge(p + "num_lookahead_steps_total",
                                     "Decode steps queued before the previous step's tokens were read.", "counter")
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens of finished requests.")
        self.prefix_queries = Gauge(p + "prefix_cache_queries_total",
                                    "Tokens of sequences looked up in the prefix cache.", "counter")
        self.prefix_hits = Gauge(p + "prefix_cache_hits_total", "Of those, tokens found in the prefix cache.",
                                 "counter")
        self.generation_tokens = Counter(p + "generation_tokens_total", "Tokens generated for finished requests.")
        self.request_success = Counter(p + "request_success_total", "Finished requests by finish reason.")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from arrival to the first token.")
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between consecutive streamed tokens.")
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Time from arrival to the last token.")
        self.queue = Histogram(p + "request_queue_time_seconds", "Time from arrival to first scheduling.")
        self.expert_tokens = Gauge(p + "moe_expert_tokens_total",
                                   "Tokens routed to each expert of each MoE layer since start.", "counter")
        self.expert_imbalance = Gauge(p + "moe_load_imbalance",
                                      "Recent expert load per MoE layer: max over mean (1 = perfectly balanced).")
        self._all = [self.running, self.waiting, self.kv_usage, self.preemptions, self.pauses, self.lookahead_steps,
                     self.prompt_tokens, self.prefix_queries, self.prefix_hits,
                     self.generation_tokens, self.request_success, self.ttft, self.itl, self.e2e, self.queue,
                     self.expert_tokens, self.expert_imbalance]

    def update_from_engine(self, stats: dict, expert_load: dict | None) -> None:
        self.running.set(stats["num_running"])
        self.waiting.set(stats["num_waiting"])
        for pool, usage in stats["kv_cache_usage"].items():
            self.kv_usage.set(usage, pool=pool)
        self.preemptions.set(stats["num_preemptions"])
        self.pauses.set(stats["num_pauses"])
        self.lookahead_steps.set(stats["num_lookahead_steps"])
        self.prefix_queries.set(stats["prefix_cache"]["queried_tokens"])
        self.prefix_hits.set(stats["prefix_cache"]["hit_tokens"])
        if expert_load:
            for layer, tokens, imbalance in zip(expert_load["layers"], expert_load["tokens"],
                                                expert_load["imbalance"]):
                self.expert_imbalance.set(imbalance, layer=str(layer))
                for expert, n in enumerate(tokens):
                    self.expert_tokens.set(n, layer=str(layer), expert=str(expert))

    def render(self) -> str:
        return "\n".join(line for metric in self._all for line in metric.render()) + "\n"
