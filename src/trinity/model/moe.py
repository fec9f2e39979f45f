"""Trinity's MoE block: fp32 sigmoid router whose bias only selects, stacked routed experts, a shared expert."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TrinityConfig
from ..kernels.moe import moe_layer_native, moe_layer_native_wanted, moe_layer_triton, moe_layer_triton_wanted
from ..kernels.moe import route as kernel_route
from ..kernels.moe import routed_experts, router_logits, select_experts
from .layers import FusedLinears, Linear, SwiGLU


class RoutedExperts(nn.Module):
    """All routed experts' weights stacked: one tensor per projection (the HF transformers 5 layout)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return routed_experts(x, weights, ids, self.gate_up_proj, self.down_proj)


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.gate = Linear(hidden_size, num_experts, bias=False)


class MoEBlock(nn.Module):
    def __init__(self, config: TrinityConfig, layer_idx: int | None = None):
        """`layer_idx`: the decoder layer it sits in (default: the first MoE layer)."""
        super().__init__()
        # The row of a step's expert-load table (`AttentionMetadata.expert_counts`) this block counts into: the
        # MoE layers before it.
        self.moe_index = 0 if layer_idx is None else sum(config.is_moe_layer(i) for i in range(layer_idx))
        self.top_k = config.num_experts_per_tok
        self.route_norm = config.route_norm
        self.route_scale = config.route_scale
        self.router = Router(config.hidden_size, config.num_experts)
        # Not trained by gradients: the balancing rule moves it after each optimizer step.
        self.expert_bias = nn.Parameter(torch.zeros(config.num_experts), requires_grad=False)
        self.experts = RoutedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        shared = config.moe_intermediate_size * config.num_shared_experts
        self.shared_experts = SwiGLU(config.hidden_size, shared) if shared else None
        # Tokens sent to each expert since the last reset ([E] int64), counted when the step's metadata carries no
        # expert-load table: training's balancing input (`track_expert_load`).
        self.expert_counts: torch.Tensor | None = None
        # Training losses read the last forward's router logits and choices when this is on.
        self.record_router = False
        self.last_router: tuple[torch.Tensor, torch.Tensor] | None = None
        # After fuse_projections(): the routed experts and the shared expert stacked as E + 1 experts, which the
        # fused GPU kernel runs in one pass; the parameters are views into these.
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None
        # Set from outside by tensor parallelism (`parallel.sharding`): the block's output is this rank's partial
        # sum, completed by `reduce_output` before the norm after it; with expert parallelism the block holds only
        # experts expert_range[0] .. expert_range[1] - 1 (routing still chooses among all of them).
        self.reduce_output = None
        self.expert_range: tuple[int, int] | None = None
        self._router_fp32: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def fuse_projections(self) -> None:
        """For inference. With one shared expert as wide as a routed one (every Trinity model), stack it after the
        routed experts: at decode the fused MoE kernel then computes it with the routed ones, instead of two more
        GEMMs, an activation and an add per layer (each mostly launch-bound at decode).
        The parameters become views of the stacked tensors; names, shapes and state_dict are unchanged."""
        if self.stacked_valid():
            return
        shared = self.shared_experts
        if shared is not None and hasattr(self.experts, "stack_shared"):  # FP8 experts stack in their own form
            if not (self.experts.stacked_with(shared) or self.experts.stack_shared(shared)):
                shared.fuse_projections()
            return
        if shared is None or not getattr(self.experts, "whole_layer_kernels", True) \
                or not isinstance(shared.down_proj, nn.Linear) \
                or shared.down_proj.weight.shape != self.experts.down_proj.shape[1:]:
            if shared is not None:
                shared.fuse_projections()
            return
        experts, e = self.experts, self.experts.gate_up_proj.shape[0]
        gate_up = torch.cat([experts.gate_up_proj.detach(),
                             torch.cat([shared.gate_proj.weight.detach(), shared.up_proj.weight.detach()])[None]])
        down = torch.cat([experts.down_proj.detach(), shared.down_proj.weight.detach()[None]])
        experts.gate_up_proj = nn.Parameter(gate_up[:e], requires_grad=experts.gate_up_proj.requires_grad)
        experts.down_proj = nn.Parameter(down[:e], requires_grad=experts.down_proj.requires_grad)
        shared.down_proj.weight = nn.Parameter(down[e], requires_grad=shared.down_proj.weight.requires_grad)
        shared.fused = FusedLinears([shared.gate_proj, shared.up_proj], weight=gate_up[e])
        self.stacked = (gate_up, down)

    def stacked_valid(self) -> bool:
        """The stacked tensors still back the parameters (`.to()` or a load with assign=True replaces them)."""
        if self.stacked is None:
            return False
        gate_up, down = self.stacked
        shared, e = self.shared_experts, gate_up.shape[0] - 1
        return (self.experts.gate_up_proj.data_ptr() == gate_up.data_ptr()
                and self.experts.down_proj.data_ptr() == down.data_ptr()
                and shared.fused is not None and shared.fused.valid()
                and shared.fused.weight.data_ptr() == gate_up[e].data_ptr()
                and shared.down_proj.weight.data_ptr() == down[e].data_ptr())

    def router_weight_fp32(self) -> torch.Tensor:
        """The router weight in fp32 for inference, converted once (a bf16 model otherwise copies it every step: one
        extra kernel per MoE layer), and again only if the weight is replaced or changed in place."""
        if hasattr(self.router.gate, "dequantized"):  # a checkpoint that quantized the router too
            return self.router.gate.dequantized(torch.float32)
        w = self.router.gate.weight
        if w.dtype == torch.float32 or torch.is_grad_enabled():  # under autograd the cast must stay differentiable
            return w
        cached = self._router_fp32
        if cached is None or cached[0] is not w or cached[1] != w._version:
            cached = self._router_fp32 = (w, w._version, w.detach().float())
        return cached[2]

    def track_expert_load(self, enabled: bool = True) -> None:
        self.expert_counts = torch.zeros(self.router.gate.weight.shape[0], dtype=torch.long,
                                         device=self.router.gate.weight.device) if enabled else None

    def fuses_norm(self, x: torch.Tensor) -> bool:
        """Whether `forward` runs the decoder layer's norm step itself when given one (inference on the Triton path
        with the shared expert stacked): its input may then come with an fp32 copy (`x_fp32`)."""
        return self._path(x) == "triton" and self.stacked_valid() and self.reduce_output is None

    def _path(self, x: torch.Tensor, count_weight: torch.Tensor | None = None) -> str:
        """The implementation for this batch: "triton" or "native" (a whole-layer kernel), else "routed"."""
        if self.record_router or self.expert_range is not None:
            return "routed"  # training (the losses need the router logits), or experts elsewhere
        if not getattr(self.experts, "whole_layer_kernels", True):  # FP8 experts: their own C layer, CPU decode
            return "fp8" if count_weight is None and self.experts.layer_wanted(x, self.top_k) else "routed"
        if moe_layer_triton_wanted(x):
            return "triton"
        if count_weight is None and moe_layer_native_wanted(x, self.experts.gate_up_proj):
            return "native"  # (the C layer counts every token: it takes no count weight)
        return "routed"

    def forward(self, x: torch.Tensor, step=None, norm: tuple | None = None,
                x_fp32: torch.Tensor | None = None):
        """x: [T, H] -> [T, H], by one of four implementations (`_path`):

        - "triton": the whole layer in the fused kernels (`kernels.moe.moe_layer_triton`), the shared expert in the
          same pass once stacked (`fuse_projections`);
        - "native": CPU inference, the whole layer in one C call (`kernels.moe.moe_layer_native`);
        - "fp8": the same for FP8 experts (`quant.modules.Fp8Experts.layer`);
        - "routed": the router (`kernels.moe.route`, or under `record_router` the reference with its logits kept
          for the training losses), the routed experts (`kernels.moe.routed_experts`), then the shared expert.

        `step`: the step's metadata (`AttentionMetadata`): its `expert_counts` row `moe_index` gains the routed
        tokens, weighted by its `count_weight`; without them, this block's own `expert_counts` (training).
        `norm` = (residual, post_norm, next_norm): also the decoder layer's norm step after the block
        -> (next_norm(r), r) with r = residual + post_norm(out), in the down GEMM's kernels where `fuses_norm`
        (each token's expert outputs summed in fp32 by the norm, not combined first). `x_fp32`: x widened, when
        the norm that made it wrote that too (saves the router's cast)."""
        counts, count_weight = self._counting(step, x)
        path = self._path(x, count_weight)
        stacked = None  # set where a whole-layer kernel computes the shared expert with the routed ones
        if path == "routed":
            out = self._routed(x, counts, count_weight)
        elif path == "fp8":
            stacked = self.experts.stacked_with(self.shared_experts) or None
            out = self.experts.layer(x, self.router_weight_fp32(), self.expert_bias, self.top_k, self.route_norm,
                                     self.route_scale, bool(stacked), counts)
        else:
            stacked = self.stacked if self.stacked_valid() else None
            gate_up, down = stacked or (self.experts.gate_up_proj, self.experts.down_proj)
            args = (x, self.router_weight_fp32(), self.expert_bias, self.top_k, self.route_norm, self.route_scale,
                    gate_up, down, stacked is not None, counts, count_weight)
            if path == "native":
                out = moe_layer_native(*args)
            elif norm is None or stacked is None or self.reduce_output is not None:
                out = moe_layer_triton(*args, x_fp32=x_fp32)
            else:  # the norm step too, in the down GEMM's kernels
                residual, post, following = norm
                return moe_layer_triton(*args, x_fp32=x_fp32,
                                        norm=(residual, post.weight, following.weight, following.eps))
        if stacked is None and self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if self.reduce_output is not None:
            out = self.reduce_output(out)
        if norm is None:
            return out
        residual, post, following = norm
        return following(out, residual, post=post)

    def _counting(self, step, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the [E] int64 counts to add this batch's routed tokens to, their [T] 0/1 weights): the step's row and
        weights where its metadata carries them, else this block's own counts (training) and no weights."""
        table = getattr(step, "expert_counts", None)
        counts = table[self.moe_index] if table is not None else self.expert_counts
        weight = getattr(step, "count_weight", None)
        if weight is not None and weight.shape[0] != x.shape[0]:
            raise ValueError(f"count weights for {weight.shape[0]} tokens in a batch of {x.shape[0]}: a step that "
                             "keeps only some rows in its last layer (`rows`) carries no count weight")
        return counts, weight

    def _routed(self, x: torch.Tensor, counts: torch.Tensor | None,
                count_weight: torch.Tensor | None) -> torch.Tensor:
        if self.record_router:
            logits = router_logits(x, self.router.gate.weight)
            weights, ids = select_experts(logits, self.expert_bias, self.top_k, self.route_norm, self.route_scale)
            self.last_router = (logits, ids)
        else:  # `route_reference` (the same math as above), or the fused router where Triton runs
            weights, ids = kernel_route(x, self.router_weight_fp32(), self.expert_bias, self.top_k,
                                        self.route_norm, self.route_scale)
        if counts is not None:
            # scatter_add_, not bincount: bincount's output size depends on the data, which a CUDA graph
            # cannot capture (and it syncs with the host)
            per_choice = count_weight[:, None].expand_as(ids) if count_weight is not None else torch.ones_like(ids)
            counts.scatter_add_(0, ids.reshape(-1), per_choice.reshape(-1))
        if self.expert_range is not None:
            return self._local_experts(x, weights, ids)
        return self.experts(x, weights, ids)

    def _local_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The choices of the experts this block holds (`expert_range`); zero for the others' (another rank adds
        them). Only those choices are computed, except under CUDA-graph capture, where shapes cannot depend on the
        routing: there every choice runs, the others' weighted 0."""
        e0, e1 = self.expert_range
        held = (ids >= e0) & (ids < e1)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return self.experts(x, weights * held, (ids - e0).clamp(0, e1 - e0 - 1))
        token, choice = held.nonzero(as_tuple=True)
        out = torch.zeros_like(x)
        if token.numel():
            y = self.experts(x[token], weights[token, choice][:, None], (ids[token, choice] - e0)[:, None])
            out.index_add_(0, token, y)
        return out
