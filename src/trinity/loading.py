"""Resolve what the user names as a model (a checkpoint folder or a preset) to a model and its tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import PRESETS, TrinityConfig, preset
from .model import TrinityForCausalLM
from .tokenizer import TrinityTokenizer, build_byte_level_tokenizer

# The built-in model: a tiny Trinity trained by this project (`make tiny-model`), shipped as package data.
BUILTIN_MODEL = "trinity-tiny"
DEFAULT_MODEL = BUILTIN_MODEL


def builtin_model_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", BUILTIN_MODEL)


@dataclass(slots=True)
class LoadedModel:
    name: str
    model: TrinityForCausalLM
    tokenizer: TrinityTokenizer

    @property
    def stop_token_ids(self) -> list[int]:
        return sorted(set(self.tokenizer.eos_token_ids) | set(self.model.config.eos_token_ids))


def _unknown_model(spec: str) -> str:
    return (f"model {spec!r} is neither a local checkpoint folder nor a preset ({', '.join(PRESETS)}); download a "
            "Trinity checkpoint first and pass its folder")


def model_config(spec: str | None) -> TrinityConfig:
    """The config of what `load_model(spec)` would load, without loading weights."""
    spec = spec or DEFAULT_MODEL
    if spec == BUILTIN_MODEL:
        spec = builtin_model_path()
    if os.path.isdir(spec):
        return TrinityConfig.from_pretrained(spec)
    if spec in PRESETS:
        return preset(spec)
    raise FileNotFoundError(_unknown_model(spec))


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(spec: str | None = None, dtype: str | torch.dtype | None = "auto", device: str | None = "auto",
               seed: int = 0, shard=None, quantization: str | None = None) -> LoadedModel:
    """`spec`: `trinity-tiny` (the built-in model, the default), a local checkpoint folder (config.json,
    safetensors, tokenizer.json) or a preset name (random weights from `seed` with a byte-level tokenizer: for
    trying the machinery, not for real text). `shard`: config -> a tensor-parallel rank's
    `parallel.sharding.ShardPlan`; the model is then that rank's part (a checkpoint's other slices are not read).
    `quantization="fp8"` (or `dtype="fp8"`, vLLM's alias) quantizes the weights to FP8 while loading; a checkpoint
    with an FP8 `quantization_config` loads as FP8 without it."""
    if dtype == "fp8":
        dtype, quantization = "auto", quantization or "fp8"
    spec = spec or DEFAULT_MODEL
    dev = resolve_device(device)
    if spec == BUILTIN_MODEL:
        path = builtin_model_path()
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"the built-in model is missing from {path}; `make tiny-model` rebuilds it")
        loaded = load_model(path, dtype=dtype, device=device, seed=seed, shard=shard, quantization=quantization)
        loaded.name = BUILTIN_MODEL
        return loaded
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "tokenizer.json")):
            raise FileNotFoundError(f"{spec} has no tokenizer.json; copy the model's tokenizer files beside the weights")
        plan = shard(TrinityConfig.from_pretrained(spec)) if shard is not None else None
        model = TrinityForCausalLM.from_pretrained(spec, dtype=dtype, device=dev, shard=plan, quantization=quantization)
        tokenizer = TrinityTokenizer.from_pretrained(spec)
        name = os.path.basename(os.path.normpath(spec))
    elif spec in PRESETS:
        from .model.checkpoint import resolve_dtype

        cfg = preset(spec)
        model = TrinityForCausalLM.random(cfg, dtype=resolve_dtype(dtype, cfg, dev), device=dev, seed=seed).eval()
        if shard is not None:  # random weights: made whole (the same on every rank), then cut
            from .parallel.sharding import shard_model
            shard_model(model, shard(cfg))
        if quantization not in (None, "none"):
            from .model.checkpoint import quant_config_for
            from .quant.modules import quantize_model
            quantize_model(model, quant_config_for(cfg, quantization))
        tokenizer = build_byte_level_tokenizer()
        name = spec
    else:
        raise FileNotFoundError(_unknown_model(spec))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    return LoadedModel(name, model, tokenizer)
