"""Fast kernels, each beside its pure-torch reference, chosen at run time.

`TRINITY_KERNELS=reference` (or `use_reference(True)`) forces the references everywhere, for tests
and for debugging a fast path. On CUDA the fast paths are Triton kernels; on the CPU, fp32 and bf16 inference
takes small C kernels (`native.py`, built on first use; `TRINITY_CPU_NATIVE=0` turns them off) and oneDNN
packed-weight linears.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .. import switches

_force_reference: bool | None = None
_graph_mode = False


@contextlib.contextmanager
def graph_mode():
    """Inside: pick kernels as for a CUDA-graph capture. The runner wraps both the warm-up runs and the capture
    in it, so that the warm-up compiles exactly the kernels the capture records (a dispatcher that checks only
    `torch.cuda.is_current_stream_capturing()` would pick another kernel while warming up)."""
    global _graph_mode
    previous, _graph_mode = _graph_mode, True
    try:
        yield
    finally:
        _graph_mode = previous


def in_graph_mode() -> bool:
    return _graph_mode or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def use_reference(force: bool | None) -> None:
    """True: always the references; False: fast paths where available; None: follow TRINITY_KERNELS."""
    global _force_reference
    _force_reference = force


def reference_forced() -> bool:
    """Whether the references must run: `use_reference(...)` if set, else TRINITY_KERNELS=reference (any case:
    the C kernels check this, the Triton ones `kernels_mode()` too, and both must read the variable alike)."""
    if _force_reference is not None:
        return _force_reference
    return switches.get().kernels == "reference"


def kernels_mode() -> str:
    """TRINITY_KERNELS: auto (Triton on CUDA), triton (also on CPU under TRITON_INTERPRET=1), reference.
    Parsed once by `trinity.switches` (lower-cased; another value raises)."""
    return switches.get().kernels


def interpreting() -> bool:
    """TRITON_INTERPRET as Triton reads it (1/true/on/yes)."""
    return switches.get().triton_interpret


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def triton_available(device: torch.device | str) -> bool:
    """Triton imports and can run here: a CUDA device, or the interpreter with the kernels forced on."""
    device = torch.device(device)
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting() and kernels_mode() == "triton"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels should run on these inputs: not when the references are forced or autograd
    needs them (the kernels have no backward); otherwise where `triton_available` says so."""
    if not tensors or reference_forced() or kernels_mode() == "reference":
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return triton_available(tensors[0].device)
