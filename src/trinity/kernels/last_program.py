"""The last-program epilogue: work that needs the output of every program of a launch, done by whichever program
of a group finishes last, instead of by a second launch.

A split reduction (the decode attention's key splits, a GEMV's column tiles followed by a row norm) normally takes
two kernels: one writes partial results, the next combines them. Under CUDA graphs at batch 1 the second launch
costs more than its work. Here each program of a group writes its partial results, then counts itself in on the
group's counter; the one that arrives last sees every other program's results and does the combine.

Why it is safe on a GPU (the pattern of split-K "serial reduction" in CUTLASS and of stream-K kernels):
- `tl.debug_barrier()` (bar.sync) first, so every thread of the program has issued its stores before the count;
- the count is one atomic add with acquire-release semantics at GPU scope (Triton makes one thread run a scalar
  atomic and broadcasts its result): the release publishes this program's stores, and the acquire in the last
  arriver makes every earlier program's published stores visible to the loads that follow it;
- the last arriver puts the counter back to 0, so the next launch (or graph replay) starts from zero. Kernels on
  one stream never overlap in their memory accesses (with programmatic dependent launch, `kernels/pdl.py`, a kernel
  may start early but touches memory only once the one before it has completed), so every launch can share one
  buffer of counters per device.
Under Triton's interpreter the programs run one after another, so the last arriver is the group's last program.

`TRINITY_LAST_PROGRAM=0` (or `enable(False)`) turns every such epilogue off: the kernels then run their
separate second launches, which `benchmarks/decode_gpu.py` times side by side.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import switches

# Counters per device: enough for one per (sequence, kv head) of a 256-sequence batch with 64 kv heads.
NUM_COUNTERS = 1 << 14

_counters: dict[tuple[str, int | None], torch.Tensor] = {}
_enabled: bool | None = None


def enable(flag: bool | None) -> None:
    """True / False: last-program epilogues on or off; None: follow TRINITY_LAST_PROGRAM (on unless a false
    spelling: 0, false, off, no). Read when a kernel launches: a CUDA graph keeps what was chosen at its capture."""
    global _enabled
    _enabled = flag


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return switches.get().last_program


def arrival_counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """The device's zeroed int32 counters, or None where the epilogue cannot be used: turned off, more groups than
    counters, or the buffer does not exist yet while a CUDA graph is being captured (an allocation there would
    belong to the graph's pool; the runner's warm-up runs outside the capture make it first)."""
    if needed > NUM_COUNTERS or not enabled():
        return None
    key = (device.type, device.index)
    counters = _counters.get(key)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _counters[key] = torch.zeros(NUM_COUNTERS, dtype=torch.int32, device=device)
    return counters


@triton.jit
def arrive(counter_ptr, group_size):
    """Count this program in on its group's counter, after its stores; True in exactly one program of the group,
    the last to arrive, which may then read every other program's stores (and has reset the counter)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == group_size - 1
    if last:
        tl.store(counter_ptr, 0)
    return last
