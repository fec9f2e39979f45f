"""Routed-expert compute: tokens grouped by expert, SwiGLU, weighted combine.

`experts_reference` loops over the experts that received tokens; `experts_grouped` issues one
`F.grouped_mm` per projection over all groups (torch >= 2.10 with a kernel for the device and dtype).
Both take gate_up: [E, 2I, H] (gate rows first) and down: [E, H, I] and return [T, H] in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference_forced, use_triton
from .norm import silu_mul


def _group_by_expert(ids: torch.Tensor, num_experts: int):
    """ids: [T, k] -> (order of the T*k assignments sorted by expert, token of each, tokens per expert)."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # a scatter-add, not bincount: bincount sizes its output from the largest id, a device-to-host sync on a GPU
    # (once per MoE layer of a prefill)
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, order // ids.shape[1], counts


def _combine(ys: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, token_of: torch.Tensor,
             num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs, accumulated in fp32.

    A gather back into (token, choice) order and a sum over the k choices, not an index_add_ scatter: on a GPU
    the scatter's atomics are slow at prefill sizes, and the gather is deterministic everywhere."""
    k = weights.shape[-1]
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)  # where each assignment went in ys
    if use_triton(ys, weights):  # one launch reading ys once (a prefill's [T*k, H] is large)
        from .moe_triton import gather_combine
        return gather_combine(ys, weights, position, num_tokens, dtype)
    per_choice = ys.index_select(0, position).float().view(num_tokens, k, -1)
    return (per_choice * weights.reshape(num_tokens, k, 1).float()).sum(dim=1).to(dtype)


def experts_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                      down: torch.Tensor) -> torch.Tensor:
    order, token_of, counts = _group_by_expert(ids, gate_up.shape[0])
    # index_select, not x[token_of]: its backward is index_add_, which sums a token's k gradients in a fixed
    # order; advanced indexing backpropagates through a multi-threaded index_put_ that does not.
    xs = x.index_select(0, token_of)
    # One split into per-expert groups and one cat back, in expert order (= the sorted order). Not slices read
    # from and written into one buffer: under autograd each slice's backward materialises a zero gradient the
    # size of the whole buffer.
    outs = []
    for e, group in enumerate(xs.split(counts.tolist())):  # one host sync per layer
        if group.shape[0]:
            g, u = F.linear(group, gate_up[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(g) * u, down[e]))
    ys = torch.cat(outs) if outs else xs[:0]
    return _combine(ys, weights, order, token_of, x.shape[0], x.dtype)


def experts_grouped(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    order, token_of, counts = _group_by_expert(ids, gate_up.shape[0])
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    g, u = F.grouped_mm(x.index_select(0, token_of), gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    ys = F.grouped_mm(silu_mul(g, u), down.transpose(1, 2), offs=offs)
    return _combine(ys, weights, order, token_of, x.shape[0], x.dtype)


def experts_weight_first(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                         down: torch.Tensor) -> torch.Tensor:
    """Per expert, (W @ xs.T): the CPU orientation `kernels.linear` explains, faster than F.grouped_mm where a
    decode batch gives each expert a few tokens."""
    order, token_of, counts = _group_by_expert(ids, gate_up.shape[0])
    xs = x.index_select(0, token_of)
    inter = down.shape[2]
    outs = []
    for e, group in enumerate(xs.split(counts.tolist())):
        n = group.shape[0]
        if not n:
            continue
        if n == 1:  # one row takes the BLAS's GEMV path, slower here than two rows
            group = group.expand(2, -1).contiguous()
        h = torch.mm(gate_up[e], group.t())  # [2I, n]: gate rows, then up rows
        # the second operand as a transposed view of contiguous rows: a plain [I, n] matrix is much slower here
        act = (F.silu(h[:inter]) * h[inter:]).t().contiguous()
        outs.append(torch.mm(down[e], act.t()).t()[:n])
    ys = torch.cat(outs) if outs else xs[:0]
    return _combine(ys, weights, order, token_of, x.shape[0], x.dtype)


def experts_native(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """The C kernel (`moe_cpu.c`): gate/up, SwiGLU, down and the weighted combine in one call, each expert's
    weights streamed once per pass of up to 8 tokens. CPU, fp32 or bf16 weights (`native_wanted`); x's dtype in
    and out, fp32 inside (for bf16 only the output is rounded, where the reference rounds after every op)."""
    from .native import library

    t, hidden = x.shape
    e, inter, k = gate_up.shape[0], down.shape[2], ids.shape[1]
    order, token_of, counts = _group_by_expert(ids, e)
    offsets = torch.zeros(e + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=offsets[1:])
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())  # where each (token, choice) went in the grouped order
    xf = x.float().contiguous()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    weights = weights.float().contiguous()
    act = xf.new_empty(order.numel(), inter)
    ys = xf.new_empty(order.numel(), hidden)
    out = xf.new_empty(t, hidden)
    library().trinity_moe_experts(
        xf.data_ptr(), token_of.data_ptr(), offsets.data_ptr(), gate_up.data_ptr(), down.data_ptr(),
        int(gate_up.dtype == torch.bfloat16), weights.data_ptr(), position.data_ptr(), act.data_ptr(),
        ys.data_ptr(), out.data_ptr(), t, hidden, inter, e, k, torch.get_num_threads())
    return out.to(x.dtype)


def native_wanted(x: torch.Tensor, gate_up: torch.Tensor) -> bool:
    from .native import library

    return (x.device.type == "cpu" and x.dtype == gate_up.dtype and x.dtype in NATIVE_DTYPES
            and x.shape[0] > 0 and library() is not None)


# Weight dtypes the C kernels read (activations are computed in fp32 either way).
NATIVE_DTYPES = (torch.float32, torch.bfloat16)
# Routed experts the C routing handles (its per-token score buffers).
NATIVE_MAX_EXPERTS = 1024


def moe_layer_native(x: torch.Tensor, router_weight: torch.Tensor, expert_bias: torch.Tensor, top_k: int,
                     route_norm: bool, route_scale: float, gate_up: torch.Tensor, down: torch.Tensor, shared: bool,
                     counts: torch.Tensor | None = None, count_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A whole MoE layer in one C call (`trinity_moe_layer` in moe_cpu.c): `route_reference`'s routing, the
    grouping by expert, `experts_native`, and, with `shared`, the stacked shared expert (the last of gate_up /
    down) as every token's extra choice. `counts` ([routed experts] int64) gets the routed tokens added
    (`count_mask`, which only CUDA-graph batches carry, is not taken). On a decode step this replaces ~25 small
    torch ops per layer (routing, sorting, index maps)."""
    from .native import library

    t, hidden = x.shape
    e_total, inter = gate_up.shape[0], down.shape[2]
    kk = top_k + int(shared)
    xf = x.float().contiguous()
    router_weight, bias = router_weight.float().contiguous(), expert_bias.float().contiguous()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    long = dict(dtype=torch.long)
    ids, choice_w = torch.empty(t, kk, **long), torch.empty(t, kk)
    token_of, position = torch.empty(t * kk, **long), torch.empty(t * kk, **long)
    offsets = torch.empty(e_total + 1, **long)
    act, ys, out = torch.empty(t * kk, inter), torch.empty(t * kk, hidden), torch.empty(t, hidden)
    if counts is not None and not (counts.is_contiguous() and counts.dtype == torch.long):
        raise ValueError("expert counts must be a contiguous int64 tensor")
    if count_mask is not None:
        raise ValueError("the native MoE layer counts every token: no count mask")
    if not 0 < top_k <= e_total - int(shared) <= NATIVE_MAX_EXPERTS:
        raise ValueError(f"top_k {top_k} of {e_total - int(shared)} routed experts: not a valid native routing")
    library().trinity_moe_layer(
        xf.data_ptr(), router_weight.data_ptr(), bias.data_ptr(), top_k, int(route_norm), route_scale, int(shared),
        counts.data_ptr() if counts is not None else None, gate_up.data_ptr(), down.data_ptr(),
        int(gate_up.dtype == torch.bfloat16), ids.data_ptr(), choice_w.data_ptr(), token_of.data_ptr(),
        offsets.data_ptr(), position.data_ptr(), act.data_ptr(), ys.data_ptr(), out.data_ptr(), t, hidden, inter,
        e_total - int(shared), torch.get_num_threads())
    return out.to(x.dtype)


def moe_layer_native_wanted(x: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """CPU inference where the C kernels are built, unless the Triton kernels are forced (interpreter tests)."""
    from . import use_triton

    return (native_wanted(x, gate_up) and not torch.is_grad_enabled() and not reference_forced()
            and not use_triton(x) and gate_up.shape[0] <= NATIVE_MAX_EXPERTS + 1)


# CPU fp32 batches up to this many tokens take `experts_weight_first` (faster than F.grouped_mm up to here, slower
# at prefill sizes).
CPU_WEIGHT_FIRST_MAX_TOKENS = 128


def weight_first_wanted(x: torch.Tensor, gate_up: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == gate_up.dtype == torch.float32
            and x.shape[0] <= CPU_WEIGHT_FIRST_MAX_TOKENS)


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """F.grouped_mm exists and has a kernel here: the CPU (torch >= 2.10), or CUDA SM80+ in bf16."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 8
    return False


# On CUDA the fused Triton kernel serves batches up to this many tokens (decode); larger ones go to
# F.grouped_mm where it has a kernel. A first guess: to be measured on a GPU.
FUSED_MOE_MAX_TOKENS = 64


def fused_moe_wanted(x: torch.Tensor) -> bool:
    """The Triton fused MoE: always under TRINITY_KERNELS=triton; on CUDA for decode-sized batches, under
    CUDA graph capture (F.grouped_mm cannot be captured) and where grouped_mm has no kernel."""
    from . import in_graph_mode, kernels_mode, use_triton

    if not use_triton(x):
        return False
    if kernels_mode() == "triton":
        return True
    return (x.shape[0] <= FUSED_MOE_MAX_TOKENS or in_graph_mode()
            or not grouped_mm_available(x.device, x.dtype))


def routed_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """The fastest available implementation; the reference when forced or when autograd needs it."""
    if reference_forced() or torch.is_grad_enabled():
        return experts_reference(x, weights, ids, gate_up, down)
    if fused_moe_wanted(x):
        from .moe_triton import fused_moe
        return fused_moe(x, weights, ids, gate_up, down)
    if native_wanted(x, gate_up):
        return experts_native(x, weights, ids, gate_up, down)
    if weight_first_wanted(x, gate_up):
        return experts_weight_first(x, weights, ids, gate_up, down)
    if x.shape[0] > 1 and grouped_mm_available(x.device, x.dtype):
        return experts_grouped(x, weights, ids, gate_up, down)
    return experts_reference(x, weights, ids, gate_up, down)


def moe_layer_triton(x: torch.Tensor, router_weight: torch.Tensor, expert_bias: torch.Tensor, top_k: int,
                     route_norm: bool, route_scale: float, gate_up: torch.Tensor, down: torch.Tensor, shared: bool,
                     counts: torch.Tensor | None = None, count_mask: torch.Tensor | None = None,
                     x_fp32: torch.Tensor | None = None, norm: tuple | None = None):
    """A whole MoE layer on the Triton path: `moe_triton.fused_moe_layer` given the router's fp32 input and weight
    (it runs the router GEMM in its routing launch for the smallest batches, split over many programs, not one
    program per token (far too slow); else one library GEMM), then routing, alignment and the expert GEMMs (with
    `shared`, the stacked shared expert, the last of gate_up / down, as every token's extra choice). `counts`
    gains the routed tokens, weighted by `count_mask` ([T] 0/1) when given. `x_fp32`: x already widened (by the
    norm that made it), which saves the cast. With `norm` = (residual, post_weight, next_weight, eps): the
    decoder layer's norm step on the summed per-choice outputs too -> (normed, new residual) (at decode in the
    down GEMM's launch)."""
    from .moe_triton import fused_moe_layer

    router = (x_fp32 if x_fp32 is not None else x.float(), router_weight.float())
    return fused_moe_layer(x, None, expert_bias, top_k, route_norm, route_scale, gate_up, down, int(shared),
                           counts, count_mask, router=router, norm=norm)


def moe_layer_triton_wanted(x: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() and not reference_forced() and fused_moe_wanted(x)


def router_logits(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """[T, E] in fp32: routing decisions are sensitive, so they never see bf16 rounding (not even under autocast)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), gate_weight.float())


def select_experts(logits: torch.Tensor, expert_bias: torch.Tensor, top_k: int, route_norm: bool,
                   route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores are sigmoid(logits). The bias shifts which experts are chosen (aux-loss-free balancing) but never
    the weights: those are the chosen experts' unbiased scores, normalised to sum 1 when `route_norm`, then
    multiplied by `route_scale`."""
    scores = torch.sigmoid(logits)
    _, ids = torch.topk(scores + expert_bias.float(), k=top_k, dim=-1)
    weights = scores.gather(-1, ids)
    if route_norm:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * route_scale, ids


def route_reference(x: torch.Tensor, gate_weight: torch.Tensor, expert_bias: torch.Tensor, top_k: int,
                    route_norm: bool, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing every path reproduces: x [T, H] -> (weights [T, k] fp32, expert ids [T, k])."""
    return select_experts(router_logits(x, gate_weight), expert_bias, top_k, route_norm, route_scale)


def route(x: torch.Tensor, gate_weight: torch.Tensor, expert_bias: torch.Tensor, top_k: int,
          route_norm: bool, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Router dispatch -> (weights [T, k] fp32, ids [T, k] int64).

    Where Triton runs: the fp32 router logits from one library GEMM, then `moe_triton.fused_route` on the logits
    (sigmoid, bias-selected top-k, normalise, scale in one launch): a GEMV inside the routing kernel, one program
    per token, is far slower than the library GEMM over the whole [E, H] weight. Elsewhere `route_reference`.
    """
    if not reference_forced() and not torch.is_grad_enabled() and use_triton(x, gate_weight):
        from .moe_triton import fused_route
        return fused_route(router_logits(x, gate_weight), expert_bias, top_k, route_norm, route_scale)
    return route_reference(x, gate_weight, expert_bias, top_k, route_norm, route_scale)
