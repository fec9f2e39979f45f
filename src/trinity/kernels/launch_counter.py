"""Count the kernels a piece of code would launch on a GPU, without one.

At batch-1 decode a CUDA-graph replay of a sparse MoE is bound by how many kernels it holds (each costs a launch's
latency however little it does), so the launch count per layer is a figure worth watching. It is
exact and machine-independent, so it can be measured on the CPU, under Triton's interpreter, and guarded by a test.

`LaunchCounter` is a TorchDispatchMode: every aten op that runs a kernel counts once (views, allocations and
metadata do not), and every Triton kernel launch counts once (compiled or interpreted; the interpreter's own
torch work inside a launch is not counted). `section(name)` labels the events that follow. The count is of
torch ops, not of device kernels: a few torch ops launch more than one kernel on a GPU (topk, sort, nonzero).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# aten ops that only allocate (a new tensor, no kernel) or change metadata in place
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "set_",
              "resize_", "record_stream", "detach_", "squeeze_", "unsqueeze_", "t_", "transpose_", "as_strided_"}
# aten ops that make the host wait for the device (not kernels, but a graph cannot hold them)
_SYNC = {"_local_scalar_dense", "item", "nonzero", "tolist"}


def _launches_kernel(name: str, args, kwargs, out) -> bool:
    """In-place ops always write; other ops launch unless every tensor they return aliases an input (a view, or
    `to`/`reshape`/`contiguous` with nothing to do: under inference mode these reach the dispatcher whole)."""
    if name in _NO_KERNEL:
        return False
    if name.endswith("_") or "out" in kwargs:
        return True
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not outs:
        return False
    inputs = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    return not all((storage := _storage(t)) is not None and storage in inputs for t in outs)


def _storage(t: torch.Tensor) -> int | None:
    """The tensor's storage address; None for a tensor without one (oneDNN's packed weights and their outputs on
    the CPU), whose op then counts as a launch."""
    try:
        return t.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):
        return None


@dataclass(frozen=True, slots=True)
class Launch:
    kind: str  # "aten", "triton" or "sync"
    name: str
    section: str


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches: list[Launch] = []
        self.current = ""
        self._inside_triton = 0
        self._patches: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------ recording
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._inside_triton:
            name = func.overloadpacket.__name__
            if name in _SYNC:
                self.launches.append(Launch("sync", name, self.current))
            elif _launches_kernel(name, args, kwargs, out):
                self.launches.append(Launch("aten", name, self.current))
        return out

    def _triton_launch(self, name: str, run, *args, **kwargs):
        if kwargs.get("warmup"):
            return run(*args, **kwargs)
        if not self._inside_triton:
            self.launches.append(Launch("triton", name, self.current))
        self._inside_triton += 1
        try:
            return run(*args, **kwargs)
        finally:
            self._inside_triton -= 1

    def __enter__(self):
        self._patches = contextlib.ExitStack()
        self._patches.enter_context(_patched_triton(self))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()

    @contextlib.contextmanager
    def section(self, name: str):
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous

    # ------------------------------------------------------------------ reading
    def count(self, section: str | None = None, kinds: tuple[str, ...] = ("aten", "triton")) -> int:
        return sum(1 for e in self.launches if e.kind in kinds and (section is None or e.section == section))

    def names(self, section: str | None = None) -> Counter:
        return Counter(f"{e.kind}:{e.name}" for e in self.launches
                       if e.kind != "sync" and (section is None or e.section == section))

    def syncs(self) -> int:
        return self.count(kinds=("sync",))


@contextlib.contextmanager
def _patched_triton(counter: LaunchCounter):
    """Route Triton's launch entry points (the JIT runtime's and the interpreter's) through the counter."""
    try:
        from triton.runtime import interpreter, jit
    except ImportError:  # no triton: only aten ops to count
        yield
        return
    originals = [(cls, cls.run) for cls in (jit.JITFunction, interpreter.InterpretedFunction)]
    for cls, run in originals:
        def counted(self, *args, _run=run, **kwargs):
            name = getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "kernel")
            return counter._triton_launch(name, lambda *a, **k: _run(self, *a, **k), *args, **kwargs)
        cls.run = counted
    try:
        yield
    finally:
        for cls, run in originals:
            cls.run = run


def count_by_layer(model, run) -> LaunchCounter:
    """`run()` counted, with each decoder layer of `model` in its own section (`layer{i}`); the rest (metadata,
    embedding, head, sampling) is section ""."""
    layers = model.model.layers
    counter = LaunchCounter()
    for i, layer in enumerate(layers):
        def labelled(*args, _run=layer.forward, _name=f"layer{i}", **kwargs):
            with counter.section(_name):
                return _run(*args, **kwargs)
        layer.forward = labelled
    try:
        with counter:
            run()
    finally:
        for layer in layers:
            del layer.forward
    return counter


def count_decode_step(engine) -> LaunchCounter:
    """One engine step (its sequences already decoding), counted by layer (`count_by_layer`). The step's metadata
    is given a count weight, as the CUDA-graph runner gives it, so the expert-load telemetry counts as in the
    graph."""
    model = engine.model.model
    weight = torch.ones(len(engine.scheduler.running), dtype=torch.long, device=engine.model.device)

    def weighted(input_ids, positions, attn, *args, _forward=model.forward, **kwargs):
        return _forward(input_ids, positions, replace(attn, count_weight=weight), *args, **kwargs)
    model.forward = weighted
    try:
        return count_by_layer(engine.model, engine.step)
    finally:
        del model.forward
