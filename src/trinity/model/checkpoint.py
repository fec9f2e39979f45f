"""HF safetensors checkpoints <-> TrinityForCausalLM.

Reads a single `model.safetensors` or shards listed in `model.safetensors.index.json`, with routed
experts either per expert (`mlp.experts.{e}.gate_proj.weight`, as released) or stacked (`mlp.experts.gate_up_proj`
[E, 2I, H], as transformers 5 writes). Tensors stream one at a time from memory-mapped files straight into
storage allocated once in the target dtype, so peak extra memory is one tensor, not a second model.
Pickle checkpoints are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import TrinityConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some exporters write that carry nothing we need (we recompute RoPE tables).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_STACKED_SPLIT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<proj>gate_proj|up_proj)$")

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
    """Where one checkpoint tensor goes: a parameter, or a slice of a stacked expert parameter."""

    param_name: str
    index: tuple
    piece: str  # identifies the slice, to catch a tensor given twice


@dataclass
class _LoadState:
    params: dict[str, torch.Tensor]
    written: dict[str, int] = field(default_factory=dict)
    pieces: dict[str, set[str]] = field(default_factory=dict)


def _target_for(name: str, params: dict[str, torch.Tensor]) -> _Target | None:
    if name in params:
        return _Target(name, (), "all")
    m = _PER_EXPERT.match(name)
    if m:
        prefix, e, proj = m["prefix"], int(m["e"]), m["proj"]
        if proj == "down_proj":
            return _Target(f"{prefix}.down_proj", (e,), f"{e}")
        stacked = f"{prefix}.gate_up_proj"
        if stacked not in params:
            return None
        inter = params[stacked].shape[1] // 2
        rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
        return _Target(stacked, (e, rows), f"{proj}.{e}")
    m = _STACKED_SPLIT.match(name)
    if m:  # stacked but not fused: experts.gate_proj [E, I, H] / experts.up_proj
        stacked = f"{m['prefix']}.gate_up_proj"
        if stacked not in params:
            return None
        inter = params[stacked].shape[1] // 2
        rows = slice(0, inter) if m["proj"] == "gate_proj" else slice(inter, 2 * inter)
        return _Target(stacked, (slice(None), rows), f"{m['proj']}.all")
    return None


def _copy_in(state: _LoadState, name: str, tensor: torch.Tensor, where: str) -> None:
    target = _target_for(name, state.params)
    if target is None:
        raise CheckpointError(f"unexpected tensor {name!r} (shape {tuple(tensor.shape)}) in {where}: "
                              "the model has no such parameter; is this an AfmoeForCausalLM checkpoint of this config?")
    dest = state.params[target.param_name][target.index]
    if tuple(tensor.shape) != tuple(dest.shape):
        raise CheckpointError(f"tensor {name!r} in {where} has shape {tuple(tensor.shape)} but the model expects "
                              f"{tuple(dest.shape)}")
    seen = state.pieces.setdefault(target.param_name, set())
    if target.piece in seen or "all" in seen:
        raise CheckpointError(f"tensor {name!r} in {where} fills {target.param_name!r} a second time")
    seen.add(target.piece)
    with torch.no_grad():
        dest.copy_(tensor)
    state.written[target.param_name] = state.written.get(target.param_name, 0) + tensor.numel()


def _missing_report(state: _LoadState) -> str:
    missing = []
    for name, param in state.params.items():
        if state.written.get(name, 0) == param.numel():
            continue
        pieces = state.pieces.get(name, set())
        if name.endswith("experts.gate_up_proj") and pieces:
            prefix = name.removesuffix(".gate_up_proj")
            missing += [f"{prefix}.{e}.{proj}.weight" for e in range(param.shape[0]) for proj in ("gate_proj", "up_proj")
                        if f"{proj}.{e}" not in pieces]
        elif name.endswith("experts.down_proj") and pieces:
            prefix = name.removesuffix(".down_proj")
            missing += [f"{prefix}.{e}.down_proj.weight" for e in range(param.shape[0]) if f"{e}" not in pieces]
        else:
            missing.append(f"{name} (shape {tuple(param.shape)})")
    return ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")


def _progress(enabled: bool | None, total: int):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("loading weights"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=True)
    return progress, progress.add_task("load", total=total)


def load_checkpoint(cls, path: str | os.PathLike, dtype=None, device: torch.device | str = "cpu",
                    progress: bool | None = None):
    config = TrinityConfig.from_pretrained(path)
    files = checkpoint_files(path)
    model = cls.empty(config, resolve_dtype(dtype, config, device), device)
    state = _LoadState(params=dict(model.named_parameters()))
    if config.tie_word_embeddings:  # a tied checkpoint may still carry the head: same storage
        state.params.pop("lm_head.weight", None)
    handles = [safe_open(file, framework="pt", device="cpu") for file in files]
    names_per_file = [names if names is not None else list(h.keys()) for h, names in zip(handles, files.values())]
    bar = _progress(progress, sum(len(n) for n in names_per_file))
    if bar:
        bar[0].start()
    try:
        for file, handle, names in zip(files, handles, names_per_file):
            where = os.path.basename(file)
            for name in names:
                if name.endswith(IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                _copy_in(state, name, handle.get_tensor(name), where)
                if bar:
                    bar[0].advance(bar[1])
    finally:
        if bar:
            bar[0].stop()
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
    os.makedirs(path, exist_ok=True)
    out_dtype = parse_dtype(dtype) if dtype is not None else None
    write_shards(hf_tensors(model, expert_layout, out_dtype), path, parse_size(max_shard_size))
    saved = out_dtype or model.dtype
    model.config.replace(dtype=str(saved).removeprefix("torch.")).save_pretrained(path)


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], path: str | os.PathLike, max_bytes: int) -> None:
    """Greedy size-sharding: model.safetensors when it fits in one, else model-0000i-of-0000n + index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    tmp_names: list[str] = []
    total = 0

    def flush() -> None:
        tmp = os.path.join(path, f".shard-{len(tmp_names):05d}.tmp")
        save_file({k: v.cpu() for k, v in shards[-1].items()}, tmp, metadata={"format": "pt"})
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
