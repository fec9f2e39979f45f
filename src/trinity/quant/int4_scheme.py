"""4-bit weight-only (W4A16) schemes from a checkpoint's `quantization_config`: AWQ, GPTQ and compressed-tensors
`pack-quantized`. What cannot run as it was made is refused with an error naming the field and value.

- AWQ (`quant_method: awq`): `bits` 4, `version` (or `format`) gemm, `zero_point` true, any `group_size`;
  `modules_to_not_convert` as HF transformers and compressed-tensors read it (a module whose name contains an entry
  stays in 16 bits), and the LM head is never quantized.
- GPTQ (`quant_method: gptq`): `bits` 4, `checkpoint_format` (or `format`) gptq (v1 zeros) or gptq_v2, `sym`,
  `desc_act` (activation order: g_idx), `group_size` (-1: one group per row), `pack_dtype` int32; `lm_head` false
  keeps the head in 16 bits; GPTQModel's `dynamic` only as exclusions ("-:pattern").
- compressed-tensors (`format: pack-quantized`, per group too): weights `num_bits` 4, `type` int, `strategy` group
  (with `group_size`) or channel, symmetric or not, static; no input activations; the `ignore` list.

AWQ and GPTQ configs do not list every module they leave alone (GPTQModel's Trinity definition skips attention's
output gate, for one): which modules are 4-bit is what the checkpoint holds (`<module>.qweight`), checked against
the config's own exclusions (`QuantConfig.only`). Their many other fields (calibration settings, kernel choices,
tool metadata) carry nothing the weights' values depend on and are not checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from .scheme import _ARG_KEYS, _INFORMATIONAL, QuantConfig, QuantizationError, _refuse

FORMATS = ("awq", "gptq", "pack-quantized")


@dataclass(frozen=True)
class Int4Scheme:
    format: str  # the checkpoint's tensors (`int4_formats.PARTS`), converted to the canonical layout at load
    group_size: int | None  # columns per scale; None: one group per row (per channel)
    symmetric: bool
    act_order: bool = False  # GPTQ desc_act: each column's group from g_idx
    gptq_v1: bool = False  # GPTQ checkpoint_format gptq: zero points stored minus one

    int4: ClassVar[bool] = True

    def group(self, in_features: int) -> int:
        return self.group_size or in_features

    def block(self, shape: tuple[int, int]) -> tuple[int, int]:
        """FP8's block (`WeightScheme.block`), asked by tensor parallelism's scale splitting: int4 does not split."""
        raise QuantizationError("int4 (W4A16) weights do not support tensor parallelism yet; load them with "
                                "tensor_parallel_size 1")


def int4_method(config: dict) -> bool:
    """Whether a quantization_config is one of the 4-bit formats (for `scheme.from_hf`)."""
    method = config.get("quant_method")
    if method in ("awq", "gptq"):
        return True
    if method != "compressed-tensors":
        return False
    groups = config.get("config_groups") or {}
    formats = {g.get("format") or config.get("format") for g in groups.values() if isinstance(g, dict)}
    return "pack-quantized" in formats or (not groups and config.get("format") == "pack-quantized")


def from_hf(config: dict) -> QuantConfig:
    method = config.get("quant_method")
    if method == "awq":
        return _awq(config)
    if method == "gptq":
        return _gptq(config)
    return _compressed_tensors(config)


def _group_size(field_name: str, value: Any, channel_value: Any = None) -> int | None:
    if channel_value is not None and value == channel_value:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _refuse(field_name, value, "a positive number of columns" + (f" or {channel_value}" if channel_value else "")
                + " is needed")
    return value


def _flag(config: dict, key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        _refuse(key, value, "true or false is needed")
    return value


def _substrings(names) -> list[str]:
    """HF's `modules_to_not_convert`: a module whose name contains an entry stays unquantized."""
    if names is None:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        _refuse("modules_to_not_convert", names, "a list of module names is needed")
    return [f"re:.*{re.escape(n)}" for n in names]


def _bits(config: dict, bits: Any) -> None:
    if bits != 4:  # (named with the method: an 8-bit GPTQ is another format to this engine)
        _refuse("quant_method", config.get("quant_method"), f"with bits = {bits!r}; 4-bit weights are")


# ------------------------------------------------------------------------------------------------ AWQ
def _awq(config: dict) -> QuantConfig:
    _bits(config, config.get("bits", config.get("w_bit", 4)))
    version = config.get("version") or config.get("format") or "gemm"
    if not isinstance(version, str) or version.lower() != "gemm":
        _refuse("version", version, "gemm (AutoAWQ's WQLinear_GEMM packing) is")
    if config.get("zero_point", True) is not True:
        _refuse("zero_point", config.get("zero_point"), "true (AWQ GEMM stores zero points) is")
    group = _group_size("group_size", config.get("group_size") or config.get("q_group_size") or 128)
    ignore = ["lm_head"] + _substrings(config.get("modules_to_not_convert"))
    return QuantConfig(Int4Scheme("awq", group, symmetric=False), None, ignore)


# ------------------------------------------------------------------------------------------------ GPTQ
def _gptq(config: dict) -> QuantConfig:
    _bits(config, config.get("bits"))
    fmt = config.get("checkpoint_format") or config.get("format") or "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        _refuse("checkpoint_format", fmt, "gptq (v1) and gptq_v2 are")
    if config.get("is_marlin_format"):
        _refuse("is_marlin_format", config["is_marlin_format"], "the GPTQ packing (false) is")
    if config.get("method", "gptq") != "gptq":
        _refuse("method", config["method"], "gptq is")
    pack_dtype = config.get("pack_dtype", "int32")
    if str(pack_dtype).removeprefix("torch.") != "int32":
        _refuse("pack_dtype", pack_dtype, "int32 is")
    for key in ("rotation", "activation"):  # GPTQModel: rotated weights, or quantized activations
        if config.get(key):
            _refuse(key, config[key], "none is")
    dynamic = config.get("dynamic") or {}
    for pattern, overrides in dynamic.items():
        if not str(pattern).startswith("-:") and overrides:
            _refuse(f"dynamic[{pattern!r}]", overrides, "per-module overrides are not; exclusions ('-:pattern') are")
    group = _group_size("group_size", config.get("group_size", 128), channel_value=-1)
    ignore = [] if _flag(config, "lm_head", False) else ["lm_head"]
    ignore += _substrings(config.get("modules_to_not_convert"))
    scheme = Int4Scheme("gptq", group, symmetric=_flag(config, "sym", True), act_order=_flag(config, "desc_act", False),
                        gptq_v1=fmt == "gptq")
    return QuantConfig(scheme, None, ignore)


# ------------------------------------------------------------------------------------------------ compressed-tensors
def _compressed_tensors(config: dict) -> QuantConfig:
    for key in config:
        if key not in _INFORMATIONAL:
            _refuse(key, config[key], "unknown field")
    for key in ("sparsity_config", "transform_config"):
        if config.get(key):
            _refuse(key, config[key], "none with 4-bit weights is")
    kv = config.get("kv_cache_scheme")
    if kv and not (kv.get("num_bits") == 8 and kv.get("type") == "float" and kv.get("strategy") == "tensor"
                   and not kv.get("dynamic", False)):
        _refuse("kv_cache_scheme", kv, "FP8 per-tensor static scales (taken by --kv-cache-dtype fp8_e4m3) are")
    groups = config.get("config_groups") or {}
    if not groups:
        _refuse("config_groups", groups, "at least one group is needed")
    schemes = []
    for name, group in groups.items():
        fmt = group.get("format") or config.get("format")
        if fmt != "pack-quantized":
            _refuse(f"config_groups.{name}.format", fmt, "pack-quantized in every group (no mixed formats) is")
        if group.get("targets") != ["Linear"]:
            _refuse(f"config_groups.{name}.targets", group.get("targets"), "['Linear'] is")
        for acts in ("input_activations", "output_activations"):
            if group.get(acts):
                _refuse(f"config_groups.{name}.{acts}", group[acts], "none (weight-only W4A16) is")
        schemes.append(_ct_weights(name, group.get("weights")))
    if any(s != schemes[0] for s in schemes[1:]):
        _refuse("config_groups", list(groups), "groups with different schemes are not")
    return QuantConfig(schemes[0], None, list(config.get("ignore") or []))


def _ct_weights(group: str, args: dict | None) -> Int4Scheme:
    where = f"config_groups.{group}.weights"
    if not args:
        _refuse(where, args, "quantized weights are needed")
    for key in args:
        if key not in _ARG_KEYS:
            _refuse(f"{where}.{key}", args[key], "unknown field")
    if args.get("type") != "int":
        # (named as the format: pack-quantized is the int packing, whatever else the group says)
        _refuse("format", "pack-quantized", f"with {where}.type = {args.get('type')!r}; pack-quantized weights are "
                                            "int")
    if args.get("num_bits") != 4:
        _refuse(f"{where}.num_bits", args.get("num_bits"), "4 is")
    if args.get("dynamic", False):
        _refuse(f"{where}.dynamic", args["dynamic"], "static weight scales are")
    if args.get("actorder") not in (None, "weight", "static"):
        _refuse(f"{where}.actorder", args["actorder"], "none or weight (no g_idx) are")
    symmetric = args.get("symmetric", True)
    if not isinstance(symmetric, bool):
        _refuse(f"{where}.symmetric", symmetric, "true or false is needed")
    strategy = args.get("strategy")
    if strategy == "group":
        return Int4Scheme("pack-quantized", _group_size(f"{where}.group_size", args.get("group_size")), symmetric)
    if strategy == "channel":
        return Int4Scheme("pack-quantized", None, symmetric)
    _refuse(f"{where}.strategy", strategy, "group and channel are")
