"""The model's 4-bit modules: `Int4Linear` for a bias-free projection, `Int4Experts` for a MoE block's stacked routed
experts, each holding its weights in the canonical layout (`quant.int4`): half a byte per weight, plus fp32 group
scales, uint8 zero points (asymmetric schemes) and int32 g_idx (activation order).

Parameter names follow the FP8 modules' (`quant.modules`): the weight's name for the packed codes, plus
`_scale`, `_zero_point` and `_g_idx` (`weight`, `weight_scale`, ...; `gate_up_proj`, `gate_up_proj_scale`, ...). The
checkpoint's own tensors (qweight/qzeros/scales, weight_packed/...) are converted into them at load
(`int4_load`). Forward goes through `kernels.int4` (C kernels on the CPU, the reference elsewhere); neither module
can be folded into the fused kernels made for plain weights (`foldable`, `whole_layer_kernels` False): on the CPU a
MoE block runs `Int4Experts.layer` instead (the whole layer in one C call, the shared expert stacked with the routed
ones by `stack_shared`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import use_triton
from ..kernels.int4 import experts_int4_native, experts_int4_reference, experts_native_wanted, linear_int4, \
    moe_layer_int4_native
from . import int4
from .int4 import Int4Weight
from .int4_scheme import Int4Scheme
from .scheme import QuantConfig


def _parameters(module: nn.Module, base: str, lead: tuple[int, ...], out: int, inp: int, scheme: Int4Scheme,
                row_blocks: int = 1) -> None:
    """Register `base` (codes) and its scale, zero point and g_idx for matrices [*lead, out, inp]."""
    groups = int4.num_groups(inp, scheme.group(inp))

    def param(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        module.register_parameter(name, nn.Parameter(torch.empty(*lead, *shape, dtype=dtype), requires_grad=False))

    param(base, (out, (inp + 1) // 2), torch.uint8)
    param(f"{base}_scale", (out, groups), torch.float32)
    if not scheme.symmetric:
        param(f"{base}_zero_point", (out, groups), torch.uint8)
    if scheme.act_order:
        param(f"{base}_g_idx", (row_blocks, inp), torch.int32)


def _weight(module: nn.Module, base: str, group: int, inp: int) -> Int4Weight:
    return Int4Weight(getattr(module, base), getattr(module, f"{base}_scale"),
                      getattr(module, f"{base}_zero_point", None), getattr(module, f"{base}_g_idx", None), group, inp)


class Int4Linear(nn.Module):
    foldable = False  # `RMSNorm.forward` runs it before the norm instead of reading its weight
    keeps_dtypes = True  # `TrinityForCausalLM.empty` allocates its parameters in their own dtypes
    int4 = True

    def __init__(self, out_features: int, in_features: int, scheme: Int4Scheme):
        super().__init__()
        self.out_features, self.in_features, self.scheme = out_features, in_features, scheme
        self.group = scheme.group(in_features)
        _parameters(self, "weight", (), out_features, in_features, scheme)

    def packed(self) -> Int4Weight:
        return _weight(self, "weight", self.group, self.in_features)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return int4.dequantize(self.packed(), dtype)

    reduce_output = None  # tensor parallelism, row-parallel: sums the rank's partial output (`parallel.sharding`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear_int4(x, self.packed())
        return y if self.reduce_output is None else self.reduce_output(y)

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 {s.format} group={self.group}"
                f"{'' if s.symmetric else ' asymmetric'}{' act_order' if s.act_order else ''}")

    @staticmethod
    def fuse(modules: list[nn.Module]) -> "Int4FusedLinears | None":
        """`layers.fuse_linears` for 4-bit projections of one input: one kernel call where they can share it."""
        return Int4FusedLinears(modules) if Int4FusedLinears.possible(modules) else None


class Int4FusedLinears:
    """`layers.FusedLinears` for `Int4Linear`s (attention's q/k/v/gate, a SwiGLU's gate/up): codes, scales and zero
    points concatenated by rows (the modules' parameters become views, as there) and one `linear_int4` call. What
    a decode step saves is the calls: in the built-in model each projection's arithmetic is shorter than the
    Python and ctypes overhead of its call. Refused with act order (each module's own column order would need
    equal row blocks)."""

    def __init__(self, modules: list[Int4Linear]):
        self.modules = modules
        self.sizes = [m.out_features for m in modules]
        first = modules[0]
        names = ("weight", "weight_scale") + (() if first.scheme.symmetric else ("weight_zero_point",))
        tensors = {name: torch.cat([getattr(m, name).detach() for m in modules]) for name in names}
        start = 0
        for m, n in zip(modules, self.sizes):
            for name, t in tensors.items():
                setattr(m, name, nn.Parameter(t[start:start + n], requires_grad=False))
            start += n
        self.weight = Int4Weight(tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero_point"), None,
                                 first.group, first.in_features)

    @staticmethod
    def possible(modules: list[nn.Module]) -> bool:
        first = modules[0]
        return (all(isinstance(m, Int4Linear) and m.scheme == first.scheme and m.in_features == first.in_features
                    and m.reduce_output is None for m in modules) and not first.scheme.act_order)

    def valid(self) -> bool:
        return (self.modules[0].weight.data_ptr() == self.weight.codes.data_ptr()
                and self.modules[0].weight_scale.data_ptr() == self.weight.scale.data_ptr())

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return linear_int4(x, self.weight).split(self.sizes, dim=-1)


class Int4Experts(nn.Module):
    """Stacked routed experts in 4 bits: gate_up_proj [E, 2I, ceil(H / 2)] (the gate's rows, then the up's) with
    scales [E, 2I, G(H)] and, per scheme, zero points and g_idx [E, 2, H] (gate's and up's column orders); down_proj
    [E, H, ceil(I / 2)] with scales [E, H, G(I)], zero points, g_idx [E, 1, I]."""

    keeps_dtypes = True
    # The plain-weight whole-layer kernels do not take int4: the block runs `layer` (CPU) or its routed path.
    whole_layer_kernels = False
    stacked: dict[str, torch.Tensor] | None = None  # after `stack_shared`: the routed + shared stacks, by name
    int4 = True

    def __init__(self, num_experts: int, hidden: int, inter: int, scheme: Int4Scheme):
        super().__init__()
        self.inter, self.hidden, self.scheme = inter, hidden, scheme
        self.gate_group, self.down_group = scheme.group(hidden), scheme.group(inter)
        _parameters(self, "gate_up_proj", (num_experts,), 2 * inter, hidden, scheme, row_blocks=2)
        _parameters(self, "down_proj", (num_experts,), hidden, inter, scheme)

    def packed(self) -> tuple[Int4Weight, Int4Weight]:
        return (_weight(self, "gate_up_proj", self.gate_group, self.hidden),
                _weight(self, "down_proj", self.down_group, self.inter))

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (gate_up [2I, H], down [H, I]) dequantized into `dtype`."""
        gate_up, down = self.packed()
        return int4.dequantize(gate_up.expert(e), dtype), int4.dequantize(down.expert(e), dtype)

    def _suffixes(self) -> tuple[str, ...]:
        """The tensors of each weight this scheme has: codes, scales and, per scheme, zero points and g_idx."""
        return ("", "_scale") + (() if self.scheme.symmetric else ("_zero_point",)) + (
            ("_g_idx",) if self.scheme.act_order else ())

    def stack_shared(self, shared) -> bool:
        """For inference (`MoEBlock.fuse_projections`), as `Fp8Experts.stack_shared`: the shared expert (a `SwiGLU`
        of `Int4Linear`s as wide as a routed expert, in the same scheme) stacked after the routed experts, so that
        `layer` computes it with them (saving its three projections, the SwiGLU and the add per layer). Its
        parameters and the routed ones become views of the stacked tensors; False (nothing changed) where it does
        not match."""
        gate, up, down = shared.gate_proj, shared.up_proj, shared.down_proj
        i, h = self.inter, self.hidden
        if not (all(isinstance(p, Int4Linear) and p.scheme == self.scheme for p in (gate, up, down))
                and (gate.out_features, gate.in_features) == (up.out_features, up.in_features) == (i, h)
                and (down.out_features, down.in_features) == (h, i)):
            return False
        e = self.gate_up_proj.shape[0]
        views: dict[nn.Module, dict[str, torch.Tensor]] = {self: {}, gate: {}, up: {}, down: {}}
        stacked = {}
        for suffix in self._suffixes():
            g_idx = suffix == "_g_idx"  # [E, 2, H] / [E, 1, I]: one row per column order, not per weight row
            gu = torch.cat([getattr(self, "gate_up_proj" + suffix).detach(),
                            torch.cat([getattr(gate, "weight" + suffix).detach(),
                                       getattr(up, "weight" + suffix).detach()])[None]])
            dn = torch.cat([getattr(self, "down_proj" + suffix).detach(),
                            getattr(down, "weight" + suffix).detach()[None]])
            split = 1 if g_idx else i
            views[self]["gate_up_proj" + suffix], views[self]["down_proj" + suffix] = gu[:e], dn[:e]
            views[gate]["weight" + suffix], views[up]["weight" + suffix] = gu[e, :split], gu[e, split:]
            views[down]["weight" + suffix] = dn[e]
            stacked["gate_up_proj" + suffix], stacked["down_proj" + suffix] = gu, dn
        for module, tensors in views.items():
            for name, tensor in tensors.items():
                setattr(module, name, nn.Parameter(tensor, requires_grad=False))
        self.stacked = stacked
        return True

    def stacked_with(self, shared) -> bool:
        """`stack_shared`'s tensors still back the parameters (a load with assign=True or `.to()` replaces them)."""
        if self.stacked is None or shared is None:
            return False
        e = self.stacked["gate_up_proj"].shape[0] - 1
        for name, t in self.stacked.items():
            base = "gate_up_proj" if name.startswith("gate_up_proj") else "down_proj"
            part = shared.gate_proj if base == "gate_up_proj" else shared.down_proj
            if (getattr(self, name).data_ptr() != t.data_ptr()
                    or getattr(part, "weight" + name.removeprefix(base)).data_ptr() != t[e].data_ptr()):
                return False
        return True

    def _stacked_weights(self) -> tuple[Int4Weight, Int4Weight]:
        s = self.stacked

        def weight(base: str, group: int, inp: int) -> Int4Weight:
            return Int4Weight(s[base], s[f"{base}_scale"], s.get(f"{base}_zero_point"), s.get(f"{base}_g_idx"),
                              group, inp)

        return weight("gate_up_proj", self.gate_group, self.hidden), weight("down_proj", self.down_group, self.inter)

    def layer_wanted(self, x: torch.Tensor, top_k: int) -> bool:
        """Whether `layer` takes this batch (`MoEBlock._path`): CPU decode batches, as `experts_native_wanted`."""
        return experts_native_wanted(x, x.shape[0] * top_k, self.packed()[0])

    def layer(self, x: torch.Tensor, router_weight: torch.Tensor, expert_bias: torch.Tensor, top_k: int,
              route_norm: bool, route_scale: float, shared: bool, counts: torch.Tensor | None) -> torch.Tensor:
        """The whole MoE layer in one C call (`kernels.int4.moe_layer_int4_native`): routing, these experts and,
        with `shared` (`stacked_with` the block's shared expert), the shared expert."""
        gate_up, down = self._stacked_weights() if shared else self.packed()
        return moe_layer_int4_native(x, router_weight, expert_bias, top_k, route_norm, route_scale, gate_up, down,
                                     shared, counts)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.packed()
        if use_triton(x):  # the fused int4 MoE kernels (`int4_triton`), where they take the shapes
            from ..kernels.int4_triton import fused_moe_int4
            out = fused_moe_int4(x, weights, ids, gate_up, down)
            if out is not None:
                return out
        if experts_native_wanted(x, ids.numel(), gate_up):  # CPU decode batches: one C call
            return experts_int4_native(x, weights, ids, gate_up, down)
        return experts_int4_reference(x, weights, ids, gate_up, down)


def quantize_structure_int4(model, config: QuantConfig) -> None:
    """`modules.quantize_structure` for 4-bit schemes: every bias-free `nn.Linear` the config quantizes becomes an
    `Int4Linear`, every MoE block's routed experts (not ignored) an `Int4Experts`; empty parameters on the model's
    device. Module names are HF's, as the ignore list and the checkpoint name them."""
    from ..model.moe import RoutedExperts
    from .modules import _experts_ignored

    device = next(model.parameters()).device
    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear) and module.bias is None and not config.ignored(name):
            with torch.device(device):
                setattr(parent, attr, Int4Linear(module.weight.shape[0], module.weight.shape[1], config.weights))
        elif isinstance(module, RoutedExperts) and not _experts_ignored(config, name, module.gate_up_proj.shape[0]):
            e, two_i, h = module.gate_up_proj.shape
            with torch.device(device):
                setattr(parent, attr, Int4Experts(e, h, two_i // 2, config.weights))
    model.quant_config = config

