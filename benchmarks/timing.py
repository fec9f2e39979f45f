"""Timing shared by the benchmark scripts (imported from the scripts' own folder)."""

from __future__ import annotations

import statistics
import time

import torch


def median_seconds(fn, reps: int, cuda: bool) -> float:
    """Median seconds of `reps` calls of fn(): CUDA events around each call on a GPU (kernel time of an eager
    call, launch gaps included), the host clock elsewhere."""
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)
