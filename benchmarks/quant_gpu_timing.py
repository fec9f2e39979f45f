"""What the quantized-kernel GPU benchmarks (`fp8_gpu.py`, `w4a16_gpu.py`) share: the model shapes they time, and
the timing itself.

Kernels are captured in a CUDA graph as back-to-back calls over enough copies of the weights to overflow the L2
cache (a decode step reads them cold); the time is per call, the median of several replays. Under `--smoke` (CPU,
Triton's interpreter) each call runs once and its time means nothing: the smoke run checks that the script runs.
"""

from __future__ import annotations

import statistics
import time

import torch

COLD_BYTES = 256 << 20  # weights cycled per graph: more than an H100's 50 MB L2


class Shapes:
    """Mini's projections (hidden 2048, 32 heads x 128, dense intermediate 6144) at decode and prefill rows, and
    Nano's and Mini's routed experts (128, top-8) at decode and prefill tokens; tiny ones for the smoke run."""

    def __init__(self, smoke: bool):
        if smoke:
            self.projections = {"smoke": (192, 320)}
            self.rows = (1, 130)
            self.experts = {"smoke": (256, 192)}
            self.tokens = (1, 20)
            self.num_experts, self.top_k = 8, 2
        else:
            self.projections = {"q_proj": (4096, 2048), "o_proj": (2048, 4096), "dense gate_up": (12288, 2048),
                                "dense down": (2048, 6144)}
            self.rows = (1, 8, 256, 2048)
            self.experts = {"nano": (1024, 256), "mini": (2048, 1024)}  # (hidden, moe intermediate)
            self.tokens = (1, 8, 64, 512)
            self.num_experts, self.top_k = 128, 8


class Timer:
    def __init__(self, device: torch.device, smoke: bool, calls: int):
        self.device, self.smoke, self.calls = device, smoke, calls

    def copies_for(self, nbytes: int) -> int:
        """Copies of a weight of `nbytes` to cycle through so that each call reads it from memory, not L2."""
        return 1 if self.smoke else max(2, -(-COLD_BYTES // max(nbytes, 1)))

    def per_call_us(self, calls: list) -> float:
        """Median microseconds per call of `calls` (closures, cycled) captured back to back in one CUDA graph."""
        if self.device.type != "cuda":  # the interpreter: run once, the time means nothing
            start = time.perf_counter()
            calls[0]()
            return (time.perf_counter() - start) * 1e6
        n = max(self.calls, len(calls))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile outside the capture
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n):
                calls[i % len(calls)]()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / n)
        del graph
        return statistics.median(times)

    def eager_us(self, fn, reps: int = 5) -> float:
        """Median microseconds of `fn` run eagerly (for references that sync with the host)."""
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(1 if self.smoke else reps):
            start = time.perf_counter()
            fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e6)
        return statistics.median(times)


def max_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
