"""The model's 4-bit modules: `Int4Linear` for a bias-free projection, `Int4Experts` for a MoE block's stacked routed
experts, each holding its weights in the canonical layout (`quant.int4`): half a byte per weight, plus fp32 group
scales, uint8 zero points (asymmetric schemes) and int32 g_idx (activation order).

Parameter names follow the FP8 modules' (`quant.modules`): the weight's name for the packed codes, plus
`_scale`, `_zero_point` and `_g_idx` (`weight`, `weight_scale`, ...; `gate_up_proj`, `gate_up_proj_scale`, ...). The
checkpoint's own tensors (qweight/qzeros/scales, weight_packed/...) are converted into them at load
(`int4_load`). Forward is the reference (`kernels.int4`): neither module can be folded into the fused kernels made
for plain weights (`foldable`, `whole_layer_kernels` False), so the model takes its generic paths.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.int4 import experts_int4_reference, linear_int4
from . import int4
from .int4 import Int4Weight
from .int4_scheme import Int4Scheme
from .scheme import QuantConfig, QuantizationError

_TP_REFUSED = "int4 (W4A16) weights do not support tensor parallelism yet; load them with tensor_parallel_size 1"


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_int4(x, self.packed())

    # Tensor parallelism sets this on row-parallel projections (`parallel.sharding._row_parallel`): refused here,
    # where an int4 model is cut from memory (the loader refuses a sharded load before).
    @property
    def reduce_output(self):
        return None

    @reduce_output.setter
    def reduce_output(self, value) -> None:
        raise QuantizationError(_TP_REFUSED)

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 {s.format} group={self.group}"
                f"{'' if s.symmetric else ' asymmetric'}{' act_order' if s.act_order else ''}")


class Int4Experts(nn.Module):
    """Stacked routed experts in 4 bits: gate_up_proj [E, 2I, ceil(H / 2)] (the gate's rows, then the up's) with
    scales [E, 2I, G(H)] and, per scheme, zero points and g_idx [E, 2, H] (gate's and up's column orders); down_proj
    [E, H, ceil(I / 2)] with scales [E, H, G(I)], zero points, g_idx [E, 1, I]."""

    keeps_dtypes = True
    whole_layer_kernels = False  # the plain-weight whole-layer kernels do not take int4: the block's routed path
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

    def layer_wanted(self, x: torch.Tensor, top_k: int) -> bool:
        """`MoEBlock._path` asks experts without whole-layer kernels whether they have one: not yet."""
        return False

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.packed()
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

