"""The dashboard's view of the server: one JSON-ready dict per tick, built from what the server already tracks.

The engine publishes monotonic totals (generated and prompt tokens, tokens routed to each expert); rates and
"recent" heatmaps come from differences between the samples kept here, so the engine needs no extra
bookkeeping. Latencies come from the raw recent observations the metrics' histograms keep.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..state import ServerState

RATE_WINDOW_S = 2.0       # tokens/s: short, so the number follows the load within a tick or two
LOAD_WINDOW_S = 10.0      # heatmap: long enough that a few decode steps fill it
LATENCY_WINDOW_S = 60.0   # TTFT / ITL: TTFT is observed once per finished request, so it needs a longer view
MIN_SPAN_S = 0.25         # a rate over less time than this is mostly noise


@dataclass(slots=True)
class _Sample:
    time: float
    generated: int
    prompt: int
    expert_tokens: list[list[int]] | None


def latency_summary(values: Sequence[float]) -> dict:
    """count, mean, p50 and p90 (linear interpolation between closest ranks) in seconds; None when empty."""
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p90": None}
    ordered = sorted(values)

    def quantile(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"count": len(ordered), "mean": sum(ordered) / len(ordered), "p50": quantile(0.5),
            "p90": quantile(0.9)}


def _status(state: ServerState) -> str:
    if state.load_error:
        return "failed"
    if state.engine is None:
        return "loading"
    if getattr(state.engine, "errored", None) is not None:
        return "engine error"
    return "draining" if state.draining else "ready"


class DashboardSampler:
    """Shared by every open dashboard: keeps the last LOAD_WINDOW_S of engine totals and turns them into
    rates. Snapshots asked for within `min_interval` of the last one are answered from it, so many open
    pages cost no more than one."""

    def __init__(self, state: ServerState, clock: Callable[[], float] = time.monotonic,
                 min_interval: float = 0.2):
        self.state = state
        self.clock = clock
        self.min_interval = min_interval
        self.started = clock()
        self._history: deque[_Sample] = deque()
        self._last: tuple[float, dict] | None = None

    def snapshot(self, gpus: list[dict] | None) -> dict:
        now = self.clock()
        if self._last is not None and now - self._last[0] < self.min_interval:
            return {**self._last[1], "gpus": gpus}
        snap = self._build(now, gpus)
        self._last = (now, snap)
        return snap

    # ------------------------------------------------------------------ pieces
    def _reference(self, now: float, window: float) -> _Sample | None:
        """The oldest kept sample inside the window (at least MIN_SPAN_S old); failing that, the newest older
        one, so a page that ticks slowly still gets a rate."""
        older = None
        for sample in self._history:
            age = now - sample.time
            if age < MIN_SPAN_S:
                break
            if age <= window:
                return sample
            older = sample
        return older

    def _build(self, now: float, gpus: list[dict] | None) -> dict:
        state = self.state
        engine = state.engine
        stats = engine.stats if engine is not None else {}
        load = engine.expert_load if engine is not None else None
        # prompt tokens served: computed, or taken from the prefix cache
        prompt = int(stats.get("num_prompt_tokens", 0)) + int(stats.get("num_cached_prompt_tokens", 0))
        current = _Sample(now, int(stats.get("num_generated_tokens", 0)), prompt, load["tokens"] if load else None)

        ref = self._reference(now, RATE_WINDOW_S)
        if ref is None:
            generation_rate = prompt_rate = None
        else:
            span = now - ref.time
            generation_rate = max(0, current.generated - ref.generated) / span
            prompt_rate = max(0, current.prompt - ref.prompt) / span

        snap = {
            "time": time.time(),
            "uptime_s": now - self.started,
            "status": _status(state),
            "model": state.settings.served_model_name,
            "tokens_per_s": generation_rate,
            "prompt_tokens_per_s": prompt_rate,
            "total_generated_tokens": current.generated,
            "total_prompt_tokens": current.prompt,
            "running": int(stats.get("num_running", 0)),
            "waiting": int(stats.get("num_waiting", 0)),
            "in_flight_http": state.in_flight,
            "preemptions": int(stats.get("num_preemptions", 0)),
            "steps": int(stats.get("num_steps", 0)),
            "kv": self._kv(stats),
            "prefix_cache": stats.get("prefix_cache"),
            "ttft": self._latency(state.metrics.ttft.recent, now),
            "itl": self._latency(state.metrics.itl.recent, now),
            "experts": self._experts(now, current, load),
            "gpus": gpus,
        }
        self._history.append(current)
        while self._history and now - self._history[0].time > LOAD_WINDOW_S + 1.0:
            self._history.popleft()
        return snap

    @staticmethod
    def _kv(stats: dict) -> dict:
        pools = {}
        usage = stats.get("kv_cache_usage", {})
        for pool, blocks in stats.get("kv_blocks", {}).items():
            pools[pool] = {"used_blocks": int(blocks["used"]), "total_blocks": int(blocks["total"]),
                           "usage": float(usage.get(pool, 0.0))}
        return {"block_size": stats.get("block_size"), "pools": pools}

    @staticmethod
    def _latency(recent, now: float) -> dict:
        # tuple() copies the deque in one C call, so observations appended meanwhile cannot break the loop
        values = [v for t, v in tuple(recent) if now - t <= LATENCY_WINDOW_S]
        return {**latency_summary(values), "window_s": LATENCY_WINDOW_S}

    def _experts(self, now: float, current: _Sample, load: dict | None) -> dict | None:
        """Tokens per expert per MoE layer over the load window; when nothing was routed in it (an idle
        server), the totals since start, so the heatmap still shows where routing went."""
        if load is None or current.expert_tokens is None:
            return None
        totals = current.expert_tokens
        ref = self._reference(now, LOAD_WINDOW_S)
        basis, counts, window = "since start", totals, None
        if ref is not None and ref.expert_tokens is not None and len(ref.expert_tokens) == len(totals):
            recent = [[max(0, a - b) for a, b in zip(row, old)] for row, old in zip(totals, ref.expert_tokens)]
            if any(any(row) for row in recent):
                basis, counts, window = "recent", recent, now - ref.time
        return {"layers": list(load["layers"]), "num_experts": len(totals[0]) if totals else 0,
                "tokens": counts, "basis": basis, "window_s": window,
                "imbalance": [float(x) if math.isfinite(x) else None for x in load.get("imbalance", [])]}
