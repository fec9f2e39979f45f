"""Trinity's MoE block: fp32 sigmoid router whose bias only selects, stacked routed experts, a shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrinityConfig
from ..kernels.moe import (moe_layer_native, moe_layer_native_wanted, moe_layer_triton, moe_layer_triton_wanted,
                           routed_experts)
from ..kernels.moe import route as kernel_route
from .layers import FusedLinears, Linear, SwiGLU


def route(x: torch.Tensor, gate_weight: torch.Tensor, expert_bias: torch.Tensor, top_k: int,
          route_norm: bool, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H] -> (weights [T, k] fp32, expert ids [T, k])."""
    return select_experts(router_logits(x, gate_weight), expert_bias, top_k, route_norm, route_scale)


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
    def __init__(self, config: TrinityConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.route_norm = config.route_norm
        self.route_scale = config.route_scale
        self.router = Router(config.hidden_size, config.num_experts)
        # Not trained by gradients: the balancing rule moves it after each optimizer step.
        self.expert_bias = nn.Parameter(torch.zeros(config.num_experts), requires_grad=False)
        self.experts = RoutedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        shared = config.moe_intermediate_size * config.num_shared_experts
        self.shared_experts = SwiGLU(config.hidden_size, shared) if shared else None
        # Routing telemetry / balancing input: tokens sent to each expert since the last reset, when enabled.
        self.expert_counts: torch.Tensor | None = None
        # Optional [T] 0/1 weight per token for those counts: a CUDA-graph decode batch masks its padding rows.
        self.count_mask: torch.Tensor | None = None
        # Training losses read the last forward's router logits and choices when this is on.
        self.record_router = False
        self.last_router: tuple[torch.Tensor, torch.Tensor] | None = None
        # After fuse_projections(): the routed experts and the shared expert stacked as E + 1 experts, which the
        # fused GPU kernel runs in one pass; the parameters are views into these.
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None
        self._router_fp32: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def fuse_projections(self) -> None:
        """For inference. With one shared expert as wide as a routed one (every Trinity model), stack it after the
        routed experts: at decode the fused MoE kernel then computes it with the routed ones, instead of two more
        GEMMs, an activation and an add per layer (each a few microseconds, mostly launch-bound, on an H100).
        The parameters become views of the stacked tensors; names, shapes and state_dict are unchanged."""
        if self.stacked_valid():
            return
        shared = self.shared_experts
        if shared is None or shared.down_proj.weight.shape != self.experts.down_proj.shape[1:]:
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
        """The router weight in fp32 for inference, converted once (a bf16 model otherwise copies it every step:
        30 extra kernels per Mini decode step), and again only if the weight is replaced or changed in place."""
        w = self.router.gate.weight
        if w.dtype == torch.float32 or torch.is_grad_enabled():  # under autograd the cast must stay differentiable
            return w
        cached = self._router_fp32
        if cached is None or cached[0] is not w or cached[1] != w._version:
            cached = self._router_fp32 = (w, w._version, w.detach().float())
        return cached[2]

    def _forward_whole_layer(self, x: torch.Tensor, layer_fn, **options) -> torch.Tensor:
        """Inference through a whole-layer kernel (`moe_layer_native` on the CPU, `moe_layer_triton` where Triton
        runs): routing, counts, experts and, when it is stacked, the shared expert in its pass (else added after).
        `options` go to layer_fn."""
        stacked = self.stacked if self.stacked is not None and self.stacked_valid() else None
        gate_up, down = stacked or (self.experts.gate_up_proj, self.experts.down_proj)
        out = layer_fn(x, self.router_weight_fp32(), self.expert_bias, self.top_k, self.route_norm,
                       self.route_scale, gate_up, down, shared=stacked is not None, counts=self.expert_counts,
                       count_mask=self.count_mask, **options)
        if stacked is None and self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def norm_fusable(self, x: torch.Tensor) -> bool:
        """Whether `forward_norm` can run: inference on the Triton path with the shared expert stacked."""
        return (not self.record_router and self.stacked is not None and moe_layer_triton_wanted(x)
                and self.stacked_valid())

    def forward_norm(self, x: torch.Tensor, x_fp32: torch.Tensor | None, residual: torch.Tensor,
                     post_weight: torch.Tensor, next_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
        """The layer and the decoder layer's norm step after it, where `norm_fusable`: -> (normed, new residual), as
        `kernels.norm.norm_add_rms_norm(forward(x), residual, post_weight, next_weight, eps)` but with each token's
        weighted expert outputs (shared expert included) summed in fp32 by the norm, not combined first: at decode
        in the down GEMM's launch, else by the norm kernel. `x_fp32`: x widened, when the norm that made x wrote it
        too (saves the router's cast)."""
        return self._forward_whole_layer(x, moe_layer_triton, x_fp32=x_fp32,
                                         norm=(residual, post_weight, next_weight, eps))

    def track_expert_load(self, enabled: bool = True) -> None:
        self.expert_counts = torch.zeros(self.router.gate.weight.shape[0], dtype=torch.long,
                                         device=self.router.gate.weight.device) if enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.record_router:
            if self.count_mask is None and moe_layer_native_wanted(x, self.experts.gate_up_proj):
                return self._forward_whole_layer(x, moe_layer_native)
            if moe_layer_triton_wanted(x):
                return self._forward_whole_layer(x, moe_layer_triton)
        if self.record_router:  # training: the losses need the logits
            logits = router_logits(x, self.router.gate.weight)
            weights, ids = select_experts(logits, self.expert_bias, self.top_k, self.route_norm, self.route_scale)
            self.last_router = (logits, ids)
        else:  # `route_reference` (the same math as above), or the fused router where Triton runs
            weights, ids = kernel_route(x, self.router_weight_fp32(), self.expert_bias, self.top_k,
                                        self.route_norm, self.route_scale)
        if self.expert_counts is not None:
            # scatter_add_, not bincount: bincount's output size depends on the data, which a CUDA graph
            # cannot capture (and it syncs with the host)
            per_choice = (self.count_mask[:, None].expand_as(ids) if self.count_mask is not None
                          else torch.ones_like(ids))
            self.expert_counts.scatter_add_(0, ids.reshape(-1), per_choice.reshape(-1))
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
