"""Projections and routed experts with 4-bit weights (`quant.int4.Int4Weight`, the canonical layout): y = x @ W^T
with W dequantized from its codes, group scales, zero points and g_idx.

`linear_int4` is the one dispatch point, as `kernels.fp8.linear_fp8` is for FP8. On the CPU (fp32 or bf16
activations, the C kernels built, `native_wanted`):

- `linear_int4_native`, up to `NATIVE_MAX_ROWS` rows (decode): the C kernel in `int4_cpu.c`, which streams each
  code byte once per 8 rows of x, turns the codes into the reference's fp32 weights in registers (a 16-entry table
  per group, one AVX-512 permute per 16 weights) and sums in fp32; y is rounded once to x's dtype.
- `linear_int4_dequantized`, more rows (prefill): slabs of weight rows dequantized by the C kernel into x's dtype
  (the reference's values, bit for bit), each multiplied by torch's GEMM.
- `experts_int4_native` / `moe_layer_int4_native`: the routed experts of a decode batch (and the whole MoE layer,
  routing and the stacked shared expert included) in one C call.

Everywhere else (another device or dtype, autograd recording, `TRINITY_KERNELS=reference`, `TRINITY_CPU_NATIVE=0`,
no compiler) the references: the whole weight dequantized into x's dtype, then `F.linear`. Crossover and
whole-model timings: `benchmarks/w4a16_cpu.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import int4 as int4_format
from ..quant.int4 import Int4Weight
from . import in_graph_mode, native, reference_forced, use_triton


def linear_int4_reference(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype."""
    return F.linear(x, int4_format.dequantize(w, x.dtype))


def linear_int4(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    if use_triton(x):  # the W4A16 Triton GEMM (`int4_triton`), where it takes the shapes
        from .int4_triton import linear_int4_gpu
        y = linear_int4_gpu(x, w)
        if y is not None:
            return y
    if native_wanted(x, w):  # CPU inference: the C kernel (few rows) or dequantized slabs + GEMM
        return linear_int4_cpu(x, w)
    return linear_int4_reference(x, w)


def experts_int4_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: Int4Weight,
                           down: Int4Weight, *, linear=linear_int4) -> torch.Tensor:
    """Routed experts with 4-bit weights (gate_up [E, 2I, H] and down [E, H, I] in the canonical layout): x [T, H],
    each token's top-k (weights [T, k] fp32, ids [T, k]) -> [T, H] in x's dtype. Each used expert's projections
    through `linear`, SwiGLU in x's dtype, the outputs summed per token in fp32 (as `kernels.moe`'s reference).

    Which experts are used is read on the host; inside a CUDA-graph capture, where it cannot be, every expert runs
    over every token, weighted 0 where not chosen (the same sums: the extra terms are zeros)."""
    inter = down.in_features
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    if in_graph_mode():
        dense = torch.zeros(x.shape[0], gate_up.codes.shape[0], dtype=torch.float32, device=x.device)
        dense.scatter_add_(1, ids.long(), weights.float())
        for e in range(gate_up.codes.shape[0]):
            h = linear(x, gate_up.expert(e))
            y = linear(F.silu(h[:, :inter]) * h[:, inter:], down.expert(e))
            out += y.float() * dense[:, e, None]
        return out.to(x.dtype)
    for e in ids.unique().tolist():
        token, choice = (ids == e).nonzero(as_tuple=True)
        h = linear(x[token], gate_up.expert(e))
        y = linear(F.silu(h[:, :inter]) * h[:, inter:], down.expert(e))
        out.index_add_(0, token, y.float() * weights[token, choice, None])
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------ CPU kernels
# Up to this many rows of x the C kernel runs, by x's dtype; beyond, dequantize-and-GEMM was faster
# (`benchmarks/w4a16_cpu.py --crossover --clock process --threads 1`, 4096 x 1024, group 128, a Sapphire Rapids
# core): fp32 between 32 and 48 rows (3.3 vs 3.9 ms at 32, 5.1 vs 4.8 at 48), bf16 between 12 and 16 (1.36 vs
# 1.56 ms at 12, 1.71 vs 1.56 at 16: torch's bf16 GEMM runs on AMX). At 1 row the kernel took 0.29 ms, the GEMM
# path 1.4-1.7 ms.
NATIVE_MAX_ROWS = {torch.float32: 32, torch.bfloat16: 12}
# Bytes of weight dequantized at a time for the GEMM path (whole rows): a slab stays in cache while the GEMM reads
# it, and a large weight never gets a whole dequantized copy.
SLAB_BYTES = 4 << 20


def _failed(name: str) -> None:
    raise MemoryError(f"{name}: the C kernel could not allocate its scratch")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _checked(w: Int4Weight, lead: tuple[int, ...] = ()) -> tuple:
    """(codes, scale, zero_point, g_idx, rows per g_idx block) as the C kernels read them (contiguous; uint8 codes
    and zeros, fp32 scales, int32 g_idx), after checking the shapes and the g_idx values (the kernels index
    without bounds). `lead`: the stack's leading dimensions ((E,) for experts)."""
    out, inp = w.codes.shape[-2], w.in_features
    groups = int4_format.num_groups(inp, w.group)
    if (tuple(w.codes.shape) != (*lead, out, (inp + 1) // 2) or tuple(w.scale.shape) != (*lead, out, groups)
            or (w.zero_point is not None and w.zero_point.shape != w.scale.shape)):
        raise ValueError(f"int4 weight: codes {tuple(w.codes.shape)}, scale {tuple(w.scale.shape)} do not match "
                         f"{out} x {inp} in groups of {w.group} (stack {lead})")
    codes = w.codes.contiguous()
    scale = w.scale if w.scale.dtype == torch.float32 and w.scale.is_contiguous() else w.scale.float().contiguous()
    zero = None if w.zero_point is None else w.zero_point.to(torch.uint8).contiguous()
    g_idx, block_rows = None, out
    if w.g_idx is not None:
        blocks = w.g_idx.shape[-2]
        if w.g_idx.shape[:-2] != lead or w.g_idx.shape[-1] != inp or out % blocks:
            raise ValueError(f"int4 g_idx {tuple(w.g_idx.shape)} does not match {out} x {inp} (stack {lead})")
        g_idx = w.g_idx.to(torch.int32).contiguous()
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise ValueError(f"int4 g_idx: a group outside [0, {groups})")
        block_rows = out // blocks
    return codes, scale, zero, g_idx, block_rows


def native_wanted(x: torch.Tensor, w: Int4Weight) -> bool:
    """CPU inference with fp32 or bf16 activations, the C kernels built, the references not forced. Autograd
    recording (an input that requires grad) takes the reference, whose backward is torch's."""
    return (x.dtype in NATIVE_MAX_ROWS and x.device.type == "cpu" and w.codes.device.type == "cpu"
            and w.codes.dtype == torch.uint8 and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or w.scale.requires_grad))
            and not reference_forced() and native.library() is not None)


def linear_int4_cpu(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    if x.numel() // x.shape[-1] <= NATIVE_MAX_ROWS[x.dtype]:
        return linear_int4_native(x, w)
    return linear_int4_dequantized(x, w)


def linear_int4_native(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """The C kernel; x in fp32 or bf16 (widened exactly, sums in fp32, y rounded once)."""
    codes, scale, zero, g_idx, block_rows = _checked(w)
    n_out, k = codes.shape[0], w.in_features
    rows = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, k).contiguous()
    out = rows.new_empty(rows.shape[0], n_out)
    if native.library().trinity_linear_int4(rows.data_ptr(), x.dtype == torch.bfloat16, codes.data_ptr(),
                                            scale.data_ptr(), _ptr(zero), _ptr(g_idx), block_rows, w.group,
                                            out.data_ptr(), rows.shape[0], k, n_out, torch.get_num_threads()):
        _failed("trinity_linear_int4")
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n_out)


def dequantize_native(w: Int4Weight, dtype: torch.dtype, row0: int = 0, row1: int | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [row0, row1) of the weight dequantized by the C kernel into fp32 or bf16 (into `out` if given, a
    contiguous [row1 - row0, in] tensor of that dtype): `quant.int4.dequantize`'s values, bit for bit."""
    codes, scale, zero, g_idx, block_rows = _checked(w)
    n_out, k = codes.shape[0], w.in_features
    row1 = n_out if row1 is None else row1
    if not 0 <= row0 <= row1 <= n_out:
        raise ValueError(f"rows {row0}:{row1} of {n_out}")
    if out is None:
        out = torch.empty(row1 - row0, k, dtype=dtype)
    elif out.shape != (row1 - row0, k) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out {tuple(out.shape)} {out.dtype}: expected a contiguous {dtype} [{row1 - row0}, {k}]")
    native.library().trinity_int4_dequantize(codes.data_ptr(), scale.data_ptr(), _ptr(zero), _ptr(g_idx),
                                             block_rows, w.group, out.data_ptr(), dtype == torch.bfloat16, row0,
                                             row1, k, torch.get_num_threads())
    return out


def linear_int4_dequantized(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """Longer inputs: slabs of weight rows dequantized into x's dtype (one buffer, reused) and each multiplied by
    torch's GEMM: the reference's values and operation, without its whole-weight copy."""
    rows = x.reshape(-1, x.shape[-1])
    n_out, k = w.codes.shape[0], w.in_features
    slab = max(1, SLAB_BYTES // (x.element_size() * k))
    if slab >= n_out:
        return F.linear(x, dequantize_native(w, x.dtype))
    buffer = torch.empty(slab, k, dtype=x.dtype)
    out = rows.new_empty(rows.shape[0], n_out)
    for r0 in range(0, n_out, slab):
        r1 = min(r0 + slab, n_out)
        out[:, r0:r1] = F.linear(rows, dequantize_native(w, x.dtype, r0, r1, buffer[: r1 - r0]))
    return out.view(*x.shape[:-1], n_out)


def _expert_args(gate_up: Int4Weight, down: Int4Weight) -> tuple:
    """The C kernels' arguments for a stack of experts (gate_up [E, 2I, H], down [E, H, I]), checked: g_idx must
    be [E, 2, H] (gate's and up's) and [E, 1, I]."""
    e, two_i = gate_up.codes.shape[:2]
    hidden, inter = gate_up.in_features, down.in_features
    if two_i != 2 * inter or down.codes.shape[:2] != (e, hidden):
        raise ValueError(f"int4 experts: gate_up {tuple(gate_up.codes.shape)} and down {tuple(down.codes.shape)} "
                         f"do not fit hidden {hidden}, intermediate {inter}")
    gq, gs, gz, gg, g_rows = _checked(gate_up, (e,))
    dq, ds, dz, dg, d_rows = _checked(down, (e,))
    if (gg is not None and g_rows != inter) or (dg is not None and d_rows != hidden):
        raise ValueError("int4 experts: g_idx must hold one column order for the gate and one for the up "
                         "projection ([E, 2, H]), one for down ([E, 1, I])")
    keep = (gq, gs, gz, gg, dq, ds, dz, dg)  # the caller holds these while the kernel runs
    return keep, (gq.data_ptr(), gs.data_ptr(), _ptr(gz), _ptr(gg), gate_up.group, dq.data_ptr(), ds.data_ptr(),
                  _ptr(dz), _ptr(dg), down.group)


def experts_int4_native(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: Int4Weight,
                        down: Int4Weight) -> torch.Tensor:
    """`experts_int4_reference` in one C call (`trinity_moe_experts_int4`): grouping, gate/up, SwiGLU, down and
    the weighted combine, each used expert's codes streamed once per pass of up to 8 of its tokens, fp32 inside
    (for bf16 only the output is rounded, where the reference rounds after every op)."""
    e = gate_up.codes.shape[0]
    keep, args = _expert_args(gate_up, down)
    xc = x.contiguous()
    w = weights.float().contiguous()
    idc = ids.to(torch.int64).contiguous()
    out = torch.empty_like(xc)
    status = native.library().trinity_moe_experts_int4(
        xc.data_ptr(), x.dtype == torch.bfloat16, w.data_ptr(), idc.data_ptr(), *args, out.data_ptr(), x.shape[0],
        gate_up.in_features, down.in_features, e, ids.shape[1], torch.get_num_threads())
    del keep
    if status == -2:
        raise ValueError(f"int4 experts: an expert id outside [0, {e})")
    if status:
        _failed("trinity_moe_experts_int4")
    return out


def moe_layer_int4_native(x: torch.Tensor, router_weight: torch.Tensor, expert_bias: torch.Tensor, top_k: int,
                          route_norm: bool, route_scale: float, gate_up: Int4Weight, down: Int4Weight, shared: bool,
                          counts: torch.Tensor | None = None) -> torch.Tensor:
    """A whole MoE layer with 4-bit experts in one C call (`trinity_moe_layer_int4`), as
    `kernels.fp8.moe_layer_fp8_native`: `route_reference`'s routing (router in fp32), then `experts_int4_native`'s
    computation over the chosen experts and, with `shared`, the shared expert stacked last in gate_up / down as
    every token's extra choice of weight 1. `counts` ([routed experts] int64) gains the routed tokens."""
    from .moe import NATIVE_MAX_EXPERTS

    e_routed = gate_up.codes.shape[0] - int(shared)
    if not 0 < top_k <= e_routed <= NATIVE_MAX_EXPERTS:
        raise ValueError(f"top_k {top_k} of {e_routed} routed experts: not a valid native routing")
    if counts is not None and not (counts.is_contiguous() and counts.dtype == torch.long):
        raise ValueError("expert counts must be a contiguous int64 tensor")
    keep, args = _expert_args(gate_up, down)
    xc = x.contiguous()
    router, bias = router_weight.float().contiguous(), expert_bias.float().contiguous()
    out = torch.empty_like(xc)
    status = native.library().trinity_moe_layer_int4(
        xc.data_ptr(), x.dtype == torch.bfloat16, router.data_ptr(), bias.data_ptr(), top_k, int(route_norm),
        route_scale, int(shared), _ptr(counts), *args, out.data_ptr(), x.shape[0], gate_up.in_features,
        down.in_features, e_routed, torch.get_num_threads())
    del keep
    if status:
        _failed("trinity_moe_layer_int4")
    return out


def experts_native_wanted(x: torch.Tensor, assignments: int, gate_up: Int4Weight) -> bool:
    """As `native_wanted`, for the routed experts, while their tokens average at most `NATIVE_MAX_ROWS` per
    expert (decode batches): beyond, a prefill's crowded experts go faster one at a time through `linear_int4`,
    whose GEMM path takes their long groups."""
    return (native_wanted(x, gate_up) and x.dim() == 2
            and assignments <= gate_up.codes.shape[0] * NATIVE_MAX_ROWS[x.dtype])
