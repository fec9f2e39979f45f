"""Statistics of a bench run: latency distributions, throughput windows, goodput, errors by kind."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from .bench_client import RequestRecord

SLO_KEYS = ("ttft", "tpot", "e2e")


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft=0.5,tpot=0.05,e2e=10` (seconds; a `ms` suffix is allowed) -> {"ttft": 0.5, ...}."""
    if not text:
        return {}
    slo: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--slo {text!r}: expected KEY=SECONDS pairs with KEY in {', '.join(SLO_KEYS)}")
        value = value.strip().lower()
        scale = 1e-3 if value.endswith("ms") else 1.0
        try:
            limit = float(value.removesuffix("ms").removesuffix("s")) * scale
        except ValueError:
            raise ValueError(f"--slo {text!r}: {value!r} is not a number of seconds") from None
        if not limit > 0 or math.isinf(limit):
            raise ValueError(f"--slo {text!r}: the {key} limit must be a positive finite number")
        slo[key] = limit
    return slo


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean, median, p90, p99, min, max (seconds) and the count; None values when there is no data."""
    if not values:
        return {"n": 0, "mean": None, "median": None, "p90": None, "p99": None, "min": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "mean": float(a.mean()), "median": float(p50), "p90": float(p90),
            "p99": float(p99), "min": float(a.min()), "max": float(a.max())}


def token_series(records: Sequence[RequestRecord], t0: float, t1: float, window: float = 1.0
                 ) -> tuple[list[float], list[float]]:
    """Output and prompt tokens per second in consecutive `window`-second windows over [t0, t1).

    Output tokens land when their chunk arrived; a chunk is worth output_tokens / chunks so that the windows
    add up to the exact total even when a server packs several tokens in one chunk. Prompt tokens land at the
    request's first token (when the prefill finished)."""
    n = max(1, math.ceil((t1 - t0) / window - 1e-9))
    out, prompt = [0.0] * n, [0.0] * n
    # the last window may be cut short by the end of the run: its rate is over the time it really covered
    widths = [window] * (n - 1) + [max(t1 - t0 - (n - 1) * window, 1e-3)]

    def slot(t: float) -> int:
        return min(n - 1, max(0, int((t - t0) / window)))

    for r in records:
        if not r.ok:
            continue
        if r.token_times:
            weight = r.output_tokens / len(r.token_times)
            for t in r.token_times:
                out[slot(t)] += weight
        if r.prompt_tokens and r.ttft is not None:
            prompt[slot(r.start + r.ttft)] += r.prompt_tokens
    return [v / w for v, w in zip(out, widths)], [v / w for v, w in zip(prompt, widths)]


def peak_rate(records: Sequence[RequestRecord], duration: float, window: float = 1.0) -> float:
    """Most output tokens in any `window` seconds (a sliding window over chunk arrivals), per second.

    Sliding rather than fixed windows: a burst that straddles a window edge still counts whole. A run shorter
    than the window reports its plain average."""
    events = sorted((t, r.output_tokens / len(r.token_times)) for r in records if r.ok and r.token_times
                    for t in r.token_times)
    if duration < window:
        return sum(w for _, w in events) / duration if duration > 0 else 0.0
    best = inside = 0.0
    lo = 0
    for t, w in events:
        inside += w
        while events[lo][0] <= t - window:
            inside -= events[lo][1]
            lo += 1
        best = max(best, inside)
    return best / window


def loaded_time(records: Sequence[RequestRecord], t0: float, t1: float, window: float = 1.0) -> float:
    """Seconds of the `window`-second windows over [t0, t1) during which a successful request was in flight.

    "Under load" is counted in whole windows, like the throughput series, so that the average under load is
    an average of the windows the series plots (and idle gaps between requests, as in a chat session, drop
    out only when a whole window is idle)."""
    n = max(1, math.ceil((t1 - t0) / window - 1e-9))
    busy = [False] * n
    for r in records:
        if r.ok and r.end is not None:
            first = min(n - 1, max(0, int((r.start - t0) / window)))
            last = min(n - 1, max(0, int((r.end - t0) / window)))
            busy[first:last + 1] = [True] * (last - first + 1)
    last_width = max(t1 - t0 - (n - 1) * window, 0.0)
    return sum((window if i < n - 1 else last_width) for i in range(n) if busy[i])


def meets_slo(r: RequestRecord, slo: dict[str, float]) -> bool:
    if not r.ok:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}
    for key, limit in slo.items():
        value = values[key]
        if value is None:
            if key == "tpot":
                continue  # a one-token answer has no TPOT: nothing to violate
            return False  # no token at all: no TTFT to meet the limit with
        if value > limit:
            return False
    return True


def summarize(records: Sequence[RequestRecord], t0: float, t1: float, slo: dict[str, float]) -> dict:
    """Every figure of one run (or one sweep level) over the wall-clock span [t0, t1]."""
    ok = [r for r in records if r.ok]
    duration = max(t1 - t0, 1e-9)
    out_series, prompt_series = token_series(records, t0, t1)
    total_out = sum(r.output_tokens for r in ok)
    busy = loaded_time(records, t0, t1)
    summary = {
        "duration_s": duration,
        "requests": {"total": len(records), "succeeded": len(ok), "failed": len(records) - len(ok)},
        "errors": dict(sorted(Counter(r.error for r in records if not r.ok).items())),
        "latency_s": {
            "ttft": distribution([r.ttft for r in ok if r.ttft is not None]),
            "tpot": distribution([r.tpot for r in ok if r.tpot is not None]),
            "itl": distribution([gap for r in ok for gap in r.itls]),
            "e2e": distribution([r.e2e for r in ok if r.e2e is not None]),
        },
        "throughput": {
            "output_tokens": total_out,
            "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
            # from the prefix cache (None when the server does not report it)
            "cached_prompt_tokens": (sum(r.cached_prompt_tokens or 0 for r in ok)
                                     if any(r.cached_prompt_tokens is not None for r in ok) else None),
            "output_tokens_per_s": total_out / duration,
            "output_tokens_per_s_under_load": total_out / busy if busy > 0 else 0.0,
            "peak_output_tokens_per_s": peak_rate(records, duration),
            "requests_per_s": len(ok) / duration,
            "window_s": 1.0,
            "output_tokens_per_s_series": out_series,
            "prompt_tokens_per_s_series": prompt_series,
        },
        "goodput": None,
    }
    if slo:
        good = sum(meets_slo(r, slo) for r in records)
        summary["goodput"] = {"slo_s": slo, "requests": good,
                              "fraction": good / len(records) if records else 0.0, "requests_per_s": good / duration}
    return summary


def metrics_summary(samples: Sequence, available: bool | None, note: str | None) -> dict:
    """KV usage per pool (mean, max) and queue depth (max) from the scraped samples."""
    pools = sorted({pool for s in samples for pool in s.kv_usage})
    kv = {}
    for pool in pools:
        values = [s.kv_usage[pool] for s in samples if pool in s.kv_usage]
        kv[pool] = {"mean": float(np.mean(values)), "max": float(np.max(values))}
    running = [s.running for s in samples if s.running is not None]
    waiting = [s.waiting for s in samples if s.waiting is not None]
    return {"available": bool(available), "note": note, "samples": len(samples), "kv_cache_usage": kv,
            "running_max": max(running) if running else None, "waiting_max": max(waiting) if waiting else None,
            "series": [s.to_json() for s in samples]}
