"""Programmatic dependent launch (PDL, Hopper and later) for the decode chain's Triton kernels.

At batch-1 decode a layer is six short kernels, and the gap between one kernel's end and the next one's start is a
real share of the step (on Nano, 340 launches for 1.6 GB of weights). With PDL a kernel is launched with the
programmatic-serialization attribute: its programs may be scheduled onto the SMs while the kernel before it is still
running, and each waits at `griddepcontrol.wait` until that kernel has completed and its memory is visible. The
launch and scheduling overlap the previous kernel's tail instead of following it.

The rule that makes it safe: a kernel launched this way calls `wait_then_release` before it touches global memory
at all (every program, before any early return). Then every memory access of every kernel still happens after its
predecessor completed, and by induction after all earlier kernels did: the order the rest of the code relies on
(the caching allocator's reuse of freed buffers, the last-program counters shared by successive launches) holds as
without PDL. The release (`griddepcontrol.launch_dependents`) comes after the wait, so at most the next kernel is
scheduled early, not a chain of waiting kernels.

Off unless `TRINITY_PDL=1` (or `enable(True)`): the gain has not been measured yet (`benchmarks/decode_gpu.py` times
batch-1 decode both ways). Only on CUDA devices of compute capability 9.0 or more; never in the interpreter, which
has no grid dependency control (there `PDL` is False and the kernels compile without it). Read when a kernel
launches: a CUDA graph keeps what was chosen at its capture.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import switches

try:  # Triton 3.3 and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None

_enabled: bool | None = None


def enable(flag: bool | None) -> None:
    """True / False: PDL on or off where the device supports it; None: follow TRINITY_PDL (off unless set to a true
    spelling: 1, true, on, yes)."""
    global _enabled
    _enabled = flag


def requested() -> bool:
    if _enabled is not None:
        return _enabled
    return switches.get().pdl


@functools.cache
def _supported(index: int) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(index)[0] >= 9


def launch_options(device: torch.device) -> dict:
    """The keyword arguments a PDL-aware kernel's launch takes: the `PDL` constexpr, and Triton's `launch_pdl`
    option when it is on."""
    if device.type != "cuda" or not requested():
        return {"PDL": False}
    if not _supported(device.index if device.index is not None else torch.cuda.current_device()):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    """First thing in a PDL-aware kernel: wait for the previous kernel to complete (its stores visible), then let
    the next kernel be scheduled. Nothing when PDL is False."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
