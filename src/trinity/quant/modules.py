"""The model's quantized modules, and the model restructured around them (`quantize_structure`).

`Fp8Linear` replaces a bias-free projection and `Fp8Experts` a MoE block's stacked routed experts; each keeps its
weights in FP8 (one byte each) beside fp32 block scales, under the same parameter names plus `*_scale` (so a
checkpoint's `weight` / `weight_scale` tensors load into them). Their forward is the reference: dequantize what is
used into the activations' dtype and compute as the unquantized module does (with the FP8 activations of the
checkpoint's scheme emulated where it has them). Neither can be folded into fused kernels made for plain weights:
`Fp8Linear.foldable` is False (the norm after it runs it first), and a MoE block with `Fp8Experts` takes its
reference ("routed") path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import use_triton
from ..kernels.fp8 import experts_fp8_native, experts_fp8_reference, experts_native_wanted, linear_fp8, \
    moe_layer_fp8_native
from . import fp8
from .scheme import ActivationScheme, QuantConfig, QuantizationError


class Fp8Linear(nn.Module):
    foldable = False  # `RMSNorm.forward` runs it before the norm instead of reading its weight
    keeps_dtypes = True  # `TrinityForCausalLM.empty` allocates its parameters in their own dtypes

    def __init__(self, out_features: int, in_features: int, block: tuple[int, int],
                 activations: ActivationScheme | None = None):
        super().__init__()
        self.out_features, self.in_features, self.block = out_features, in_features, block
        self.activations = activations
        rows, cols = fp8.grid((out_features, in_features), block)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=fp8.FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(rows, cols), requires_grad=False)
        if activations is not None and not activations.dynamic:
            self.input_scale = nn.Parameter(torch.empty(1), requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return fp8.dequantize(self.weight, self.weight_scale, self.block, dtype)

    reduce_output = None  # tensor parallelism, row-parallel: sums the rank's partial output (`parallel.sharding`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _forward(x, self.weight, self.weight_scale, self.block, self)
        return y if self.reduce_output is None else self.reduce_output(y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 block={self.block}"

    @staticmethod
    def fuse(modules: list[nn.Module]) -> "Fp8FusedLinears | None":
        """`layers.fuse_linears` for FP8 projections of one input: one GEMM where they can share it, else None."""
        return Fp8FusedLinears(modules) if Fp8FusedLinears.possible(modules) else None


def _forward(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], module):
    """x through FP8 weights with `module`'s activation scheme (its `activations`, and `input_scale` if static)."""
    group = _gpu_act_group(x, module.activations)
    if group is not None:  # the GPU's w8a8 GEMM quantizes x itself
        return linear_fp8(x, weight, scale, block, act_group=group)
    return linear_fp8(_activations_in(x, module), weight, scale, block)


class Fp8FusedLinears:
    """`layers.FusedLinears` for `Fp8Linear`s: their codes concatenated by rows (the modules' weights become views,
    as there) and one GEMM; what a decode step saves is the calls, as for plain weights.

    A projection whose rows are not a whole number of scale blocks (the built-in model's 64-row k_proj in blocks
    of 128) would put a block across the seam, so the fused scales use finer block rows (the gcd of the block
    rows and every part's rows), each of the module's scales repeated over the rows it covers: the same value
    for every weight, so the same products. The fused scales are a copy (1/block_rows of the codes' bytes or
    less), made for inference after loading; `valid` notices a scale parameter replaced."""

    def __init__(self, modules: list[Fp8Linear], weight: torch.Tensor | None = None):
        """`weight`: storage that already holds the concatenated codes (`Fp8Experts.stack_shared` places the
        shared expert's gate and up there); by default a new concatenation."""
        self.modules = modules
        self.sizes = [m.out_features for m in modules]
        self.block = (math.gcd(modules[0].block[0], *self.sizes), modules[0].block[1])
        self.activations = modules[0].activations
        self.weight = torch.cat([m.weight.detach() for m in modules]) if weight is None else weight
        self.scale = torch.cat([m.weight_scale.detach().float().repeat_interleave(m.block[0] // self.block[0], 0)
                                [: -(-n // self.block[0])] for m, n in zip(modules, self.sizes)])
        self._scales = [m.weight_scale for m in modules]
        start = 0
        for m, n in zip(modules, self.sizes):
            m.weight = nn.Parameter(self.weight[start:start + n], requires_grad=False)
            start += n

    @staticmethod
    def possible(modules: list[nn.Module]) -> bool:
        """FP8 projections of one input, with the same column blocks, no static input scales (each would need its
        own) and no output reduction; on a GPU only where the blocks need not change (its GEMM tiles follow them)."""
        first = modules[0]
        if not all(isinstance(m, Fp8Linear) and m.reduce_output is None and m.in_features == first.in_features
                   and m.block[1] == first.block[1] and m.activations == first.activations for m in modules):
            return False
        if first.activations is not None and not first.activations.dynamic:
            return False
        rows = math.gcd(first.block[0], *(m.out_features for m in modules))
        return all(m.block[0] % rows == 0 for m in modules) and (
            first.weight.device.type == "cpu" or all(m.block[0] == rows for m in modules))

    def valid(self) -> bool:
        return (self.modules[0].weight.data_ptr() == self.weight.data_ptr()
                and all(m.weight_scale is s for m, s in zip(self.modules, self._scales)))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _forward(x, self.weight, self.scale, self.block, self).split(self.sizes, dim=-1)


def _gpu_act_group(x: torch.Tensor, acts: ActivationScheme | None) -> int | None:
    """The Triton kernels' activation group for dynamic FP8 activations on the GPU (None: not that case)."""
    if acts is None or not acts.dynamic or not use_triton(x):
        return None
    from ..kernels import fp8_triton
    return acts.group_size if acts.strategy == "group" else fp8_triton.PER_TOKEN


def _activations_in(x: torch.Tensor, module) -> torch.Tensor:
    """x as the w8a8 kernel of the checkpoint's activation scheme would see it (x itself without one)."""
    acts = module.activations
    if acts is None:
        return x
    if acts.dynamic:
        return fp8.fake_quantize_activations(x, acts.group_size if acts.strategy == "group" else None)
    scale = module.input_scale.float()  # static, per tensor
    return ((x.float() / scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8).float() * scale).to(x.dtype)


class Fp8Experts(nn.Module):
    """Stacked routed experts in FP8: gate_up_proj [E, 2I, H] with gate_up_proj_scale [E, 2 * rows(I), cols(H)]
    (the gate half's block rows, then the up half's: each half is blocked on its own, as the checkpoint's per-expert
    gate_proj and up_proj are), down_proj [E, H, I] with down_proj_scale [E, rows(H), cols(I)]."""

    keeps_dtypes = True
    # The plain-weight whole-layer kernels do not take FP8: the block runs `layer` (CPU) or its routed path.
    whole_layer_kernels = False

    def __init__(self, num_experts: int, hidden: int, inter: int, config: QuantConfig):
        super().__init__()
        self.inter, self.hidden = inter, hidden
        self.gate_block = config.weights.block((inter, hidden))
        self.down_block = config.weights.block((hidden, inter))
        if config.activations is not None and not config.activations.dynamic:
            raise QuantizationError("static activation scales for routed experts are not supported (their "
                                    "input_scale per expert); dynamic ones are")
        self.activations = config.activations
        g_rows, g_cols = fp8.grid((inter, hidden), self.gate_block)
        d_rows, d_cols = fp8.grid((hidden, inter), self.down_block)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, dtype=fp8.FP8),
                                         requires_grad=False)
        self.gate_up_proj_scale = nn.Parameter(torch.empty(num_experts, 2 * g_rows, g_cols), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=fp8.FP8), requires_grad=False)
        self.down_proj_scale = nn.Parameter(torch.empty(num_experts, d_rows, d_cols), requires_grad=False)
        # After `stack_shared`: (gate_up, gate_up_scale, down, down_scale) of the routed experts and the shared
        # expert as one more, which back the parameters of both.
        self.stacked: tuple[torch.Tensor, ...] | None = None

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (gate_up [2I, H], down [H, I]) dequantized into `dtype`."""
        i, rows = self.inter, self.gate_up_proj_scale.shape[1] // 2
        q, s = self.gate_up_proj[e], self.gate_up_proj_scale[e]
        gate_up = torch.cat([fp8.dequantize(q[:i], s[:rows], self.gate_block, dtype),
                             fp8.dequantize(q[i:], s[rows:], self.gate_block, dtype)])
        return gate_up, fp8.dequantize(self.down_proj[e], self.down_proj_scale[e], self.down_block, dtype)

    def stack_shared(self, shared) -> bool:
        """For inference (`MoEBlock.fuse_projections`), as the plain block does: the shared expert (a `SwiGLU` of
        `Fp8Linear`s as wide as a routed expert, in the same blocks) stacked after the routed experts, so that
        `layer` computes it with them. Its parameters and the routed ones become views of the stacked tensors;
        False (nothing changed) where it does not match."""
        parts = (shared.gate_proj, shared.up_proj, shared.down_proj)
        i, h = self.inter, self.hidden
        if not (all(isinstance(p, Fp8Linear) and p.reduce_output is None and p.activations == self.activations
                    for p in parts)
                and (parts[0].block, parts[1].block, parts[2].block) == (self.gate_block,) * 2 + (self.down_block,)
                and parts[0].weight.shape == parts[1].weight.shape == (i, h) and parts[2].weight.shape == (h, i)):
            return False
        gate, up, down = parts
        e, rows = self.gate_up_proj.shape[0], gate.weight_scale.shape[0]
        stacked = (torch.cat([self.gate_up_proj.detach(), torch.cat([gate.weight.detach(), up.weight.detach()])[None]]),
                   torch.cat([self.gate_up_proj_scale.detach(),
                              torch.cat([gate.weight_scale.detach(), up.weight_scale.detach()]).float()[None]]),
                   torch.cat([self.down_proj.detach(), down.weight.detach()[None]]),
                   torch.cat([self.down_proj_scale.detach(), down.weight_scale.detach().float()[None]]))
        gu, gus, dn, dns = stacked
        views = {self: {"gate_up_proj": gu[:e], "gate_up_proj_scale": gus[:e], "down_proj": dn[:e],
                        "down_proj_scale": dns[:e]},
                 gate: {"weight": gu[e, :i], "weight_scale": gus[e, :rows]},
                 up: {"weight": gu[e, i:], "weight_scale": gus[e, rows:]},
                 down: {"weight": dn[e], "weight_scale": dns[e]}}
        for module, tensors in views.items():
            for name, tensor in tensors.items():
                setattr(module, name, nn.Parameter(tensor, requires_grad=False))
        # gate and up as one GEMM where the routed path runs the shared expert on its own (prefill, a GPU)
        shared.fused = Fp8FusedLinears([gate, up], weight=gu[e]) if Fp8FusedLinears.possible([gate, up]) else None
        self.stacked = stacked
        return True

    def stacked_with(self, shared) -> bool:
        """`stack_shared`'s tensors still back the parameters (a load with assign=True or `.to()` replaces them)."""
        if self.stacked is None or shared is None:
            return False
        gu, gus, dn, dns = self.stacked
        e, pairs = gu.shape[0] - 1, ((self.gate_up_proj, gu), (self.gate_up_proj_scale, gus), (self.down_proj, dn),
                                     (self.down_proj_scale, dns))
        return (all(p.data_ptr() == t.data_ptr() for p, t in pairs)
                and shared.gate_proj.weight.data_ptr() == gu[e].data_ptr()
                and shared.down_proj.weight.data_ptr() == dn[e].data_ptr()
                and shared.gate_proj.weight_scale.data_ptr() == gus[e].data_ptr()
                and shared.down_proj.weight_scale.data_ptr() == dns[e].data_ptr())

    def layer_wanted(self, x: torch.Tensor, top_k: int) -> bool:
        """Whether `layer` takes this batch: CPU decode batches (as `experts_native_wanted`), no FP8 activations."""
        return self.activations is None and experts_native_wanted(x, x.shape[0] * top_k, self.gate_up_proj)

    def layer(self, x: torch.Tensor, router_weight: torch.Tensor, expert_bias: torch.Tensor, top_k: int,
              route_norm: bool, route_scale: float, shared: bool, counts: torch.Tensor | None) -> torch.Tensor:
        """The whole MoE layer in one C call (`kernels.fp8.moe_layer_fp8_native`): routing, these experts and,
        with `shared` (`stacked_with` the block's shared expert), the shared expert."""
        tensors = self.stacked if shared else (self.gate_up_proj, self.gate_up_proj_scale, self.down_proj,
                                               self.down_proj_scale)
        return moe_layer_fp8_native(x, router_weight, expert_bias, top_k, route_norm, route_scale, *tensors,
                                    self.gate_block, self.down_block, shared, counts)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], each token's top-k (weights [T, k] fp32, ids [T, k]) -> [T, H]: each used expert's weights
        dequantized once, its tokens through SwiGLU, the outputs summed per token in fp32 (as the reference)."""
        if use_triton(x):  # the fused FP8 MoE kernels (w8a16; dynamic activations rounded by one launch each)
            from ..kernels import fp8_triton
            out = fp8_triton.fused_moe_fp8(x, weights, ids, self.gate_up_proj, self.gate_up_proj_scale,
                                           self.gate_block, self.down_proj, self.down_proj_scale, self.down_block,
                                           act_group=_gpu_act_group(x, self.activations))
            if out is not None:
                return out
        if self.activations is None and experts_native_wanted(x, ids.numel(), self.gate_up_proj):  # CPU decode: one C call
            return experts_fp8_native(x, weights, ids, self.gate_up_proj, self.gate_up_proj_scale, self.down_proj,
                                      self.down_proj_scale, self.gate_block, self.down_block)
        return experts_fp8_reference(x, weights, ids, self.gate_up_proj, self.gate_up_proj_scale, self.down_proj,
                                     self.down_proj_scale, self.gate_block, self.down_block, linear=linear_fp8,
                                     round_activations=lambda t: _activations_in(t, self))


def quantize_structure(model, config: QuantConfig) -> None:
    """Replace every projection the config quantizes (bias-free `nn.Linear`s not ignored) by `Fp8Linear`, and every
    MoE block's routed experts by `Fp8Experts`: empty parameters, on the model's device (meta for an empty model).
    Module names are HF's (`model.layers.3.self_attn.q_proj`, `lm_head`), as the `ignore` list names them."""
    from ..model.moe import RoutedExperts

    if config.int4:  # 4-bit weights: `int4_modules`
        from .int4_modules import quantize_structure_int4
        return quantize_structure_int4(model, config)
    device = next(model.parameters()).device
    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear) and module.bias is None and not config.ignored(name):
            w = module.weight
            with torch.device(device):
                new = Fp8Linear(w.shape[0], w.shape[1], config.weights.block(tuple(w.shape)), config.activations)
            setattr(parent, attr, new)
        elif isinstance(module, RoutedExperts) and not _experts_ignored(config, name, module.gate_up_proj.shape[0]):
            e, two_i, h = module.gate_up_proj.shape
            with torch.device(device):
                setattr(parent, attr, Fp8Experts(e, h, two_i // 2, config))
    model.quant_config = config


def _experts_ignored(config: QuantConfig, name: str, num_experts: int) -> bool:
    """Whether the `ignore` list leaves a block's routed experts unquantized: it names the checkpoint's per-expert
    projections (`...mlp.experts.3.gate_proj`), all of which one `Fp8Experts` holds, so all or none."""
    names = [f"{name}.{e}.{proj}" for e in range(num_experts) for proj in ("gate_proj", "up_proj", "down_proj")]
    ignored = [config.ignored(n) for n in names] + [config.ignored(name)]
    if any(ignored[:-1]) and not all(ignored[:-1]):
        raise QuantizationError(f"the ignore list leaves some of {name}'s expert projections unquantized and "
                                "quantizes others; all or none of a layer's experts are supported")
    return all(ignored[:-1]) or ignored[-1]


def scale_target(param_name: str, index: tuple, model_params: dict) -> tuple[str, tuple] | None:
    """For a checkpoint weight that fills `index` of FP8 parameter `param_name`, its scale's parameter and index:
    the same experts, and the block rows of the same half (gate or up) of a stacked gate_up_proj."""
    # a projection's `weight` -> `weight_scale`; stacked experts' `gate_up_proj` -> `gate_up_proj_scale`
    scale_name = param_name[: -len(".weight")] + ".weight_scale" if param_name.endswith(".weight") \
        else f"{param_name}_scale"
    if scale_name not in model_params:
        return None
    if not param_name.endswith("gate_up_proj"):
        # a projection's part is the rank's whole piece (one range: index () or its row or column slice), whose
        # scales are the whole local scale; an expert (e,) or experts (slice,) of down_proj keep their index
        return scale_name, index if len(index) == 1 and model_params[param_name].dim() == 3 else ()
    if not index or len(index) == 1:
        return scale_name, index
    e, rows = index  # a half of gate_up_proj
    inter = model_params[param_name].shape[1] // 2
    half = rows.start // inter
    n = model_params[scale_name].shape[1] // 2
    return scale_name, (e, slice(half * n, (half + 1) * n))


def quantize_model(model, config: QuantConfig):
    """A loaded model's projections and experts quantized in place (online FP8 of a model in memory): each weight
    replaced by its FP8 blocks and scales, one module at a time."""
    from ..model.moe import RoutedExperts

    originals = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, RoutedExperts))}
    quantize_structure(model, config)
    with torch.no_grad():
        for name, module in model.named_modules():
            source = originals.get(name)
            if isinstance(module, Fp8Linear):
                module.weight.data, module.weight_scale.data = fp8.quantize(source.weight.detach(), module.block)
            elif isinstance(module, Fp8Experts):
                i = module.inter
                gate_up = source.gate_up_proj.detach()
                (qg, sg), (qu, su) = (fp8.quantize(gate_up[:, :i], module.gate_block),
                                      fp8.quantize(gate_up[:, i:], module.gate_block))
                module.gate_up_proj.data = torch.cat([qg, qu], dim=1)
                module.gate_up_proj_scale.data = torch.cat([sg, su], dim=1)
                module.down_proj.data, module.down_proj_scale.data = fp8.quantize(source.down_proj.detach(),
                                                                                  module.down_block)
    return model
