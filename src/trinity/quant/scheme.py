"""Which weights are quantized and how: a checkpoint's `quantization_config` (compressed-tensors), or online FP8.

Supported, from compressed-tensors (`quant_method: compressed-tensors`, format `float-quantized`, also given per
group): FP8 (8-bit float, symmetric) weights with strategy `block` (any `block_structure`, partial edge blocks),
`channel` or `tensor`, static; activations none, or 8-bit float with strategy `token`, `group` or `tensor`, dynamic
or static (the reference path emulates them); groups targeting `Linear`; the `ignore` list (exact module names and
`re:` patterns). Everything else in a `quantization_config` is refused with an error naming the field and value:
a checkpoint is never run other than as it was made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

ONLINE_BLOCK = (128, 128)  # `--quantization fp8`: DeepSeek-V3's and Trinity's FP8-Block checkpoints' blocks


class QuantizationError(ValueError):
    """A quantization_config (or setting) this engine cannot run; the message names the field and value."""


@dataclass(frozen=True)
class WeightScheme:
    strategy: str  # "block", "channel" or "tensor"
    block_structure: tuple[int, int] | None = None  # strategy block

    def block(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The scale grid's block for a weight of [out, in] (`fp8.grid`)."""
        if self.strategy == "block":
            return self.block_structure
        if self.strategy == "channel":
            return (1, shape[1])
        return tuple(shape)  # tensor: one block


@dataclass(frozen=True)
class ActivationScheme:
    strategy: str  # "token", "group" or "tensor"
    dynamic: bool
    group_size: int | None = None


@dataclass
class QuantConfig:
    weights: WeightScheme  # or `int4_scheme.Int4Scheme` (4-bit weights)
    activations: ActivationScheme | None = None
    ignore: list[str] = field(default_factory=list)
    online: bool = False  # quantized while loading a higher-precision checkpoint
    # The modules the checkpoint quantizes, where its config does not list them (AWQ, GPTQ: the modules with a
    # `qweight`, `int4_load.checkpoint_modules`); None: every module the ignore list leaves.
    only: frozenset[str] | None = None

    @property
    def int4(self) -> bool:
        return getattr(self.weights, "int4", False)

    @classmethod
    def online_fp8(cls) -> QuantConfig:
        """`--quantization fp8`: block-scaled weights (128 x 128), activations kept as they are; the router and the
        LM head stay in the model's dtype (as every published Trinity FP8 checkpoint keeps them)."""
        return cls(WeightScheme("block", ONLINE_BLOCK), None, ["lm_head", "re:.*mlp\\.router\\.gate$"], online=True)

    def ignored(self, module: str) -> bool:
        if self.only is not None and module not in self.only:
            return True
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], module):
                    return True
            elif pattern == module:
                return True
        return False

    def to_hf(self) -> dict[str, Any]:
        """The compressed-tensors `quantization_config` of a checkpoint quantized this way."""
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                   "strategy": self.weights.strategy,
                   "block_structure": list(self.weights.block_structure) if self.weights.block_structure else None}
        acts = None
        if self.activations is not None:
            acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": self.activations.dynamic,
                    "strategy": self.activations.strategy, "group_size": self.activations.group_size}
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                              "format": "float-quantized"}},
                "ignore": list(self.ignore)}


def _refuse(field_name: str, value: Any, allowed: str) -> None:
    raise QuantizationError(f"quantization_config {field_name} = {value!r} is not supported: {allowed}")


# keys of a compressed-tensors config that carry no instruction for running the model
_INFORMATIONAL = {"quant_method", "format", "config_groups", "ignore", "quantization_status",
                  "global_compression_ratio", "version", "sparsity_config", "transform_config", "kv_cache_scheme",
                  "moe_sparsity_config"}
_ARG_KEYS = {"num_bits", "type", "symmetric", "strategy", "block_structure", "group_size", "dynamic", "observer",
             "observer_kwargs", "actorder", "scale_dtype", "zp_dtype"}


# `--quantization` values that name a quantized checkpoint's method (vLLM's spelling -> its quant_method): accepted
# when the checkpoint says the same, which loads it as it would load without the flag
CHECKPOINT_METHODS = {"awq": "awq", "gptq": "gptq", "compressed-tensors": "compressed-tensors",
                      "compressed_tensors": "compressed-tensors"}
QUANTIZATION_CHOICES = ["fp8", *CHECKPOINT_METHODS]


def from_hf(config: dict | None) -> QuantConfig | None:
    """A checkpoint's `quantization_config` (None: not quantized) -> QuantConfig, or QuantizationError."""
    if not config:
        return None
    from .int4_scheme import from_hf as int4_from_hf, int4_method

    if int4_method(config):  # AWQ, GPTQ, compressed-tensors pack-quantized
        return int4_from_hf(config)
    method = config.get("quant_method")
    if method != "compressed-tensors":
        _refuse("quant_method", method, "compressed-tensors (FP8 or pack-quantized int4), awq and gptq are")
    for key in config:
        if key not in _INFORMATIONAL:
            _refuse(key, config[key], "unknown field")
    if config.get("sparsity_config"):
        _refuse("sparsity_config", config["sparsity_config"], "sparse checkpoints are not")
    if config.get("transform_config"):
        _refuse("transform_config", config["transform_config"], "transformed (rotated) checkpoints are not")
    kv = config.get("kv_cache_scheme")
    if kv and not (kv.get("num_bits") == 8 and kv.get("type") == "float" and kv.get("strategy") == "tensor"
                   and not kv.get("dynamic", False)):
        _refuse("kv_cache_scheme", kv, "FP8 per-tensor static scales (k_scale / v_scale, taken by "
                                       "--kv-cache-dtype fp8_e4m3) are")
    groups = config.get("config_groups") or {}
    if not groups:
        _refuse("config_groups", groups, "at least one group is needed")
    schemes = []
    for name, group in groups.items():
        fmt = group.get("format") or config.get("format")
        if fmt != "float-quantized":
            _refuse(f"config_groups.{name}.format", fmt, "float-quantized (FP8) is")
        targets = group.get("targets")
        if targets != ["Linear"]:
            _refuse(f"config_groups.{name}.targets", targets, "['Linear'] is")
        if group.get("output_activations"):
            _refuse(f"config_groups.{name}.output_activations", group["output_activations"], "none are")
        schemes.append((_weights(name, group.get("weights")), _activations(name, group.get("input_activations"))))
    if any(s != schemes[0] for s in schemes[1:]):
        _refuse("config_groups", list(groups), "groups with different schemes are not")
    ignore = config.get("ignore") or []
    return QuantConfig(schemes[0][0], schemes[0][1], list(ignore))


def _check_args(where: str, args: dict) -> None:
    for key in args:
        if key not in _ARG_KEYS:
            _refuse(f"{where}.{key}", args[key], "unknown field")
    if args.get("num_bits") != 8 or args.get("type") != "float":
        _refuse(f"{where}.num_bits/type", (args.get("num_bits"), args.get("type")), "8-bit float (FP8) is")
    if args.get("symmetric", True) is not True:
        _refuse(f"{where}.symmetric", args.get("symmetric"), "symmetric (no zero point) is")


def _weights(group: str, args: dict | None) -> WeightScheme:
    where = f"config_groups.{group}.weights"
    if not args:
        _refuse(where, args, "quantized weights are needed")
    _check_args(where, args)
    if args.get("dynamic", False):
        _refuse(f"{where}.dynamic", args["dynamic"], "static weight scales are")
    strategy = args.get("strategy")
    if strategy == "block":
        block = args.get("block_structure")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                             for b in block)):
            _refuse(f"{where}.block_structure", block, "two positive integers are needed")
        return WeightScheme("block", (block[0], block[1]))
    if strategy in ("channel", "tensor"):
        return WeightScheme(strategy)
    _refuse(f"{where}.strategy", strategy, "block, channel and tensor are")


def _activations(group: str, args: dict | None) -> ActivationScheme | None:
    if not args:
        return None
    where = f"config_groups.{group}.input_activations"
    _check_args(where, args)
    strategy = args.get("strategy")
    if strategy not in ("token", "group", "tensor"):
        _refuse(f"{where}.strategy", strategy, "token, group and tensor are")
    dynamic = bool(args.get("dynamic", False))
    if strategy != "tensor" and not dynamic:
        _refuse(f"{where}.dynamic", False, f"static activation scales only per tensor, not per {strategy}")
    size = args.get("group_size") if strategy == "group" else None
    if strategy == "group" and not (isinstance(size, int) and size > 0):
        _refuse(f"{where}.group_size", size, "a positive integer is needed")
    return ActivationScheme(strategy, dynamic, size)
