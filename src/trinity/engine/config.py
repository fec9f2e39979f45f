"""EngineConfig: the engine's settings, defined once.

`trinity serve`'s flags (`add_cli_arguments` / `from_cli_args`) and `LLM(...)`'s keywords (`from_kwargs`,
`signature_parameters`) are derived from the fields below: a new field with a `help` in its metadata gets a flag
(`--field-name`, vLLM's spelling; a bool gets `--x` / `--no-x`) and a keyword with no other edit. Metadata keys:
`help` (the flag's help text) and optionally `flags` (the option strings, where they are not `--field-name`) and
`choices` (the values the flag takes).

Plain Python: importing this module loads no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import numbers
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class EngineConfigError(ValueError):
    """A setting the engine cannot take; the message names the setting, the value and what is allowed."""

    def __init__(self, name: str, value: Any, allowed: str):
        super().__init__(f"{name} = {value!r} is invalid: {allowed}")
        self.name, self.value, self.allowed = name, value, allowed


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
CPU_FAIR_SHARE_SEQS = 4  # fair_share_seqs' default on the CPU (benchmarks/README.md, fairness)


def _setting(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass(slots=True)
class EngineConfig:
    max_model_len: int | None = _setting(
        None, "longest sequence (prompt + output) in tokens (default: the model's max_position_embeddings)")
    max_num_seqs: int = _setting(128, "most sequences running at once")
    # While a small request (at most this many sequences) is in flight, a big one (n > 1, a prompt list) holds at
    # most this many running; its others are paused (KV kept) or kept waiting until no small request is left: on the
    # CPU a decode step costs in proportion to the batch, so a big request's sequences slow every other client's
    # steps. Big requests among themselves are not capped. None: 4 on the CPU, no cap on a GPU (a step of 128
    # decodes costs about what one does there); 0: no cap.
    fair_share_seqs: int | None = _setting(
        None, "while a request of at most this many sequences is in flight, the most sequences a bigger one may hold "
              f"running (default: {CPU_FAIR_SHARE_SEQS} on the CPU, no cap on a GPU; 0: no cap)")
    max_num_batched_tokens: int = _setting(2048, "most tokens computed in one step (prefill chunks included)")
    block_size: int = _setting(16, "tokens per KV cache block")
    num_kv_blocks: int | None = _setting(None, "exact KV blocks per pool (overrides memory)")
    kv_cache_memory: int | None = _setting(None, "KV cache budget in bytes")
    gpu_memory_utilization: float = _setting(
        0.9, "share of the GPU's memory the engine may fill (weights, KV cache, activations), in (0, 1]")
    enforce_eager: bool = _setting(
        False, "no CUDA graphs for decode (they are captured only on CUDA with the Triton kernels)")
    seed: int | None = _setting(0, "seed of the sampler's default generator")
    # Look-ahead decoding: launch the next decode step before reading this one's tokens, so the host's work on a
    # step overlaps the device's. None: on where the model runs asynchronously (CUDA); True forces it anywhere.
    async_scheduling: bool | None = _setting(
        None, "look-ahead decoding: queue the next decode step before reading this one's tokens "
              "(default: on for CUDA)")
    # Automatic prefix caching: a prompt whose leading blocks were computed before (a shared system prompt, the
    # earlier turns of a chat) takes their K/V from the cache instead of computing them again.
    enable_prefix_caching: bool = _setting(
        True, "take the K/V of prompt blocks computed before (shared system prompts, earlier chat turns) from the "
              "cache")

    # Tensor parallelism (`trinity.parallel`): the model split over this many processes, one per GPU (CPU processes
    # with gloo elsewhere); rank 0 runs the scheduler, KV manager and sampler.
    tensor_parallel_size: int = _setting(
        1, "processes (one per GPU) the model is split over; under torchrun, the world size",
        flags=("--tensor-parallel-size", "-tp"))
    enable_expert_parallel: bool = _setting(
        False, "with tensor parallelism: each rank holds num_experts / tp whole experts instead of a slice of every "
               "expert")

    # The KV cache's storage: "auto" = the model's dtype; FP8 halves a bf16 cache (e4m3 with a per-layer scale, or
    # e5m2), dequantized on read by every attention path.
    kv_cache_dtype: str = _setting(
        "auto", "KV cache storage: auto (the model's dtype), fp8 (= fp8_e4m3), fp8_e4m3, fp8_e5m2",
        choices=KV_CACHE_DTYPES)

    def fair_share_for(self, device_type: str) -> int | None:
        """The cap `fair_share_seqs` means on a device ("cpu", "cuda", ...): None for no cap."""
        if self.fair_share_seqs is None:
            return CPU_FAIR_SHARE_SEQS if device_type == "cpu" else None
        return self.fair_share_seqs or None

    def __post_init__(self) -> None:
        # Only values that failed later anyway (with a less helpful error) are refused here: inputs that worked
        # before keep working (e.g. max_model_len=0 still means the model's limit; gpu_memory_utilization is
        # checked by the runner where it is used, on CUDA).
        if self.max_model_len is not None and not (_is_real(self.max_model_len) and self.max_model_len >= 0):
            raise EngineConfigError("max_model_len", self.max_model_len,
                                    "must be an integer >= 1, or None for the model's max_position_embeddings")
        for name in ("max_num_seqs", "block_size"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 1):
                raise EngineConfigError(name, value, "must be an integer >= 1")
        if self.fair_share_seqs is not None and not (_is_int(self.fair_share_seqs) and self.fair_share_seqs >= 0):
            raise EngineConfigError("fair_share_seqs", self.fair_share_seqs,
                                    "must be an integer >= 1, 0 for no cap, or None for the device's default")
        if not (_is_real(self.max_num_batched_tokens) and self.max_num_batched_tokens >= 1):
            raise EngineConfigError("max_num_batched_tokens", self.max_num_batched_tokens, "must be an integer >= 1")
        if self.num_kv_blocks is not None and not (_is_int(self.num_kv_blocks) and self.num_kv_blocks >= 1):
            raise EngineConfigError("num_kv_blocks", self.num_kv_blocks,
                                    "must be an integer >= 1, or None to size the pools from memory")
        if self.kv_cache_memory is not None and not (
                _is_int(self.kv_cache_memory) and (self.kv_cache_memory >= 1 or self.num_kv_blocks is not None)):
            raise EngineConfigError("kv_cache_memory", self.kv_cache_memory,
                                    "must be a whole number of bytes >= 1, or None for the default budget")
        if not (_is_int(self.tensor_parallel_size) and self.tensor_parallel_size >= 1):
            raise EngineConfigError("tensor_parallel_size", self.tensor_parallel_size, "must be an integer >= 1")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise EngineConfigError("kv_cache_dtype", self.kv_cache_dtype, f"allowed: {', '.join(KV_CACHE_DTYPES)}")
        if self.seed is not None and not _is_int(self.seed):
            raise EngineConfigError("seed", self.seed, "must be an integer, or None for a random seed")

    # ------------------------------------------------------------------ derived interfaces
    @classmethod
    def add_cli_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """One option per field: `--field-name` (or the field's `flags`), typed from the annotation; bools take
        `--x` / `--no-x` (a bool | None field stays None unless one is given)."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            base = _base_type(hints[f.name])
            flags = f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
            kw: dict[str, Any] = {"dest": f.name, "default": f.default, "help": f.metadata.get("help")}
            if base is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = base
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            parser.add_argument(*flags, **kw)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineConfig:
        """The config from parsed `add_cli_arguments` options; an invalid value's message names its flag."""
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        try:
            return cls(**{name: getattr(args, name) for name in by_name if hasattr(args, name)})
        except EngineConfigError as e:
            flag = (by_name[e.name].metadata.get("flags") or ("--" + e.name.replace("_", "-"),))[0]
            raise EngineConfigError(flag, e.value, e.allowed) from None

    @classmethod
    def from_kwargs(cls, caller: str = "EngineConfig", /, **kwargs: Any) -> EngineConfig:
        """The config from keyword arguments named as the fields; an unknown name is a TypeError that lists the
        known ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"{caller}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; the "
                            f"engine settings are: {', '.join(names)}")
        return cls(**kwargs)

    @classmethod
    def signature_parameters(cls) -> list[inspect.Parameter]:
        """The fields as keyword-only parameters with their defaults and annotations (for a derived signature)."""
        hints = typing.get_type_hints(cls)
        return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                  annotation=hints[f.name]) for f in dataclasses.fields(cls)]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real)


def _base_type(hint: Any) -> type:
    """int | None -> int; bool -> bool: the type a flag's value converts to."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"cannot derive a flag from the annotation {hint!r}")
        hint = args[0]
    if hint not in (bool, int, float, str):
        raise TypeError(f"cannot derive a flag from the annotation {hint!r}")
    return hint
