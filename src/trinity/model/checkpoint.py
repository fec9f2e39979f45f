"""HF safetensors checkpoints <-> TrinityForCausalLM.

Reads a single `model.safetensors` or shards listed in `model.safetensors.index.json`, with routed
experts either per expert (`mlp.experts.{e}.gate_proj.weight`, as released) or stacked (`mlp.experts.gate_up_proj`
[E, 2I, H], as transformers 5 writes). Tensors stream one at a time from memory-mapped files straight into
storage allocated once in the target dtype, so peak extra memory is one tensor, not a second model.
A tensor-parallel rank (`shard`, a `parallel.sharding.ShardPlan`) allocates only its own slices and reads only
those rows and columns of each tensor (`get_slice`), so no rank ever holds the whole model.
Pickle checkpoints are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import TrinityConfig

if TYPE_CHECKING:
    from ..parallel.sharding import ShardPlan

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some exporters write that carry nothing we need (we recompute RoPE tables).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
                         r"\.(?P<kind>weight|weight_scale)$")
_STACKED_SPLIT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<proj>gate_proj|up_proj)(?P<kind>|_scale)$")

# A tensor-parallel rank reads through the files' memory maps, and every page a read touches counts as its memory
# until the map is closed: it closes and reopens a file after reading this share of its own part of the model (at
# least RELEASE_MIN_BYTES), so its peak stays ~2% above its part whatever the size of the shard files. Reopening
# costs a header parse (~1 ms for thousands of tensors): a few hundred times in a whole load at most.
RELEASE_FRACTION = 1 / 64
RELEASE_MIN_BYTES = 1 << 20
# bytes per element of the safetensors dtypes (what a read spans in the file)
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1}

FP8 = torch.float8_e4m3fn

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the tensor and the shapes."""


def resolve_dtype(dtype: torch.dtype | str | None, config: TrinityConfig, device: torch.device | str) -> torch.dtype:
    """`None`/"auto": the config's dtype on an accelerator, fp32 on the CPU (bf16 matmuls are slow on most CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return _DTYPES[config.dtype] if torch.device(device).type != "cpu" else torch.float32
    return parse_dtype(dtype)


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: auto, bfloat16, float16, float32")
    return _DTYPES[name]


def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20; an int is taken as bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {size!r}; write e.g. 5GB, 500MB or 2GiB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base ** power)


def checkpoint_files(path: str | os.PathLike) -> dict[str, list[str] | None]:
    """{file: tensor names (None = read the file's own list)} for a checkpoint folder."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files: dict[str, list[str] | None] = {}
        for name, file in weight_map.items():
            files.setdefault(os.path.join(path, file), []).append(name)
        for file in files:
            if not os.path.exists(file):
                raise FileNotFoundError(f"{INDEX_FILE} names {os.path.basename(file)}, which is not in {path}")
        return files
    if os.path.exists(os.path.join(path, SINGLE_FILE)):
        return {os.path.join(path, SINGLE_FILE): None}
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if shards:
        return {os.path.join(path, f): None for f in shards}
    pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise CheckpointError(f"{path} holds only pickle weights ({', '.join(sorted(pickles)[:3])}); they are not "
                              "loaded because unpickling can run code. Convert them to safetensors first.")
    raise FileNotFoundError(f"no safetensors weights in {path}")


@dataclass(slots=True)
class _Target:
    """Where one checkpoint tensor goes: a parameter, or a slice of a stacked expert parameter.

    `cover` indexes the parameter's coverage grid (see `_coverage_shape`): it catches a tensor given twice,
    even as two layouts of the same weights, and names what is missing at the end.
    """

    param_name: str
    index: tuple
    cover: tuple


def _coverage_shape(name: str, param: torch.Tensor) -> tuple[int, ...]:
    """Stacked gate_up: [experts, 2] (gate half, up half); stacked down: [experts]; anything else: [1]. (With their
    FP8 scales, and 4-bit zero points and g_idx, `quant.int4_modules`.)"""
    parts = ("", "_scale", "_zero_point", "_g_idx")
    if name.endswith(tuple(".mlp.experts.gate_up_proj" + p for p in parts)):
        return (param.shape[0], 2)
    if name.endswith(tuple(".mlp.experts.down_proj" + p for p in parts)):
        return (param.shape[0],)
    return (1,)


class _LoadState:
    """The parameters being filled and what of them is filled. Sharded, `params` are the rank's local tensors,
    `full` the parameters at full shape (meta tensors: checkpoint tensors are placed and checked against these) and
    `plan` maps full coordinates to local ones; unsharded, `full` is `params`."""

    def __init__(self, params: dict[str, torch.Tensor], full: dict[str, torch.Tensor] | None = None,
                 plan: ShardPlan | None = None):
        self.params, self.full, self.plan = params, full if full is not None else params, plan
        # an expert-parallel rank's stacked experts are experts first_expert.. of the model's
        self.first_expert = plan.expert_range[0] if plan is not None and plan.expert_parallel else 0
        self.coverage = {n: torch.zeros(_coverage_shape(n, p), dtype=torch.bool) for n, p in params.items()}
        self.blocks: dict[str, tuple[int, int]] = {}  # FP8 parameters' scale blocks, for online quantization


def _target_for(name: str, params: dict[str, torch.Tensor]) -> _Target | None:
    if name in params:
        return _Target(name, (), (...,))
    m = _PER_EXPERT.match(name) or _STACKED_SPLIT.match(name)
    if not m:
        return None
    prefix, proj = m["prefix"], m["proj"]
    stacked = f"{prefix}.down_proj" if proj == "down_proj" else f"{prefix}.gate_up_proj"
    if stacked not in params:  # e.g. expert tensors for a layer that is dense in this config
        return None
    num_experts = params[stacked].shape[0]
    experts = slice(None)
    if "e" in m.groupdict():
        experts = int(m["e"])
        if experts >= num_experts:
            return None
    scale = m["kind"] in ("weight_scale", "_scale")  # an FP8 expert's block scales (`quant.modules.Fp8Experts`)
    if scale:
        stacked += "_scale"
        if stacked not in params:
            return None
    if proj == "down_proj":
        return _Target(stacked, (experts,), (experts,))
    inter = params[stacked].shape[1] // 2  # of the scale's block rows, for a scale
    half = 0 if proj == "gate_proj" else 1
    return _Target(stacked, (experts, slice(half * inter, (half + 1) * inter)), (experts, half))


def _checked_target(state: _LoadState, name: str, shape: tuple[int, ...], where: str) -> _Target:
    """Where checkpoint tensor `name` of `shape` goes (full coordinates), or the error naming what does not fit."""
    target = _target_for(name, state.full)
    if target is None:
        raise CheckpointError(f"unexpected tensor {name!r} (shape {shape}) in {where}: "
                              "the model has no such parameter; is this an AfmoeForCausalLM checkpoint of this config?")
    want = tuple(state.full[target.param_name][target.index].shape)
    flat_scale = name.endswith(("weight_scale", "input_scale")) and math.prod(shape) == math.prod(want)
    if shape != want and not flat_scale:
        raise CheckpointError(f"tensor {name!r} in {where} has shape {shape} but the model expects {want}")
    return target


def _cover(state: _LoadState, name: str, target: _Target, where: str) -> None:
    """Mark the target's part of the coverage grid (in the local parameter's experts), refusing a second fill."""
    cover = target.cover
    if isinstance(cover[0], int):
        cover = (cover[0] - state.first_expert, *cover[1:])
    covered = state.coverage[target.param_name]
    if covered[cover].any():
        raise CheckpointError(f"tensor {name!r} in {where} fills part of {target.param_name!r} that another "
                              "tensor already filled (the checkpoint gives the same weights twice)")
    covered[cover] = True


def _copy_in(state: _LoadState, name: str, tensor: torch.Tensor, where: str) -> None:
    target = _checked_target(state, name, tuple(tensor.shape), where)
    _cover(state, name, target, where)
    dest = state.params[target.param_name][target.index]
    if tensor.shape != dest.shape:  # a scale saved flat ([1] for a tensor-wide one, [out] per channel)
        tensor = tensor.reshape(dest.shape)
    with torch.no_grad():
        if dest.dtype == FP8 and tensor.dtype != FP8:  # online FP8: quantized as it streams in
            _quantize_in(state, name, target, tensor, where)
            _cover_scale(state, name, target, where)
        else:
            dest.copy_(tensor)  # FP8 stays FP8; scales (fp32, bf16 or e8m0) become fp32


def _fill(state: _LoadState, name: str, target: _Target, value: torch.Tensor, where: str) -> None:
    """A converted tensor (4-bit, `quant.int4_load`) into its target, marked as `_copy_in` marks; sharded, the
    rank's part of it (nothing for another expert-parallel rank's expert)."""
    if state.plan is None:
        pieces = [(target.index, value)]
    else:
        pieces = _local_pieces(state, target.param_name, target.index, value)
        if not pieces:
            return
    _cover(state, name, target, where)
    with torch.no_grad():
        for index, part in pieces:
            state.params[target.param_name][index].copy_(part)


def _local_pieces(state: _LoadState, param_name: str, index: tuple, value: torch.Tensor) \
        -> list[tuple[tuple, torch.Tensor]]:
    """`value`, which fills `index` of full parameter `param_name`, cut to this rank's part: [(index into the local
    parameter, the part of value)], one per range of the split that `index` reaches."""
    full_shape = state.full[param_name].shape
    at = []
    for d, i in enumerate(index):  # an int index as a slice of one, and value given that dimension
        if isinstance(i, int):
            i, value = slice(i, i + 1), value.unsqueeze(d)
        at.append(i)
    at += [slice(None)] * (len(full_shape) - len(at))
    split = state.plan.split(param_name)
    if split is None:
        return [(tuple(at), value)]
    d = split.dim
    r0, r1, _ = at[d].indices(full_shape[d])
    pieces, offset = [], 0
    for a, b in split.ranges:
        lo, hi = max(a, r0), min(b, r1)
        if lo < hi:
            dst, src = list(at), [slice(None)] * value.dim()
            dst[d], src[d] = slice(offset + lo - a, offset + hi - a), slice(lo - r0, hi - r0)
            pieces.append((tuple(dst), value[tuple(src)]))
        offset += b - a
    return pieces


def _int4_modules(quant, files: dict, config: TrinityConfig):
    """A 4-bit checkpoint's QuantConfig, with its modules from its tensors where its config does not list them
    (AWQ, GPTQ: `QuantConfig.only`)."""
    from dataclasses import replace

    from ..quant.int4_load import checkpoint_modules, tensor_names

    if quant.weights.format == "pack-quantized":  # its ignore list names every module it leaves
        return quant
    return replace(quant, only=checkpoint_modules(tensor_names(files), config.num_experts))


def _quantize_in(state: _LoadState, name: str, target: _Target, tensor: torch.Tensor, where: str) -> None:
    """A higher-precision weight into an FP8 parameter and its scale (`--quantization fp8`). Stacked experts'
    gate_up_proj is quantized a half at a time, as the per-expert gate_proj and up_proj are (the same blocks
    whichever layout the checkpoint has)."""
    index = target.index
    if target.param_name.endswith(".gate_up_proj") and len(index) < 2:  # both halves in one tensor
        experts = index[0] if index else slice(None)
        inter = tensor.shape[-2] // 2
        for rows in (slice(0, inter), slice(inter, 2 * inter)):
            _quantize_part(state, target.param_name, (experts, rows), tensor[..., rows, :])
    else:
        _quantize_part(state, target.param_name, index, tensor)


def _cover_scale(state: _LoadState, name: str, target: _Target, where: str) -> None:
    """An online-quantized weight's scale is filled with it: marked as the weight is."""
    from ..quant.modules import scale_target

    scale_name, scale_index = scale_target(target.param_name, target.index, state.full)
    _cover(state, name + " (its scale)", _Target(scale_name, scale_index, target.cover), where)


def _quantize_part(state: _LoadState, param_name: str, index: tuple, tensor: torch.Tensor) -> None:
    from ..quant import fp8
    from ..quant.modules import scale_target

    scale_name, scale_index = scale_target(param_name, index, state.params)
    q, scale = fp8.quantize(tensor, state.blocks[param_name])
    state.params[param_name][index].copy_(q)
    state.params[scale_name][scale_index].copy_(scale)


class _SliceReader:
    """One checkpoint file, read in slices by a tensor-parallel rank. safetensors hands out views of the file's
    memory map, and the pages a read touches stay resident until the map is closed: the file is closed and reopened
    once `budget` bytes have been read since it was opened, so no more than that is ever mapped in."""

    def __init__(self, path: str, budget: int):
        self.path, self.budget, self.touched = path, budget, 0
        self.handle = safe_open(path, framework="pt", device="cpu")

    def __enter__(self) -> "_SliceReader":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.__exit__(*exc)

    def keys(self) -> list[str]:
        return self.handle.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self.handle.get_slice(name).get_dtype()

    def row_bytes(self, name: str) -> int:
        """Bytes of one index of the tensor's first dimension (its whole size for a scalar)."""
        source = self.handle.get_slice(name)
        return math.prod(source.get_shape()[1:]) * _ITEMSIZE.get(source.get_dtype(), 8)

    def read(self, name: str, index: tuple, span: int) -> torch.Tensor:
        """`index` of tensor `name`, a view of the map spanning at most `span` bytes of the file. The view must be
        dropped before the next read (it holds the map open)."""
        self._reserve(span)
        return self.handle.get_slice(name)[index]

    def get_tensor(self, name: str) -> torch.Tensor:
        """All of tensor `name` (a KV scale; a 4-bit module's packed tensors, converted whole, then split)."""
        shape = self.shape(name)
        self._reserve(self.row_bytes(name) * (shape[0] if shape else 1))
        return self.handle.get_tensor(name)

    def _reserve(self, span: int) -> None:
        if self.touched and self.touched + span > self.budget:
            self.handle.__exit__(None, None, None)
            self.handle, self.touched = safe_open(self.path, framework="pt", device="cpu"), 0
        self.touched += span


def _pieces(src: tuple, shape: tuple[int, ...], row_bytes: int, budget: int) -> Iterator[tuple[tuple, tuple, int]]:
    """`src` (slices of a checkpoint tensor of `shape`) cut along its first dimension into reads spanning at most
    `budget` bytes of the file each (one index at least), as (the read's index, where it lands in the first dimension
    of the result, the bytes it spans). A read spans whole rows of the tensor: a column slice touches every page of
    its rows."""
    if not shape or (src and not isinstance(src[0], slice)):
        yield src, (), row_bytes * (shape[0] if shape else 1)
        return
    start, stop, _ = (src[0] if src else slice(None)).indices(shape[0])
    step = max(1, budget // max(1, row_bytes))
    for a in range(start, stop, step):
        b = min(stop, a + step)
        yield (slice(a, b), *src[1:]), (slice(a - start, b - start),), (b - a) * row_bytes


def _copy_in_slices(state: _LoadState, name: str, reader: _SliceReader, where: str) -> None:
    """A rank's part of checkpoint tensor `name` read from the file (only those rows and columns) into the local
    parameters; nothing when this rank holds none of it (another expert-parallel rank's expert)."""
    shape = reader.shape(name)
    target = _checked_target(state, name, shape, where)
    parts = state.plan.locate(target.param_name, target.index)
    if parts is None:
        return
    _cover(state, name, target, where)
    local, row_bytes = state.params[target.param_name], reader.row_bytes(name)
    with torch.no_grad():
        if local.dtype == FP8 and reader.dtype(name) not in ("F8_E4M3",):  # online FP8 of the rank's part
            for src, dst in parts:
                part = reader.read(name, src, row_bytes * (shape[0] if shape else 1))
                _quantize_in(state, name, _Target(target.param_name, dst, target.cover), part, where)
            _cover_scale(state, name, target, where)
            return
        for src, dst in parts:  # a split of several ranges (gate and up rows of stacked experts): one read each
            into = local[dst]  # the same shape as the checkpoint tensor at `src`, dimension for dimension
            for index, at, span in _pieces(src, shape, row_bytes, reader.budget):
                piece = reader.read(name, index, span)
                if piece.shape != into[at].shape:  # a scale saved flat
                    piece = piece.reshape(into[at].shape)
                into[at].copy_(piece)


def _missing_report(state: _LoadState) -> str:
    missing = []
    e0 = state.first_expert
    for name, covered in state.coverage.items():
        if covered.all():
            continue
        if not covered.any() or covered.numel() == 1:
            missing.append(f"{name} (shape {tuple(state.full[name].shape)})")
            continue
        prefix = name.rsplit(".", 1)[0]
        if covered.dim() == 2:  # per-expert gate/up
            missing += [f"{prefix}.{e0 + e}.{('gate_proj', 'up_proj')[h]}.weight"
                        for e, h in (~covered).nonzero().tolist()]
        else:
            missing += [f"{prefix}.{e0 + e}.down_proj.weight" for (e,) in (~covered).nonzero().tolist()]
    return ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")


def _progress(enabled: bool | None, total: int | None):
    """A rich progress bar over shards (on a TTY unless told otherwise)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("loading weights"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=True)
    return progress, progress.add_task("load", total=total)


# An FP8 KV cache's per-layer scales, as compressed-tensors (kv_cache_scheme) and vLLM's FP8 exports write them
_KV_SCALE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.self_attn\.(?P<kind>k_scale|v_scale|kv_scale)$")


def _take_kv_scale(model, name: str, handle) -> None:
    """A layer's KV-cache scale onto its attention module, where an e4m3 KV cache takes it (`engine.runner`); the
    value is the same on every tensor-parallel rank."""
    m = _KV_SCALE.match(name)
    layer = int(m["layer"])
    if layer >= len(model.model.layers):
        raise CheckpointError(f"{name}: the model has {len(model.model.layers)} layers")
    tensor = handle.get_tensor(name)
    if tensor.numel() != 1:
        raise CheckpointError(f"{name} has shape {tuple(tensor.shape)}; a KV-cache scale is one value per layer")
    setattr(model.model.layers[layer].self_attn, m["kind"], float(tensor.float()))


def _fp8_blocks(model) -> dict[str, tuple[int, int]]:
    """The scale block of every FP8 parameter (for online quantization)."""
    blocks = {}
    for prefix, module in model.named_modules():
        if getattr(module, "int4", False):  # 4-bit modules have no blocks (and are never quantized online)
            continue
        if hasattr(module, "gate_block"):  # quant.modules.Fp8Experts
            blocks[f"{prefix}.gate_up_proj"], blocks[f"{prefix}.down_proj"] = module.gate_block, module.down_block
        elif getattr(module, "keeps_dtypes", False):  # quant.modules.Fp8Linear
            blocks[f"{prefix}.weight"] = module.block
    return blocks


def _full_model(cls, config: TrinityConfig, quant=None):
    """The model at full shape on the meta device: where a sharded rank places checkpoint tensors."""
    with torch.device("meta"):
        model = cls(config)
    if quant is not None:
        from ..quant.modules import quantize_structure
        quantize_structure(model, quant)
    return model


def quant_config_for(config: TrinityConfig, quantization: str | None):
    """The checkpoint's quantization (its `quantization_config`), or online FP8 (`quantization="fp8"`) of an
    unquantized one; None: neither. Refuses what cannot run (`quant.scheme.QuantizationError`)."""
    from ..quant.scheme import CHECKPOINT_METHODS, QuantConfig, QuantizationError, from_hf

    hf_config = config.extra.get("quantization_config")
    quant = from_hf(hf_config)
    if quantization in (None, "none"):
        return quant
    if quantization in CHECKPOINT_METHODS:  # vLLM's flag for a quantized checkpoint: its own method, checked
        method = (hf_config or {}).get("quant_method")
        if method != CHECKPOINT_METHODS[quantization]:
            raise QuantizationError(f"quantization = {quantization!r}, but the checkpoint's quantization_config says "
                                    f"{'quant_method ' + repr(method) if hf_config else 'it is not quantized'}; "
                                    "leave --quantization out to load it as it is")
        return quant
    if quantization != "fp8":
        raise QuantizationError(f"quantization = {quantization!r} is not supported: fp8 (online FP8) is, and "
                                f"{', '.join(CHECKPOINT_METHODS)} name a checkpoint's own method")
    if quant is not None:
        raise QuantizationError("quantization = 'fp8' asks to quantize a checkpoint that is already quantized "
                                "(its quantization_config); load it without --quantization")
    return QuantConfig.online_fp8()


def load_checkpoint(cls, path: str | os.PathLike, dtype=None, device: torch.device | str = "cpu",
                    progress: bool | None = None, shard: ShardPlan | None = None, quantization: str | None = None):
    """`shard`: a `parallel.sharding.ShardPlan`: the rank's part of the model, read and allocated alone.
    `quantization`: "fp8" quantizes an unquantized checkpoint's projections and experts to FP8 as they load."""
    config = TrinityConfig.from_pretrained(path)
    quant = quant_config_for(config, quantization)
    files = checkpoint_files(path)
    if quant is not None and quant.int4:
        quant = _int4_modules(quant, files, config)
    if shard is not None:
        shard.quant = quant  # FP8 scales split with their weights, or (online) cover each rank's own piece
        shard.quantize_local = quant is not None and quant.online
    model = cls.empty(config, resolve_dtype(dtype, config, device), device, shard=shard, quant=quant)
    params = dict(model.named_parameters())  # tied head: named_parameters lists the shared weight once
    full = model if shard is None else _full_model(cls, config, quant)
    state = _LoadState(params) if shard is None else _LoadState(params, dict(full.named_parameters()), shard)
    state.blocks = _fp8_blocks(model)
    int4 = None  # 4-bit tensors are converted into the modules' layout as they stream in (`quant.int4_load`), at
    if quant is not None and quant.int4:  # full shape; sharded, `_fill` keeps the rank's part
        from ..quant.int4_load import Int4Loading
        int4 = Int4Loading(full, quant.weights)
    local_bytes = sum(p.numel() * p.element_size() for p in params.values())
    budget = max(RELEASE_MIN_BYTES, int(local_bytes * RELEASE_FRACTION))
    bar = _progress(progress, len(files))
    if bar:
        bar[0].start()
    try:
        for file, names in files.items():
            # One shard open at a time: its mapped pages are released before the next is read.
            opened = safe_open(file, framework="pt", device="cpu") if shard is None else _SliceReader(file, budget)
            with opened as handle:
                where = os.path.basename(file)
                for name in names if names is not None else list(handle.keys()):
                    if name.endswith(IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
                        continue
                    if _KV_SCALE.match(name):
                        _take_kv_scale(model, name, handle)
                        continue
                    if int4 is not None and int4.takes(name):
                        for param_name, index, cover, value in int4.add(name, handle.get_tensor(name), where):
                            _fill(state, name, _Target(param_name, index, cover), value, where)
                    elif shard is None:
                        _copy_in(state, name, handle.get_tensor(name), where)
                    else:
                        _copy_in_slices(state, name, handle, where)
                if bar:
                    bar[0].advance(bar[1])
    finally:
        if bar:
            bar[0].stop()
    if int4 is not None:
        int4.finish()
    report = _missing_report(state)
    if report:
        raise CheckpointError(f"checkpoint at {path} is missing tensors: {report}")
    return model.eval()


# ---------------------------------------------------------------------- saving
def hf_tensors(model, expert_layout: str = "per_expert", dtype: torch.dtype | None = None) \
        -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under HF names, in HF layout; fp32-kept parameters stay fp32."""
    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and not model.keeps_fp32(name) else t

    return hf_layout(((name, cast(name, p.detach())) for name, p in model.named_parameters()), expert_layout)


def hf_layout(named: Iterator[tuple[str, torch.Tensor]], expert_layout: str = "per_expert") \
        -> Iterator[tuple[str, torch.Tensor]]:
    """Our parameter names/tensors -> HF checkpoint names/tensors (stacked experts split per expert if asked)."""
    if expert_layout not in ("per_expert", "stacked"):
        raise ValueError(f"expert_layout {expert_layout!r}: allowed per_expert, stacked")
    for name, t in named:
        if expert_layout == "per_expert" and name.endswith(".mlp.experts.gate_up_proj"):
            prefix, inter = name.removesuffix(".gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                # clone: safetensors refuses tensors that share storage
                yield f"{prefix}.{e}.gate_proj.weight", t[e, :inter].clone()
                yield f"{prefix}.{e}.up_proj.weight", t[e, inter:].clone()
        elif expert_layout == "per_expert" and name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", t[e].clone()
        else:
            yield name, t.contiguous()


def save_checkpoint(model, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                    expert_layout: str = "per_expert", dtype: torch.dtype | str | None = None) -> None:
    if any(getattr(m, "int4", False) for m in model.modules()):
        raise ValueError("saving a model with 4-bit weights is not supported (their layout is the engine's own, "
                         "not a checkpoint format); save the checkpoint it was loaded from instead")
    os.makedirs(path, exist_ok=True)
    out_dtype = parse_dtype(dtype) if dtype is not None else None
    write_shards(hf_tensors(model, expert_layout, out_dtype), path, parse_size(max_shard_size))
    saved = out_dtype or model.dtype
    model.config.replace(dtype=str(saved).removeprefix("torch.")).save_pretrained(path)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors that share storage: a view (e.g. a projection fused for inference, see
    layers.FusedLinears) is written from a copy."""
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone()
    return t


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], path: str | os.PathLike, max_bytes: int) -> None:
    """Greedy size-sharding: model.safetensors when it fits in one, else model-0000i-of-0000n + index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    tmp_names: list[str] = []
    total = 0

    def flush() -> None:
        tmp = os.path.join(path, f".shard-{len(tmp_names):05d}.tmp")
        save_file({k: _own_storage(v.cpu()) for k, v in shards[-1].items()}, tmp, metadata={"format": "pt"})
        tmp_names.append(tmp)

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_bytes:
            flush()
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += nbytes
        total += nbytes
        if len(shards) > 1:  # keep only the shard being filled in memory
            shards[-2] = {k: None for k in shards[-2]}
    flush()
    for stale in os.listdir(path):  # a previous save's weights must not mix with these
        if stale == INDEX_FILE or (stale.endswith(".safetensors") and stale.startswith("model")):
            os.remove(os.path.join(path, stale))
    if len(tmp_names) == 1:
        os.replace(tmp_names[0], os.path.join(path, SINGLE_FILE))
        return
    n = len(tmp_names)
    weight_map = {}
    for i, (tmp, shard) in enumerate(zip(tmp_names, shards), start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, os.path.join(path, final))
        weight_map.update({name: final for name in shard})
    with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
