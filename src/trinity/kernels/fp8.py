"""Projections with FP8 (e4m3) weights and block scales: y = x @ (q * scale)^T, and the routed experts of a MoE
layer over such weights, each beside its pure-torch reference.

The weight is [out, in] float8_e4m3fn with fp32 scales over blocks of `block` = (rows, columns) (`quant.fp8`);
x is [..., in] in the activations' dtype, and so is y.

Dispatch, for CPU inference with fp32 or bf16 activations and the C kernels built (`native.py`):

- `linear_fp8_native`, up to `NATIVE_MAX_ROWS` rows (decode): the C kernel in `fp8_cpu.c`, which streams each
  weight byte once per 8 rows of x, widens it to fp32 in registers, sums each block's products in fp32 and
  multiplies the sum by the block's scale; y is rounded once to x's dtype. It reads half the bytes of the bf16
  kernel (`linear.linear_native`) and, from memory at batch 1, ran 1.7-1.9x faster than it on one core.
- `linear_fp8_dequantized`, more rows (prefill): slabs of weight rows dequantized by the C kernel into x's dtype
  (the reference's values, bit for bit), each multiplied by torch's GEMM. The crossover (`benchmarks/fp8_cpu.py
  --crossover`, 4096 x 1024, one core): fp32 at 32-48 rows (the C kernel's cost grows with each 8 rows, the fp32
  GEMM's slowly); bf16 at 8-12 rows, torch's bf16 GEMM being far faster than its fp32 one on this CPU (AMX).
  At 64 rows the C kernel (8-row passes) took 1.3x (fp32) and 4x (bf16) as long as this.
- `experts_fp8_native`, the routed experts of a decode batch in one C call (grouping, gate/up, SwiGLU, down,
  combine) where `quant.modules.Fp8Experts` would otherwise loop over the used experts in torch.

Everywhere else (another device or dtype, autograd recording, `TRINITY_KERNELS=reference`,
`TRINITY_CPU_NATIVE=0`, no compiler) the references: the whole weight dequantized into x's dtype, then `F.linear`.
Whole-model timings: `benchmarks/fp8_cpu.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import fp8 as fp8_format
from . import native, reference_forced, use_triton

# Up to this many rows of x the C kernel runs, by x's dtype; beyond, dequantize-and-GEMM was faster (above).
NATIVE_MAX_ROWS = {torch.float32: 32, torch.bfloat16: 8}
# Bytes of weight dequantized at a time for the GEMM path (whole row blocks): a slab stays in cache while the GEMM
# reads it, and a large weight never gets a whole dequantized copy (whose fresh pages alone cost more than the
# GEMM at prefill sizes).
SLAB_BYTES = 4 << 20


def linear_fp8_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                         block: tuple[int, int]) -> torch.Tensor:
    return F.linear(x, fp8_format.dequantize(weight, scale, block, x.dtype))


def _checked(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes and the scales as the C kernels read them (contiguous; scales in fp32), after checking the scale
    grid (the kernels index it without bounds). Runs on every call: no op where nothing needs changing."""
    n, k = weight.shape[-2:]
    expected = (-(-n // block[0]), -(-k // block[1]))  # fp8_format.grid
    if scale.shape[-2:] != expected or scale.shape[:-2] != weight.shape[:-2]:
        raise ValueError(f"scale {tuple(scale.shape)} does not match weight {tuple(weight.shape)} in blocks of "
                         f"{tuple(block)} (expected {expected} per matrix)")
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if scale.dtype != torch.float32 or not scale.is_contiguous():
        scale = scale.float().contiguous()
    return weight, scale


def _failed(name: str) -> None:
    raise MemoryError(f"{name}: the C kernel could not allocate its scratch")


def linear_fp8_native(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      block: tuple[int, int]) -> torch.Tensor:
    """The C kernel; x in fp32 or bf16 (widened exactly, sums in fp32, y rounded once)."""
    q, s = _checked(weight, scale, block)
    n_out, k = q.shape
    rows = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, k).contiguous()
    out = rows.new_empty(rows.shape[0], n_out)
    if native.library().trinity_linear_fp8(rows.data_ptr(), x.dtype == torch.bfloat16, q.data_ptr(), s.data_ptr(),
                                           int(block[0]), int(block[1]), out.data_ptr(), rows.shape[0], k,
                                           n_out, torch.get_num_threads()):
        _failed("trinity_linear_fp8")
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n_out)


def dequantize_native(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype,
                      row0: int = 0, row1: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [row0, row1) of the weight dequantized by the C kernel into fp32 or bf16 (into `out` if given, a
    contiguous [row1 - row0, in] tensor of that dtype): `quant.fp8.dequantize`'s values, bit for bit."""
    q, s = _checked(weight, scale, block)
    row1 = q.shape[0] if row1 is None else row1
    if not 0 <= row0 <= row1 <= q.shape[0]:
        raise ValueError(f"rows {row0}:{row1} of {q.shape[0]}")
    if out is None:
        out = torch.empty(row1 - row0, q.shape[1], dtype=dtype)
    elif out.shape != (row1 - row0, q.shape[1]) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out {tuple(out.shape)} {out.dtype}: expected a contiguous {dtype} "
                         f"[{row1 - row0}, {q.shape[1]}]")
    native.library().trinity_fp8_dequantize(q.data_ptr(), s.data_ptr(), int(block[0]), int(block[1]),
                                            out.data_ptr(), dtype == torch.bfloat16, row0, row1, q.shape[1],
                                            torch.get_num_threads())
    return out


def linear_fp8_dequantized(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                           block: tuple[int, int]) -> torch.Tensor:
    """Longer inputs: slabs of whole block rows dequantized into x's dtype (one buffer, reused) and each
    multiplied by torch's GEMM: the reference's values and operation, without its whole-weight copy."""
    rows = x.reshape(-1, x.shape[-1])
    n_out, k = weight.shape
    slab = max(1, SLAB_BYTES // (x.element_size() * k) // block[0]) * block[0]
    if slab >= n_out:
        return F.linear(x, dequantize_native(weight, scale, block, x.dtype))
    buffer = torch.empty(slab, k, dtype=x.dtype)
    out = rows.new_empty(rows.shape[0], n_out)
    for r0 in range(0, n_out, slab):
        r1 = min(r0 + slab, n_out)
        w = dequantize_native(weight, scale, block, x.dtype, r0, r1, buffer[: r1 - r0])
        out[:, r0:r1] = F.linear(rows, w)
    return out.view(*x.shape[:-1], n_out)


def native_wanted(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """CPU inference with fp32 or bf16 activations, the C kernels built, the references not forced. Autograd
    recording (an input that requires grad) takes the reference, whose backward is torch's."""
    return (x.dtype in NATIVE_MAX_ROWS and x.device.type == "cpu" and weight.device.type == "cpu"
            and weight.dtype == fp8_format.FP8 and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad))
            and not reference_forced() and native.library() is not None)


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               act_group: int | None = None) -> torch.Tensor:
    """`act_group` (dynamic FP8 activations, `fp8_triton.PER_TOKEN` or a group size): the GPU's w8a8 path; elsewhere
    the caller has already rounded x (`quant.modules._activations_in`) and passes None."""
    if use_triton(x):  # the block-scaled Triton GEMM (w8a16, or w8a8 with act_group), where it takes the shapes
        from .fp8_triton import linear_fp8_gpu
        y = linear_fp8_gpu(x, weight, scale, block, act_group=act_group)
        if y is not None:
            return y
    if act_group is not None:
        raise ValueError("act_group is for the GPU kernels; round x with its activation scheme first")
    if native_wanted(x, weight, scale):
        if x.numel() // x.shape[-1] <= NATIVE_MAX_ROWS[x.dtype]:
            return linear_fp8_native(x, weight, scale, block)
        return linear_fp8_dequantized(x, weight, scale, block)
    return linear_fp8_reference(x, weight, scale, block)


# ------------------------------------------------------------------------------------------------ routed experts
def experts_fp8_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                          gate_up_scale: torch.Tensor, down: torch.Tensor, down_scale: torch.Tensor,
                          gate_block: tuple[int, int], down_block: tuple[int, int], *,
                          linear=linear_fp8_reference, round_activations=None) -> torch.Tensor:
    """Routed experts with FP8 weights (`quant.modules.Fp8Experts`' layout: gate_up [E, 2I, H] with the gate
    half's block rows of scales before the up half's, down [E, H, I]): x [T, H], each token's top-k (weights
    [T, k], ids [T, k]) -> [T, H] in x's dtype. Each used expert's projections through `linear` (the reference;
    the module passes the dispatcher `linear_fp8`), SwiGLU in x's dtype, the outputs summed per token in fp32.
    `round_activations`: the checkpoint's FP8 activations, applied to each projection's input."""
    rounded = round_activations or (lambda t: t)
    inter, rows = down.shape[2], gate_up_scale.shape[1] // 2
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        token, choice = (ids == e).nonzero(as_tuple=True)
        xe = rounded(x[token])
        q, s = gate_up[e], gate_up_scale[e]
        h = rounded(F.silu(linear(xe, q[:inter], s[:rows], gate_block)) * linear(xe, q[inter:], s[rows:], gate_block))
        y = linear(h, down[e], down_scale[e], down_block)
        out.index_add_(0, token, y.float() * weights[token, choice, None])
    return out.to(x.dtype)


def _expert_tensors(gate_up, gate_up_scale, down, down_scale, gate_block, down_block) -> tuple:
    """The experts' codes and scales as the C kernels read them (codes as bytes, fp32 scales, contiguous), after
    checking the scale grids (the kernels index them without bounds)."""
    e, two_i, hidden = gate_up.shape
    inter = two_i // 2
    grid_g, grid_d = fp8_format.grid((inter, hidden), gate_block), fp8_format.grid((hidden, inter), down_block)
    if (tuple(gate_up_scale.shape) != (e, 2 * grid_g[0], grid_g[1])
            or tuple(down_scale.shape) != (e, *grid_d) or tuple(down.shape) != (e, hidden, inter)):
        raise ValueError(f"FP8 experts: scales {tuple(gate_up_scale.shape)}, {tuple(down_scale.shape)} do not match "
                         f"weights {tuple(gate_up.shape)}, {tuple(down.shape)} in blocks {gate_block}, {down_block}")
    return (gate_up.contiguous().view(torch.uint8), gate_up_scale.float().contiguous(),
            down.contiguous().view(torch.uint8), down_scale.float().contiguous())


def experts_fp8_native(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                       gate_up_scale: torch.Tensor, down: torch.Tensor, down_scale: torch.Tensor,
                       gate_block: tuple[int, int], down_block: tuple[int, int]) -> torch.Tensor:
    """The same in one C call (`trinity_moe_experts_fp8`): grouping, gate/up, SwiGLU, down and the weighted
    combine, each used expert's weights streamed once per pass of up to 8 of its tokens, fp32 inside (for bf16
    only the output is rounded, where the reference rounds after every op)."""
    e, two_i, hidden = gate_up.shape
    gq, gs, dq, ds = _expert_tensors(gate_up, gate_up_scale, down, down_scale, gate_block, down_block)
    xc = x.contiguous()
    w = weights.float().contiguous()
    idc = ids.to(torch.int64).contiguous()
    out = torch.empty_like(xc)
    status = native.library().trinity_moe_experts_fp8(
        xc.data_ptr(), x.dtype == torch.bfloat16, w.data_ptr(), idc.data_ptr(), gq.data_ptr(), gs.data_ptr(),
        int(gate_block[0]), int(gate_block[1]), dq.data_ptr(), ds.data_ptr(), int(down_block[0]), int(down_block[1]),
        out.data_ptr(), x.shape[0], hidden, two_i // 2, e, ids.shape[1], torch.get_num_threads())
    if status == -2:
        raise ValueError(f"FP8 experts: an expert id outside [0, {e})")
    if status:
        _failed("trinity_moe_experts_fp8")
    return out


def moe_layer_fp8_native(x: torch.Tensor, router_weight: torch.Tensor, expert_bias: torch.Tensor, top_k: int,
                         route_norm: bool, route_scale: float, gate_up: torch.Tensor, gate_up_scale: torch.Tensor,
                         down: torch.Tensor, down_scale: torch.Tensor, gate_block: tuple[int, int],
                         down_block: tuple[int, int], shared: bool, counts: torch.Tensor | None = None) -> torch.Tensor:
    """A whole MoE layer with FP8 experts in one C call (`trinity_moe_layer_fp8`), as `kernels.moe.
    moe_layer_native` for plain weights: `route_reference`'s routing (router in fp32), then `experts_fp8_native`'s
    computation over the chosen experts and, with `shared`, the shared expert stacked last in gate_up / down as
    every token's extra choice of weight 1. `counts` ([routed experts] int64) gains the routed tokens."""
    from .moe import NATIVE_MAX_EXPERTS

    e_total, two_i, hidden = gate_up.shape
    e_routed = e_total - int(shared)
    if not 0 < top_k <= e_routed <= NATIVE_MAX_EXPERTS:
        raise ValueError(f"top_k {top_k} of {e_routed} routed experts: not a valid native routing")
    if counts is not None and not (counts.is_contiguous() and counts.dtype == torch.long):
        raise ValueError("expert counts must be a contiguous int64 tensor")
    gq, gs, dq, ds = _expert_tensors(gate_up, gate_up_scale, down, down_scale, gate_block, down_block)
    xc = x.contiguous()
    router, bias = router_weight.float().contiguous(), expert_bias.float().contiguous()
    out = torch.empty_like(xc)
    if native.library().trinity_moe_layer_fp8(
            xc.data_ptr(), x.dtype == torch.bfloat16, router.data_ptr(), bias.data_ptr(), top_k, int(route_norm),
            route_scale, int(shared), counts.data_ptr() if counts is not None else None, gq.data_ptr(),
            gs.data_ptr(), int(gate_block[0]), int(gate_block[1]), dq.data_ptr(), ds.data_ptr(), int(down_block[0]),
            int(down_block[1]), out.data_ptr(), x.shape[0], hidden, two_i // 2, e_routed, torch.get_num_threads()):
        _failed("trinity_moe_layer_fp8")
    return out


def experts_native_wanted(x: torch.Tensor, assignments: int, gate_up: torch.Tensor) -> bool:
    """As `native_wanted`, for the routed experts, while their tokens average at most `NATIVE_MAX_ROWS` per
    expert (decode batches): beyond, a prefill's crowded experts go faster one at a time through
    `linear_fp8`, whose GEMM path takes their long groups."""
    return (native_wanted(x, gate_up, x) and x.dim() == 2
            and assignments <= gate_up.shape[0] * NATIVE_MAX_ROWS[x.dtype])
