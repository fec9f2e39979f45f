"""Bias-free projections y = x @ W.T, with faster CPU paths for inference.

`F.linear` on the CPU goes to MKL, which on the project's 2-core EPYC (Zen 4) handles decode shapes poorly.
Faster ways (their timings: benchmarks/README.md); the native one also takes bf16 weights (widened exactly, fp32
sums):

- `linear_native`, up to 8 rows (batch-1 and small decode batches): the C kernel in `linear_cpu.c`, which
  streams each weight row once against all the rows.
- `linear_onednn`, more rows: oneDNN's matmul with the weight reordered once into its blocked layout
  (`packed_weight`, kept beside the parameter and redone only when the weight changes); it beat MKL for the
  attention, MLP and head shapes up to prefill sizes. It costs a second copy of each weight it runs on: only the
  projections take it, not the routed experts.
- `linear_weight_first`, where neither is available: W @ x.T with the weight as the long operand, for a few rows.

`benchmarks/cpu_throughput.py` is the end-to-end measure.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from . import reference_forced

# Up to this many rows the weight-first orientation runs (decode batches and short chunks).
CPU_SMALL_ROWS = 64
# Up to this many rows the native kernel runs (one pass over the weight).
NATIVE_MAX_ROWS = 8
# The row count oneDNN is told to expect when it picks the packed layout: a decode batch.
PACK_ROWS_HINT = 32


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def linear_weight_first(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same product computed as (W @ x.T).T, returned contiguous (callers view it by heads)."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if n == 1:  # a single row takes the BLAS's GEMV path: slower here than the same row twice
        rows = rows.expand(2, -1).contiguous()
    return torch.mm(weight, rows.t()).t()[:n].contiguous().view(*x.shape[:-1], weight.shape[0])


@functools.cache
def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


# id(weight) -> (weakref to the weight, its version and address when packed, the packed copy)
_packed: dict[int, tuple[weakref.ref, int, int, torch.Tensor]] = {}


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's layout, made on first use and again after any change to the weight: an in-place
    update bumps its version counter (shared with the tensor it views), a new `.data` moves its address. The
    copy is dropped with the weight."""
    key = id(weight)
    hit = _packed.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version and hit[2] == weight.data_ptr():
        return hit[3]

    def forget(ref, key=key):
        if _packed.get(key, (None,))[0] is ref:
            _packed.pop(key)

    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)
    _packed[key] = (weakref.ref(weight, forget), weight._version, weight.data_ptr(), packed)
    return packed


def linear_onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(rows, packed_weight(weight), None, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_native(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    from .native import library

    rows = x.reshape(-1, x.shape[-1]).float().contiguous()
    weight = weight.contiguous()
    out = rows.new_empty(rows.shape[0], weight.shape[0])
    library().trinity_linear(rows.data_ptr(), weight.data_ptr(), int(weight.dtype == torch.bfloat16),
                             out.data_ptr(), rows.shape[0], rows.shape[1], weight.shape[0], torch.get_num_threads())
    return out.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def _cpu_inference(x: torch.Tensor, weight: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in dtypes and x.numel() > 0
            and not torch.is_grad_enabled() and not reference_forced())


def native_wanted(x: torch.Tensor, weight: torch.Tensor) -> bool:
    from .native import library

    return (_cpu_inference(x, weight, (torch.float32, torch.bfloat16))
            and x.numel() // x.shape[-1] <= NATIVE_MAX_ROWS and library() is not None)


def onednn_wanted(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return _cpu_inference(x, weight, (torch.float32,)) and onednn_available()


def weight_first_wanted(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return _cpu_inference(x, weight, (torch.float32,)) and x.numel() // x.shape[-1] <= CPU_SMALL_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if native_wanted(x, weight):
        return linear_native(x, weight)
    if onednn_wanted(x, weight):
        return linear_onednn(x, weight)
    if weight_first_wanted(x, weight):
        return linear_weight_first(x, weight)
    return linear_reference(x, weight)
