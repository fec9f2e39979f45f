"""Loading 4-bit checkpoints: which modules a checkpoint quantizes (AWQ, GPTQ), and its tensors converted into the
modules' canonical parameters (`int4_modules`) as they stream in.

A module's tensors (qweight, qzeros, scales, g_idx; or weight_packed, weight_scale, weight_zero_point) may come in
any order, even from different shard files: each is checked against the shape the format gives for the module's
matrix (`int4_formats.shapes`), held until the module's set is complete, then converted and copied into the
parameters and dropped. What is held at any time is a few modules' packed tensors, never a dequantized model.

Routed experts come per expert (`mlp.experts.3.gate_proj.qweight`) or stacked, one "module" per projection whose
tensors carry a leading expert dimension (`mlp.experts.gate_proj.qweight` [E, in / 8, out], as compressed-tensors
writes 3D expert weights; `gate_up_proj` for gate and up in one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..model.checkpoint import CheckpointError
from . import int4_formats
from .int4_modules import Int4Experts, Int4Linear
from .int4_scheme import Int4Scheme

_PART = re.compile(r"^(?P<module>.+)\.(?P<part>qweight|qzeros|scales|g_idx|weight_packed|weight_scale"
                   r"|weight_zero_point|weight_shape)$")
_EXPERTS = re.compile(r"^(?P<prefix>.+\.mlp\.experts)(?:\.(?P<e>\d+))?\.(?P<proj>gate_proj|up_proj|gate_up_proj"
                      r"|down_proj)$")
_PACKED = ("qweight", "qzeros", "weight_packed", "weight_zero_point")  # int32 words


# ------------------------------------------------------------------------------------------------ which modules
def tensor_names(files: dict[str, list[str] | None]) -> Iterable[str]:
    """Every tensor name of a checkpoint (`checkpoint.checkpoint_files`): the index's, or the files' headers."""
    for file, names in files.items():
        if names is not None:
            yield from names
        else:
            with safe_open(file, framework="pt", device="cpu") as handle:
                yield from handle.keys()


def checkpoint_modules(names: Iterable[str], num_experts: int) -> frozenset[str]:
    """The modules with a `qweight` (AWQ, GPTQ), named as `QuantConfig.ignored` is asked: a routed-experts
    container with any, and each expert projection a stacked tensor holds."""
    found = set()
    for name in names:
        if not name.endswith(".qweight"):
            continue
        module = name.removesuffix(".qweight")
        found.add(module)
        m = _EXPERTS.match(module)
        if m:
            found.add(m["prefix"])
            if m["e"] is None:
                projs = ("gate_proj", "up_proj") if m["proj"] == "gate_up_proj" else (m["proj"],)
                found.update(f"{m['prefix']}.{e}.{p}" for e in range(num_experts) for p in projs)
    return frozenset(found)


# ------------------------------------------------------------------------------------------------ destinations
@dataclass(slots=True)
class _Dest:
    """Where one checkpoint matrix (or stack of them) goes: parameter `base` (codes) and its `_scale`,
    `_zero_point`, `_g_idx`, at experts `lead` and `rows`; its g_idx into row block `block`."""

    base: str
    lead: tuple
    rows: slice
    block: int | slice
    cover: tuple
    out: int
    inp: int
    group: int
    lead_shape: tuple[int, ...] = ()  # the tensors' leading dimensions: (E,) for stacked experts


def _linear_dest(name: str, m: Int4Linear) -> _Dest:
    return _Dest(f"{name}.weight", (), slice(None), 0, (...,), m.out_features, m.in_features, m.group)


def _experts_dest(prefix: str, m: Int4Experts, e: str | None, proj: str) -> _Dest | None:
    num = m.gate_up_proj.shape[0]
    experts = slice(None) if e is None else int(e)
    if e is not None and experts >= num:
        return None
    i, h, lead = m.inter, m.hidden, () if e is not None else (num,)
    if proj == "down_proj":
        return _Dest(f"{prefix}.down_proj", (experts,), slice(None), 0, (experts,), h, i, m.down_group, lead)
    rows, block, out = {"gate_proj": (slice(0, i), 0, i), "up_proj": (slice(i, 2 * i), 1, i),
                        "gate_up_proj": (slice(None), slice(None), 2 * i)}[proj]
    return _Dest(f"{prefix}.gate_up_proj", (experts,), rows, block, (experts, block), out, h, m.gate_group, lead)


# ------------------------------------------------------------------------------------------------ streaming
class Int4Loading:
    """The 4-bit part of one load: `takes` a checkpoint tensor or not; `add` returns the fills it completes,
    (parameter name, index, coverage cell, value); `finish` refuses modules left incomplete."""

    def __init__(self, model, scheme: Int4Scheme):
        self.scheme = scheme
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
        self.experts = {n: m for n, m in model.named_modules() if isinstance(m, Int4Experts)}
        parts = set(int4_formats.PARTS[scheme.format])
        self.needed = {"qweight", "qzeros", "scales", "weight_packed", "weight_scale"} & parts
        if not scheme.symmetric and scheme.format == "pack-quantized":
            self.needed.add("weight_zero_point")
        if scheme.act_order:
            self.needed.add("g_idx")
        # checked on their own, not kept: g_idx without activation order, compressed-tensors' shapes
        self.alone = parts & {"g_idx", "weight_shape"} - self.needed
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def _dest(self, module: str) -> _Dest | None:
        if module in self.linears:
            return _linear_dest(module, self.linears[module])
        m = _EXPERTS.match(module)
        if m and m["prefix"] in self.experts:
            return _experts_dest(m["prefix"], self.experts[m["prefix"]], m["e"], m["proj"])
        return None

    def _split(self, name: str) -> tuple[str, str, _Dest] | None:
        m = _PART.match(name)
        if m is None or m["part"] not in self.needed | self.alone:
            return None
        dest = self._dest(m["module"])
        return None if dest is None else (m["module"], m["part"], dest)

    def takes(self, name: str) -> bool:
        return self._split(name) is not None

    def add(self, name: str, tensor: torch.Tensor, where: str) -> list[tuple[str, tuple, tuple, torch.Tensor]]:
        module, part, dest = self._split(name)
        self._check(name, part, tensor, dest, where)
        if part in self.alone:
            return []
        held = self.pending.setdefault(module, {})
        if part in held:
            raise CheckpointError(f"tensor {name!r} in {where} is given twice")
        held[part] = tensor
        if not self.needed <= held.keys():
            return []
        del self.pending[module]
        try:
            return self._fills(dest, self._convert(held, dest))
        except ValueError as e:
            raise CheckpointError(f"{module} in {where}: {e}") from None

    def finish(self) -> None:
        if self.pending:
            missing = [f"{module}.{p}" for module, held in self.pending.items()
                       for p in sorted(self.needed - held.keys())]
            raise CheckpointError("checkpoint is missing 4-bit tensors: " + ", ".join(missing[:8])
                                  + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))

    # -------------------------------------------------------------------------------------------- per module
    def _check(self, name: str, part: str, tensor: torch.Tensor, dest: _Dest, where: str) -> None:
        fmt, lead = self.scheme.format, dest.lead_shape
        if fmt == "awq" and (dest.inp % dest.group or dest.out % 8):
            raise CheckpointError(f"{name} in {where}: AWQ GEMM packs [in, out / 8] in groups dividing in; this "
                                  f"matrix is [{dest.out}, {dest.inp}] in groups of {dest.group}")
        if part == "weight_shape":
            if tensor.tolist() != [*lead, dest.out, dest.inp]:
                raise CheckpointError(f"tensor {name!r} in {where} says shape {tensor.tolist()}; the model's is "
                                      f"{[*lead, dest.out, dest.inp]}")
            return
        want = (*lead, *int4_formats.shapes(fmt, dest.out, dest.inp, dest.group)[part])
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"tensor {name!r} in {where} has shape {tuple(tensor.shape)} but the model expects "
                                  f"{want} ({fmt}, in groups of {dest.group})")
        if part in _PACKED and tensor.dtype != torch.int32:
            raise CheckpointError(f"tensor {name!r} in {where} is {tensor.dtype}; {fmt} packs codes in int32")
        if part == "g_idx" and part in self.alone and not int4_formats.trivial_g_idx(tensor, dest.group):
            raise CheckpointError(f"tensor {name!r} in {where} orders columns by activation (desc_act), but the "
                                  "quantization_config says desc_act false")

    def _convert(self, held: dict[str, torch.Tensor], dest: _Dest):
        s = self.scheme
        if s.format == "awq":
            return int4_formats.from_awq(held["qweight"], held["qzeros"], held["scales"])
        if s.format == "gptq":
            return int4_formats.from_gptq(held["qweight"], held["qzeros"], held["scales"], held.get("g_idx"),
                                          dest.inp, s.gptq_v1, s.symmetric)
        return int4_formats.from_pack_quantized(held["weight_packed"], held["weight_scale"],
                                                held.get("weight_zero_point"), dest.inp)

    def _fills(self, dest: _Dest, converted) -> list[tuple[str, tuple, tuple, torch.Tensor]]:
        codes, scale, zero, g_idx = converted
        index = (*dest.lead, dest.rows)
        fills = [(dest.base, index, dest.cover, codes), (f"{dest.base}_scale", index, dest.cover, scale)]
        if zero is not None:
            fills.append((f"{dest.base}_zero_point", index, dest.cover, zero))
        if g_idx is not None:  # [..., 1, in]: into its row block, or both halves of a stacked gate_up
            block = (*dest.lead, dest.block)
            value = g_idx[..., 0, :] if isinstance(dest.block, int) else g_idx
            fills.append((f"{dest.base}_g_idx", block, dest.cover, value))
        return fills
