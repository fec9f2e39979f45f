"""Writing FP8 checkpoints in the real compressed-tensors format, with the compressed-tensors library's own compressor.

`write_fp8_checkpoint(model, path, strategy, ...)` saves a float Trinity model as HF safetensors, then replaces every
quantized projection's weight by what `FloatQuantizationCompressor.compress` makes of it (the library's rounding and
saturation) given block scales computed here (absolute maximum / 448 per block, or powers of two for E8M0 scales),
adds the `weight_scale` tensors and the `quantization_config` a compressed-tensors export carries.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors.torch import load_file, save_file

IGNORE = ["lm_head", "re:.*mlp\\.router\\.gate$"]


def block_of(strategy: str, shape: tuple[int, int], block_structure=(128, 128)) -> tuple[int, int]:
    return {"block": tuple(block_structure), "channel": (1, shape[1]), "tensor": tuple(shape)}[strategy]


def scales_for(w: torch.Tensor, block: tuple[int, int], e8m0: bool) -> torch.Tensor:
    rows, cols = math.ceil(w.shape[0] / block[0]), math.ceil(w.shape[1] / block[1])
    padded = torch.zeros(rows * block[0], cols * block[1])
    padded[:w.shape[0], :w.shape[1]] = w.float().abs()
    amax = padded.view(rows, block[0], cols, block[1]).amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / 448.0
    return torch.exp2(torch.ceil(torch.log2(scale))) if e8m0 else scale  # E8M0 holds powers of two only


def quantized_name(name: str, quantize_experts: bool) -> bool:
    module = name.removesuffix(".weight")
    if not name.endswith("proj.weight") or any(re.match(p[3:], module) if p.startswith("re:") else p == module
                                                for p in IGNORE):
        return False
    return quantize_experts or ".mlp.experts." not in name


def write_fp8_checkpoint(model, path: str, strategy: str = "block", block_structure=(128, 128),
                         scale_dtype: torch.dtype = torch.float32, quantize_experts: bool = True,
                         activations: dict | None = None) -> dict[str, torch.Tensor]:
    """Save `model` (float) at `path` as a compressed-tensors FP8 checkpoint; returns the tensors written."""
    model.save_pretrained(path, expert_layout="per_expert")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    wargs = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False,
                             block_structure=list(block_structure) if strategy == "block" else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=wargs)
    out = {}
    for name, w in tensors.items():
        if not quantized_name(name, quantize_experts):
            out[name] = w
            continue
        scale = scales_for(w, block_of(strategy, tuple(w.shape), block_structure), scale_dtype == torch.float8_e8m0fnu)
        if strategy == "tensor":
            scale = scale.reshape(1)  # as compressed-tensors stores a tensor-wide scale
        compressed = FloatQuantizationCompressor.compress({"weight": w.float(), "weight_scale": scale}, scheme)
        out[name] = compressed["weight"]
        out[name.removesuffix(".weight") + ".weight_scale"] = scale.to(scale_dtype)
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    ignore = IGNORE + ([] if quantize_experts else ["re:.*mlp\\.experts\\..*"])
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": wargs.model_dump(),
                                      "input_activations": activations, "format": "float-quantized"}},
        "ignore": ignore}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return out


def library_dequantized(tensors: dict[str, torch.Tensor], name: str, strategy: str,
                        block_structure=(128, 128)) -> torch.Tensor:
    """The compressed-tensors library's own decompression of one quantized weight (fp32)."""
    wargs = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False,
                             block_structure=list(block_structure) if strategy == "block" else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=wargs)
    state = {"weight": tensors[name], "weight_scale": tensors[name.removesuffix(".weight") + ".weight_scale"].float()}
    return FloatQuantizationCompressor.decompress(state, scheme)["weight"].float()
