"""Which slice of every weight a tensor-parallel rank holds, and the model restructured around those slices.

Applied to the single-device model from outside (`shard_model`, or `TrinityForCausalLM.empty(..., shard=plan)` and
the sharded checkpoint load): the model files know nothing of ranks, beyond three seams they expose:
a projection whose output is a partial sum is not folded into the norm after it (`RMSNorm.forward`), a MoE block
can hand its output to a `reduce_output` and hold a range of experts (`MoEBlock.expert_range`), and the first
layer's input norm is folded into the embedding only where the embedding is whole.

Megatron's layout:
- attention: the q and output-gate heads split in rank order; the KV heads split, or, with fewer KV heads than
  ranks, replicated (rank r holds KV head r // (tp / kv_heads), whose query group contains its query heads);
  `o_proj` row-parallel (its input columns split), its output summed by one all-reduce.
- dense MLP and shared expert: gate/up column-parallel (rows split), down row-parallel.
- routed experts: tensor-parallel (every expert's intermediate dimension split, gate and up alike) or
  expert-parallel (rank r holds experts r * E / tp .. (r + 1) * E / tp - 1 whole); the MoE block's output (routed
  and shared experts together) summed by one all-reduce. Router, expert bias and norms replicated: every rank
  routes identically.
- embedding and LM head vocab-parallel: rank r holds rows r * Vp .. (r + 1) * Vp - 1 with Vp = ceil(V / tp), the
  rows past V zero; the embedding's lookups summed by an all-reduce, the logits gathered (and cut back to V).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrinityConfig
from .comm import TPGroup


class ShardingError(ValueError):
    """Sizes that cannot be split over the ranks; the message names the sizes that can."""


@dataclass(frozen=True, slots=True)
class Split:
    """The part of a full parameter a rank holds: the ranges of `dim` given, concatenated, then `pad` zero rows."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    pad: int = 0

    @property
    def size(self) -> int:
        return sum(b - a for a, b in self.ranges) + self.pad

    def take(self, source) -> torch.Tensor:
        """This rank's part of `source` (a tensor, or a safetensors slice: only these rows are read)."""
        if isinstance(source, torch.Tensor) and source.dtype.itemsize == 1 and source.is_floating_point():
            return Split.take(self, source.view(torch.uint8)).view(source.dtype)  # FP8: cat works on bytes
        parts = [source[(slice(None),) * self.dim + (slice(a, b),)] for a, b in self.ranges]
        if self.pad:
            shape = list(parts[0].shape)
            shape[self.dim] = self.pad
            parts.append(torch.zeros(shape, dtype=parts[0].dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


def _ranges_for(rank: int, size: int, total: int) -> tuple[int, int]:
    n = total // size
    return rank * n, (rank + 1) * n


def _valid_sizes(works: Callable[[int], bool]) -> str:
    return ", ".join(str(t) for t in range(1, 65) if works(t))


class ShardPlan:
    """The slices of one rank of `tp` for a config (checked at construction: sizes that cannot work are refused,
    naming the sizes that would)."""

    def __init__(self, config: TrinityConfig, rank: int, size: int, expert_parallel: bool = False,
                 group: TPGroup | None = None, quant=None):
        """`quant`: the model's `quant.scheme.QuantConfig` when its weights are FP8 (their scales split with them)."""
        self.config, self.rank, self.size, self.expert_parallel = config, rank, size, expert_parallel
        self.quant = quant
        self.full_shapes = {}
        self.group = group or TPGroup(rank, size)
        check_sizes(config, size, expert_parallel)
        c, tp = config, size
        d = c.head_dim
        heads = c.num_attention_heads // tp
        self.num_heads = heads
        if c.num_key_value_heads % tp == 0:
            self.num_kv_heads = c.num_key_value_heads // tp
            kv_first = rank * self.num_kv_heads
        else:  # fewer KV heads than ranks: each held by tp / kv_heads ranks
            self.num_kv_heads = 1
            kv_first = rank // (tp // c.num_key_value_heads)
        self.kv_range = (kv_first * d, (kv_first + self.num_kv_heads) * d)
        self.q_range = (rank * heads * d, (rank + 1) * heads * d)
        self.vocab_per_rank = math.ceil(c.vocab_size / tp)
        lo = rank * self.vocab_per_rank
        self.vocab_range = (min(lo, c.vocab_size), min(lo + self.vocab_per_rank, c.vocab_size))
        self.expert_range = _ranges_for(rank, tp, c.num_experts) if expert_parallel else (0, c.num_experts)

    # ------------------------------------------------------------------ per parameter
    def split(self, name: str) -> Split | None:
        """How parameter `name` (our names, full shapes) is split; None: every rank holds it whole."""
        if self.int4_params and _int4_base(name)[0] in self.int4_params:
            return self._int4_split(name)
        if name.endswith("_scale"):
            return None if self.quantize_local else self._scale_split(name)
        return self._weight_split(name)

    def _weight_split(self, name: str) -> Split | None:
        """The split of a weight by the layout above (in elements of its full shape)."""
        c, rank, tp = self.config, self.rank, self.size
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            a, b = self.vocab_range
            return Split(0, ((a, b),), self.vocab_per_rank - (b - a))
        leaf = name.rsplit(".", 2)
        module, param = leaf[-2], leaf[-1]
        if ".self_attn." in name:
            if module in ("q_proj", "gate_proj"):
                return Split(0, (self.q_range,))
            if module in ("k_proj", "v_proj"):
                return Split(0, (self.kv_range,))
            if module == "o_proj":
                return Split(1, (self.q_range,))
            return None
        if ".mlp.experts." in name:
            if self.expert_parallel:
                return Split(0, (self.expert_range,))
            a, b = _ranges_for(rank, tp, c.moe_intermediate_size)
            if param == "gate_up_proj":
                inter = c.moe_intermediate_size
                return Split(1, ((a, b), (inter + a, inter + b)))
            return Split(2, ((a, b),))
        if ".mlp." in name and module in ("gate_proj", "up_proj", "down_proj"):  # dense MLP, shared expert
            width = c.moe_intermediate_size * c.num_shared_experts if ".shared_experts." in name \
                else c.intermediate_size
            r = _ranges_for(rank, tp, width)
            return Split(1 if module == "down_proj" else 0, (r,))
        return None

    # ------------------------------------------------------------------ FP8 block scales
    # An FP8 weight's scales (`quant/`) split with its rows or columns, a block at a time: a rank's part must start
    # and end on block boundaries (or the dimension be one block, whose scale every rank then holds). `full_shapes`
    # (the parameters' full shapes) is set by `restructure`.
    full_shapes: dict[str, tuple[int, ...]] = {}

    def _scale_split(self, name: str) -> Split | None:
        weight = name.removesuffix("_scale")
        split = self.split(weight)
        if split is None or name.endswith("input_scale"):
            return None
        shape = self.full_shapes[weight]
        if split.dim == 0 and len(shape) == 3:  # expert parallel: the same experts
            return split
        matrix = (shape[-2] // 2, shape[-1]) if weight.endswith("gate_up_proj") else tuple(shape[-2:])
        block = self.local_block(weight, matrix, matrix)
        d = split.dim - (len(shape) - 2)  # the split dimension within the matrix
        size, b = matrix[d], block[d]
        if size <= b:
            return None  # one block along it: its scale applies to every rank's piece
        rows_per_half = math.ceil(matrix[0] / block[0])
        ranges = []
        for i, (lo, hi) in enumerate(split.ranges):
            offset = i * matrix[0] if len(split.ranges) == 2 else 0  # gate_up's second range: the up half
            lo, hi = lo - offset, hi - offset
            if lo % b or (hi % b and hi != size):
                raise ShardingError(f"{weight}: rank {self.rank}'s part {lo}..{hi} of a dimension of {size} does not "
                                    f"start and end on FP8 scale blocks of {b}; use a tensor_parallel_size that "
                                    f"splits {size} into multiples of {b}")
            base = i * rows_per_half if len(split.ranges) == 2 else 0
            ranges.append((base + lo // b, base + math.ceil(hi / b)))
        return Split(split.dim, tuple(ranges))

    # ------------------------------------------------------------------ 4-bit weights
    # A 4-bit weight (`quant.int4_modules`) is its codes (two per byte along the input), group scales and zero points
    # [.., out, G] and, with activation order, g_idx [.., P, in] (one column order per row block). Split along its
    # rows (or experts) every tensor follows the weight's rows, except g_idx, whose rows are column orders; split
    # along its input the codes split by bytes, the scales and zero points by groups (a rank's part must be whole
    # groups), g_idx by columns. With activation order a rank's columns use groups from the whole weight, so it
    # keeps every group's scale (as vLLM keeps GPTQ act-order scales whole on every rank). Set by `restructure`:
    # weight name -> (full input size, group, activation order).
    int4_params: dict[str, tuple[int, int, bool]] = {}

    def _int4_split(self, name: str) -> Split | None:
        base, part = _int4_base(name)
        split = self._weight_split(base)
        inp, group, act_order = self.int4_params[base]
        input_dim = len(self.full_shapes[base]) - 1
        if split is None or split.dim < input_dim:  # whole, or rows / experts
            rows_of_orders = part == "_g_idx" and split is not None and split.dim == input_dim - 1
            return None if rows_of_orders else split
        if part == "_g_idx":
            return split
        if part and (act_order or group >= inp):
            return None  # every group's scale, or one group along the input: the same on every rank
        step, unit = (2, "bytes of two 4-bit codes") if not part else (group, f"4-bit groups of {group} columns")
        ranges = []
        for a, b in split.ranges:
            if a % step or (b % step and b != inp):
                raise ShardingError(f"{base}: rank {self.rank}'s columns {a}..{b} of {inp} do not start and end on "
                                    f"{unit}; use a tensor_parallel_size that splits {inp} into multiples of {step}")
            ranges.append((a // step, math.ceil(b / step)))
        return Split(split.dim, tuple(ranges))

    def int4_local(self, base: str) -> tuple[int, int]:
        """(input size, group) of this rank's part of 4-bit weight `base`. With activation order and the input split,
        the group is chosen so that the kernels' group count ceil(in / group) stays the whole weight's (their scale
        columns, all kept; g_idx alone says which column uses which)."""
        inp, group, act_order = self.int4_params[base]
        split = self._weight_split(base)
        if split is None or split.dim < len(self.full_shapes[base]) - 1:
            return inp, group
        local = split.size
        if not act_order:
            return local, min(group, local) if group >= inp else group
        groups = math.ceil(inp / group)
        if (local * group) % inp or math.ceil(local / (local * group // inp)) != groups:
            raise ShardingError(f"{base}: a part of {local} of {inp} columns in act-order groups of {group} cannot "
                                f"keep the weight's {groups} groups; use a tensor_parallel_size that divides {group}")
        return local, local * group // inp

    # Online FP8 of a sharded load (`--quantization fp8` with tensor parallelism): each rank quantizes the part it
    # reads, its blocks starting at its own origin, so its scales are a grid over its piece (no split to follow).
    quantize_local = False

    def _local_scale_shape(self, name: str) -> tuple[int, ...]:
        from ..quant.fp8 import grid

        weight = name.removesuffix("_scale")
        full = self.full_shapes[weight]
        local = self.local_shape(weight, full)
        halves = 2 if weight.endswith("gate_up_proj") else 1
        full_m = (full[-2] // halves, full[-1])
        local_m = (local[-2] // halves, local[-1])
        rows, cols = grid(local_m, self.local_block(weight, full_m, local_m))
        return (*local[:-2], rows * halves, cols)

    def local_block(self, weight: str, full: tuple[int, int], local: tuple[int, int]) -> tuple[int, int]:
        """The scale block of a rank's part of an FP8 weight matrix: the checkpoint's, except along a dimension that
        is one block whole, where the block is the rank's piece of it."""
        block = self.quant.weights.block(full)
        return tuple(lp if f <= b else b for f, lp, b in zip(full, local, block))

    def local_shape(self, name: str, full: torch.Size) -> tuple[int, ...]:
        if name.endswith("_scale") and self.quantize_local:
            return self._local_scale_shape(name)
        s = self.split(name)
        if s is None:
            return tuple(full)
        shape = list(full)
        shape[s.dim] = s.size
        return tuple(shape)

    def locate(self, name: str, index: tuple) -> list[tuple[tuple, tuple]] | None:
        """For a checkpoint tensor that fills `index` of parameter `name` (full coordinates, as the loader's
        targets give them: () the whole parameter; (e, rows) an expert's gate or up half, (e,) its down, with e an
        int or slice(None) for all experts): [(index into the checkpoint tensor, index into the local parameter)],
        or None when this rank holds none of it."""
        s = self.split(name)
        if not index:
            if s is None:
                return [((), ())]
            out, offset = [], 0
            for a, b in s.ranges:
                lead = (slice(None),) * s.dim
                out.append((lead + (slice(a, b),), lead + (slice(offset, offset + b - a),)))
                offset += b - a
            return out
        if s is None:  # a scale every rank holds whole
            return [((), index)]
        e, rest = index[0], index[1:]
        one = isinstance(e, int)  # the checkpoint tensor is one expert's (no expert dimension)
        if s.dim == 0:  # expert-parallel
            e0, e1 = s.ranges[0]
            if one:
                return [((), (e - e0, *rest))] if e0 <= e < e1 else None
            return [((slice(e0, e1),), (slice(None), *rest))]
        (a, b), n = s.ranges[0], s.ranges[0][1] - s.ranges[0][0]
        lead = () if one else (slice(None),)
        if s.dim == 1:  # an expert's gate or up rows (or their scales' block rows): the rank's rows of that half
            half = rest[0].start // (rest[0].stop - rest[0].start)
            return [(lead + (slice(a, b),), (e, slice(half * n, (half + 1) * n)))]
        return [(lead + (slice(None), slice(a, b)), (e,))]  # down: the rank's columns


def _int4_base(name: str) -> tuple[str, str]:
    """(the weight's name, the tensor's suffix: "" for the codes, "_scale", "_zero_point" or "_g_idx")."""
    for part in ("_scale", "_zero_point", "_g_idx"):
        if name.endswith(part):
            return name.removesuffix(part), part
    return name, ""


def check_sizes(config: TrinityConfig, tp: int, expert_parallel: bool = False) -> None:
    """Raise `ShardingError` when `tp` ranks cannot split this config, naming the sizes that can."""
    if tp < 1:
        raise ShardingError(f"tensor_parallel_size = {tp} must be >= 1")
    c = config
    checks: list[tuple[str, Callable[[int], bool]]] = [
        (f"num_attention_heads = {c.num_attention_heads}", lambda t: c.num_attention_heads % t == 0),
        (f"num_key_value_heads = {c.num_key_value_heads} (split, or replicated when fewer than the ranks)",
         lambda t: c.num_key_value_heads % t == 0 or t % c.num_key_value_heads == 0),
        (f"intermediate_size = {c.intermediate_size}", lambda t: c.intermediate_size % t == 0),
    ]
    if c.num_experts and any(c.is_moe_layer(i) for i in range(c.num_hidden_layers)):
        checks.append((f"moe_intermediate_size * num_shared_experts = {c.moe_intermediate_size * c.num_shared_experts}",
                       lambda t: (c.moe_intermediate_size * c.num_shared_experts) % t == 0))
        if expert_parallel:
            checks.append((f"num_experts = {c.num_experts} (expert parallel)", lambda t: c.num_experts % t == 0))
        else:
            checks.append((f"moe_intermediate_size = {c.moe_intermediate_size}",
                           lambda t: c.moe_intermediate_size % t == 0))
    for what, works in checks:
        if not works(tp):
            both = _valid_sizes(lambda t: all(w(t) for _, w in checks))
            raise ShardingError(f"tensor_parallel_size = {tp} cannot split {what}; sizes that split this model: "
                                f"{both}")


# ---------------------------------------------------------------------------- the modules that communicate
class RowParallelLinear(nn.Linear):
    """A projection whose input columns are split over the ranks: its output is a partial sum, completed by one
    all-reduce. Not foldable into the norm after it (`RMSNorm.forward` runs it first)."""

    foldable = False

    def __init__(self, weight: nn.Parameter, group: TPGroup):
        nn.Module.__init__(self)
        self.weight, self.bias = weight, None
        self.out_features, self.in_features = weight.shape
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.linear import linear
        return self.group.all_reduce_(linear(x, self.weight))


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_start + rows) of the embedding; other ids look up zeros, summed by an all-reduce."""

    foldable = False  # `TrinityModel.forward` does not fold the first norm into the lookup

    def __init__(self, weight: nn.Parameter, vocab_start: int, group: TPGroup):
        nn.Module.__init__(self)
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx, self.max_norm, self.sparse = None, None, False
        self.vocab_start, self.group = vocab_start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids.long() - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.group.all_reduce_(x.masked_fill(outside[:, None], 0))


class VocabParallelLMHead(nn.Linear):
    """Logits for this rank's vocabulary rows, gathered from every rank and cut back to the real vocabulary."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, group: TPGroup):
        nn.Module.__init__(self)
        self.weight, self.bias = weight, None
        self.out_features, self.in_features = weight.shape
        self.vocab_size, self.group = vocab_size, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.linear import linear
        return self.group.all_gather_last(linear(x, self.weight))[..., :self.vocab_size]


# ---------------------------------------------------------------------------- restructuring
def restructure(model, plan: ShardPlan, local: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Give every parameter its local tensor (`local(name, full_parameter)`), and install the modules and
    settings the split needs. The model's module structure is otherwise untouched."""
    from ..model.layers import GatedAttention, SwiGLU
    from ..model.moe import MoEBlock

    from ..quant.int4_modules import Int4Experts, Int4Linear
    from ..quant.modules import Fp8Experts, Fp8Linear

    group, cfg = plan.group, plan.config
    tied = cfg.tie_word_embeddings
    plan.full_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    plan.int4_params = _int4_params(model)
    plan.quant = plan.quant or getattr(model, "quant_config", None)
    if isinstance(model.lm_head, Fp8Linear):
        raise ShardingError("an FP8 lm_head cannot be split by vocabulary yet; checkpoints keep it unquantized "
                            "(their ignore list names lm_head)")
    for prefix, module in list(model.named_modules()):
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{prefix}.{pname}" if prefix else pname
            if tied and full == "lm_head.weight":
                continue  # the embedding's
            module._parameters[pname] = nn.Parameter(local(full, param), requires_grad=param.requires_grad)
    for prefix, module in model.named_modules():
        if isinstance(module, Fp8Linear):  # its block within the rank's piece
            full = plan.full_shapes[f"{prefix}.weight"]
            module.out_features, module.in_features = module.weight.shape
            module.block = plan.local_block(f"{prefix}.weight", full, tuple(module.weight.shape))
        elif isinstance(module, Fp8Experts):
            e, two_i, h = plan.full_shapes[f"{prefix}.gate_up_proj"]
            module.inter = module.gate_up_proj.shape[1] // 2
            module.gate_block = plan.local_block(f"{prefix}.gate_up_proj", (two_i // 2, h), (module.inter, h))
            module.down_block = plan.local_block(f"{prefix}.down_proj", (h, two_i // 2), (h, module.inter))
        elif isinstance(module, Int4Linear):
            module.in_features, module.group = plan.int4_local(f"{prefix}.weight")
            module.out_features = module.weight.shape[0]
        elif isinstance(module, Int4Experts):  # the hidden size (gate_up's input) is never split
            module.inter, module.down_group = plan.int4_local(f"{prefix}.down_proj")
    for module in model.modules():
        if isinstance(module, GatedAttention):
            module.num_heads, module.num_kv_heads = plan.num_heads, plan.num_kv_heads
            module.o_proj = _row_parallel(module.o_proj, group)
        elif isinstance(module, MoEBlock):
            module.reduce_output = group.all_reduce_
            if plan.expert_parallel:
                module.expert_range = plan.expert_range
    for layer in model.model.layers:
        if isinstance(layer.mlp, SwiGLU):  # dense: its own all-reduce (a shared expert's is its block's)
            layer.mlp.down_proj = _row_parallel(layer.mlp.down_proj, group)
    embed = VocabParallelEmbedding(model.model.embed_tokens.weight, plan.vocab_range[0], group)
    model.model.embed_tokens = embed
    head_weight = embed.weight if tied else model.lm_head.weight
    model.lm_head = VocabParallelLMHead(head_weight, cfg.vocab_size, group)
    model.shard_plan = plan


def _int4_params(model) -> dict[str, tuple[int, int, bool]]:
    """`ShardPlan.int4_params` of a model's 4-bit modules, at full shape."""
    from ..quant.int4_modules import Int4Experts, Int4Linear

    found = {}
    for prefix, module in model.named_modules():
        if isinstance(module, Int4Linear):
            found[f"{prefix}.weight"] = (module.in_features, module.group, module.scheme.act_order)
        elif isinstance(module, Int4Experts):
            act_order = module.scheme.act_order
            found[f"{prefix}.gate_up_proj"] = (module.hidden, module.gate_group, act_order)
            found[f"{prefix}.down_proj"] = (module.inter, module.down_group, act_order)
    return found


def _row_parallel(proj: nn.Module, group: TPGroup) -> nn.Module:
    """A row-parallel projection: a plain one becomes `RowParallelLinear`; a quantized one keeps its module and sums
    its output over the ranks (`Fp8Linear.reduce_output`, `Int4Linear.reduce_output`)."""
    if isinstance(proj, nn.Linear):
        return RowParallelLinear(proj.weight, group)
    proj.reduce_output = group.all_reduce_
    return proj


def shard_model(model, plan: ShardPlan):
    """A whole single-device model cut to this rank's part, in place (its other slices are dropped)."""
    with torch.no_grad():
        restructure(model, plan, lambda name, p: _own(plan.split(name), p))
    return model


def _own(split: Split | None, full: torch.Tensor) -> torch.Tensor:
    if split is None:
        return full.detach()
    return split.take(full.detach()).to(full.device).contiguous()


def meta_local(plan: ShardPlan):
    """`restructure`'s `local` for an empty model: meta tensors of the local shapes."""
    return lambda name, p: torch.empty(plan.local_shape(name, p.shape), dtype=p.dtype, device="meta")
