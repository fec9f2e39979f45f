"""Writing 4-bit checkpoints in the three formats the engine loads, and reading them back independently of it.

- compressed-tensors `pack-quantized`: the library's own `PackedQuantizationCompressor.compress` packs the weights
  (given scales and zero points computed here), and its `decompress` is the reference reading.
- AWQ GEMM: packed here from AutoAWQ's documented layout (`WQLinear_GEMM.from_linear`: qweight [in, out / 8] with
  the nibble order [0, 2, 4, 6, 1, 3, 5, 7], qzeros the same, fp16 scales [in / group, out]); the reference reading
  is compressed-tensors' `AutoAWQConverter` (AWQ -> pack-quantized) followed by the library's decompressor.
- GPTQ: packed here from GPTQModel's layout (qweight [in / 8, out] in order along the input dimension, qzeros
  [G, out / 8] along the output dimension, v1 storing each zero minus one by subtracting 0x11111111 per word as
  GPTQModel's v2 -> v1 conversion does, fp16 scales [G, out], g_idx [in]); the reference reading is `gptq_weight`,
  the format's formula W[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]) written out here.

Every writer saves a float Trinity model as HF safetensors, replaces the weights of the quantized projections
(`quantized_name`) by the format's tensors, and writes the `quantization_config` the tool writes (HF transformers'
`AwqConfig` / `GPTQConfig` serialisation for AWQ and GPTQ; compressed-tensors' own for pack-quantized).
"""

from __future__ import annotations

import json
import os
import re

import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors.torch import load_file, save_file

from trinity.quant import int4

IGNORE = ["lm_head", "re:.*mlp\\.router\\.gate$"]
EXPERTS_IGNORED = "re:.*mlp\\.experts\\..*"
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order_map: nibble k holds column AWQ_ORDER[k] of each eight
V1_OFFSET = 0x11111111


def quantized_name(name: str, quantize_experts: bool = True, skip: tuple[str, ...] = ()) -> bool:
    module = name.removesuffix(".weight")
    if not name.endswith("proj.weight") or any(re.match(p[3:], module) if p.startswith("re:") else p == module
                                                for p in IGNORE):
        return False
    if any(s in module for s in skip):
        return False
    return quantize_experts or ".mlp.experts." not in name


def _float_tensors(model, path: str) -> dict[str, torch.Tensor]:
    model.save_pretrained(path, expert_layout="per_expert")
    return load_file(os.path.join(path, "model.safetensors"))


def _finish(path: str, tensors: dict[str, torch.Tensor], quantization_config: dict) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values (int64) as the int32 a checkpoint stores."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """[n, cols] codes -> int32 [ceil(n / 8), cols]: rows 8j..8j+7 in word j, row 8j + k in bits 4k (GPTQ's qweight)."""
    n = values.shape[0]
    padded = torch.nn.functional.pad(values.long(), (0, 0, 0, -n % 8)).view(-1, 8, values.shape[1])
    return _to_int32(sum(padded[:, k] << (4 * k) for k in range(8)))


def pack_columns(values: torch.Tensor, order=range(8)) -> torch.Tensor:
    """[rows, n] codes -> int32 [rows, ceil(n / 8)]: nibble k of word j holds column 8j + order[k]."""
    n = values.shape[1]
    padded = torch.nn.functional.pad(values.long(), (0, -n % 8)).view(values.shape[0], -1, 8)
    return _to_int32(sum(padded[:, :, order[k]] << (4 * k) for k in range(8)))


def unpack_columns(words: torch.Tensor, n: int) -> torch.Tensor:
    """`pack_columns`' inverse (in order)."""
    nibbles = [(words.long() >> (4 * k)) & 0xF for k in range(8)]
    return torch.stack(nibbles, dim=-1).flatten(-2)[..., :n]


def unpack_rows(words: torch.Tensor, n: int) -> torch.Tensor:
    return unpack_columns(words.T, n).T


def _codes(w: int4.Int4Weight) -> torch.Tensor:
    return int4.unpack(w.codes, w.in_features)


# ------------------------------------------------------------------------------------------------ compressed-tensors
def ct_args(strategy: str, group: int | None, symmetric: bool) -> QuantizationArgs:
    return QuantizationArgs(num_bits=4, type="int", strategy=strategy, symmetric=symmetric, dynamic=False,
                            group_size=group if strategy == "group" else None)


def write_ct_checkpoint(model, path: str, strategy: str = "group", group: int = 32, symmetric: bool = True,
                        scale_dtype: torch.dtype = torch.float32, quantize_experts: bool = True) -> dict:
    """A compressed-tensors pack-quantized checkpoint; returns the tensors written."""
    tensors = _float_tensors(model, path)
    wargs = ct_args(strategy, group, symmetric)
    scheme = QuantizationScheme(targets=["Linear"], weights=wargs, format="pack-quantized")
    out = {}
    for name, w in tensors.items():
        if not quantized_name(name, quantize_experts):
            out[name] = w
            continue
        q = int4.quantize(w, group if strategy == "group" else None, symmetric, scale_dtype=scale_dtype)
        state = {"weight": w.float(), "weight_scale": q.scale.to(scale_dtype)}
        if not symmetric:  # the library's zero points are signed, as its codes: stored zero - 8
            state["weight_zero_point"] = (q.zero_point.to(torch.int8) - 8)
        compressed = PackedQuantizationCompressor.compress(state, scheme)
        module = name.removesuffix(".weight")
        for part, t in compressed.items():
            out[f"{module}.{part}"] = t
    ignore = IGNORE + ([] if quantize_experts else [EXPERTS_IGNORED])
    _finish(path, out, {"quant_method": "compressed-tensors", "format": "pack-quantized",
                        "quantization_status": "compressed",
                        "config_groups": {"group_0": {"targets": ["Linear"], "weights": wargs.model_dump(),
                                                      "input_activations": None, "output_activations": None,
                                                      "format": "pack-quantized"}},
                        "ignore": ignore})
    return out


def ct_dequantized(tensors: dict, module: str, strategy: str, group: int, symmetric: bool) -> torch.Tensor:
    """The library's own decompression of one module's weight (fp32 scales: no rounding of the product)."""
    scheme = QuantizationScheme(targets=["Linear"], weights=ct_args(strategy, group, symmetric),
                                format="pack-quantized")
    state = {k.removeprefix(module + "."): v for k, v in tensors.items() if k.startswith(module + ".")}
    state["weight_scale"] = state["weight_scale"].float()
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"].float()


# ------------------------------------------------------------------------------------------------ AWQ
def awq_tensors(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """One weight [out, in] as AutoAWQ's GEMM layout (fp16 scales, codes made with them)."""
    q = int4.quantize(w, group, symmetric=False, scale_dtype=torch.float16)
    return {"qweight": pack_columns(_codes(q).T, AWQ_ORDER), "qzeros": pack_columns(q.zero_point.T, AWQ_ORDER),
            "scales": q.scale.T.half().contiguous()}


def write_awq_checkpoint(model, path: str, group: int = 32) -> dict:
    import transformers

    tensors = _float_tensors(model, path)
    out = {}
    for name, w in tensors.items():
        if not quantized_name(name):
            out[name] = w
            continue
        for part, t in awq_tensors(w, group).items():
            out[f"{name.removesuffix('.weight')}.{part}"] = t
    config = transformers.AwqConfig(bits=4, group_size=group, zero_point=True, version="gemm",
                                    modules_to_not_convert=["router"]).to_dict()
    _finish(path, out, config)
    return out


def awq_dequantized(tensors: dict, module: str, group: int) -> torch.Tensor:
    """compressed-tensors' AutoAWQ converter (AWQ GEMM -> pack-quantized), then the library's decompressor."""
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    part = {k: v for k, v in tensors.items() if k.startswith(module + ".")}
    converted = AutoAWQConverter(bits=4, group_size=group, zero_point=True, ignore=[]).process(dict(part))
    return ct_dequantized(converted, module, "group", group, symmetric=False)


# ------------------------------------------------------------------------------------------------ GPTQ
def gptq_tensors(w: torch.Tensor, group: int | None, symmetric: bool, act_order: bool, v1: bool,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One weight [out, in] in GPTQ's layout. With `act_order`, groups follow a random column order (g_idx), as
    desc_act's Hessian order would."""
    out_f, inp = w.shape
    g = group or inp
    g_idx = torch.arange(inp) // g
    if act_order:
        order = torch.randperm(inp, generator=generator)
        g_idx = torch.empty(inp, dtype=torch.long)
        g_idx[order] = torch.arange(inp) // g
    q = int4.quantize(w, g, symmetric, g_idx=g_idx, scale_dtype=torch.float16)
    zeros = q.zero_point if q.zero_point is not None else torch.full_like(q.scale, 8, dtype=torch.uint8)
    qzeros = pack_columns(zeros.T)
    if v1:  # GPTQModel's v2 -> v1: one subtracted from each zero, as a word subtraction
        qzeros = _to_int32(qzeros.long() - V1_OFFSET)
    return {"qweight": pack_rows(_codes(q).T), "qzeros": qzeros, "scales": q.scale.T.half().contiguous(),
            "g_idx": g_idx.to(torch.int32)}


def gptq_weight(t: dict[str, torch.Tensor], inp: int, v1: bool) -> torch.Tensor:
    """The GPTQ formula on one module's tensors: W [out, in] fp32."""
    out = t["scales"].shape[1]
    q = unpack_rows(t["qweight"], inp)  # [in, out]
    words = t["qzeros"].long() + (V1_OFFSET if v1 else 0)
    z = unpack_columns(words & 0xFFFFFFFF, out)  # [G, out]
    g = t["g_idx"].long()
    return (t["scales"].float()[g] * (q - z[g]).float()).T


def write_gptq_checkpoint(model, path: str, group: int | None = 32, symmetric: bool = True,
                          act_order: bool = False, v1: bool = True, skip: tuple[str, ...] = ()) -> dict:
    """`skip`: module name parts left in 16 bits without the config saying so (GPTQModel's Trinity definition leaves
    attention's output gate, `self_attn.gate_proj`)."""
    import transformers

    tensors = _float_tensors(model, path)
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name, w in tensors.items():
        if not quantized_name(name, skip=skip):
            out[name] = w
            continue
        for part, t in gptq_tensors(w, group, symmetric, act_order, v1, generator).items():
            out[f"{name.removesuffix('.weight')}.{part}"] = t
    config = transformers.GPTQConfig(bits=4, group_size=group or -1, desc_act=act_order, sym=symmetric,
                                     checkpoint_format="gptq" if v1 else "gptq_v2").to_dict()
    _finish(path, out, config)
    return out


# ------------------------------------------------------------------------------------------------ layouts
def stack_experts(path: str, num_experts: int, parts: tuple[str, ...], gate_up: bool = False) -> None:
    """Rewrite a checkpoint's per-expert 4-bit tensors as stacked ones: `mlp.experts.{proj}.{part}` [E, ...]
    (`gate_up`: gate and up concatenated along the output dimension into one `gate_up_proj`)."""
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    experts = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")
    prefixes = {m[1] for m in map(experts.match, tensors) if m}
    for prefix in prefixes:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for part in parts:
                tensors[f"{prefix}.{proj}.{part}"] = torch.stack(
                    [tensors.pop(f"{prefix}.{e}.{proj}.{part}") for e in range(num_experts)])
        if gate_up:
            for part in parts:
                gate, up = tensors.pop(f"{prefix}.gate_proj.{part}"), tensors.pop(f"{prefix}.up_proj.{part}")
                if part == "weight_shape":
                    tensors[f"{prefix}.gate_up_proj.{part}"] = torch.tensor([num_experts, 2 * gate[0, 0], gate[0, 1]])
                elif part in ("g_idx",):
                    tensors[f"{prefix}.gate_up_proj.{part}"] = gate
                else:  # the output dimension: rows of [out, ...] (compressed-tensors), columns of [..., out] (GPTQ)
                    dim = 1 if part in ("weight_packed", "weight_scale", "weight_zero_point") else 2
                    tensors[f"{prefix}.gate_up_proj.{part}"] = torch.cat([gate, up], dim=dim)
    for name in [n for n in tensors if n.endswith("weight_shape") and tensors[n].dim() == 2]:
        tensors[name] = torch.tensor([tensors[name].shape[0], *tensors[name][0].tolist()])
    save_file(tensors, file, metadata={"format": "pt"})


def int4_module_bytes(model) -> tuple[int, int, int]:
    """(bytes of the 4-bit modules' codes, of all their parameters, weights they hold)."""
    from trinity.quant.int4_modules import Int4Experts, Int4Linear

    codes = total = weights = 0
    for module in model.modules():
        if isinstance(module, (Int4Linear, Int4Experts)):
            for name, p in module.named_parameters(recurse=False):
                total += p.numel() * p.element_size()
                if not name.endswith(("_scale", "_zero_point", "_g_idx")):
                    codes += p.numel() * p.element_size()
            parts = [module.packed()] if isinstance(module, Int4Linear) else list(module.packed())
            weights += sum(w.codes.shape[:-1].numel() * w.in_features for w in parts)
    return codes, total, weights

