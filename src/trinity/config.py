"""TrinityConfig: the HF `config.json` of an `AfmoeForCausalLM` checkpoint, validated.

Every key a released Trinity config carries is a field here; keys we do not know are kept in
`extra` and written back unchanged, so a load/save round trip loses nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

LAYER_TYPES = ("sliding_attention", "full_attention")

# Keys that HF writes or reads but that carry no meaning for our model code: dropped on read
# (and regenerated on write) so that they do not pile up in `extra`.
_DERIVED_KEYS = {"architectures", "model_type", "rope_parameters", "torch_dtype", "dtype"}


class ConfigError(ValueError):
    """A config value that the Trinity architecture cannot take; the message names key, value and what is allowed."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config key {key!r} = {value!r} is invalid: {allowed}")


@dataclass(slots=True)
class TrinityConfig:
    vocab_size: int = 200192
    hidden_size: int = 2048
    intermediate_size: int = 6144
    moe_intermediate_size: int = 1024
    num_hidden_layers: int = 32
    num_dense_layers: int = 2
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # MoE
    num_experts: int = 128
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    score_func: str = "sigmoid"
    route_norm: bool = True
    route_scale: float = 2.826
    n_group: int = 1
    topk_group: int = 1
    load_balance_coeff: float | None = None
    # attention pattern
    global_attn_every_n_layers: int = 4
    sliding_window: int = 2048
    layer_types: list[str] | None = None
    mup_enabled: bool = True
    # tokens
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layer_types is None:
            self.layer_types = derive_layer_types(self.num_hidden_layers, self.global_attn_every_n_layers)
        else:
            self.layer_types = list(self.layer_types)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for key in positive:
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                _fail(key, value, "must be a positive integer")
        for key in ("num_dense_layers", "num_experts", "num_experts_per_tok", "num_shared_experts", "sliding_window",
                    "global_attn_every_n_layers", "n_group", "topk_group"):
            if not _is_int(getattr(self, key)):
                at_least_one = key in ("sliding_window", "global_attn_every_n_layers")
                _fail(key, getattr(self, key), "must be an integer" + (" >= 1" if at_least_one else ""))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            _fail("rope_scaling", self.rope_scaling, "must be null or an object")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("num_key_value_heads", self.num_key_value_heads,
                  f"num_attention_heads ({self.num_attention_heads}) must be divisible by it")
        if self.head_dim % 2:
            _fail("head_dim", self.head_dim, "must be even (rotary embedding rotates pairs)")
        if self.hidden_act != "silu":
            _fail("hidden_act", self.hidden_act, "only 'silu' (SwiGLU) is supported")
        if self.score_func != "sigmoid":
            _fail("score_func", self.score_func, "only 'sigmoid' routing is supported")
        if self.sliding_window < 1:
            _fail("sliding_window", self.sliding_window, "must be an integer >= 1")
        if self.global_attn_every_n_layers < 1:
            _fail("global_attn_every_n_layers", self.global_attn_every_n_layers, "must be an integer >= 1")
        if not 0 <= self.num_dense_layers <= self.num_hidden_layers:
            _fail("num_dense_layers", self.num_dense_layers,
                  f"must be between 0 and num_hidden_layers ({self.num_hidden_layers})")
        if self.num_dense_layers < self.num_hidden_layers:  # there are MoE layers: their keys matter
            if self.num_experts < 1:
                _fail("num_experts", self.num_experts, "must be >= 1 when the model has MoE layers")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                _fail("num_experts_per_tok", self.num_experts_per_tok,
                      f"must be between 1 and num_experts ({self.num_experts})")
            if self.num_shared_experts < 0:
                _fail("num_shared_experts", self.num_shared_experts, "must be >= 0")
        if self.n_group != 1 or self.topk_group != 1:
            key, value = ("n_group", self.n_group) if self.n_group != 1 else ("topk_group", self.topk_group)
            _fail(key, value, "only 1 is supported (no grouped routing in any released Trinity config)")
        if not (self.rms_norm_eps > 0):
            _fail("rms_norm_eps", self.rms_norm_eps, "must be > 0")
        if not (self.rope_theta > 0):
            _fail("rope_theta", self.rope_theta, "must be > 0")
        if self.rope_scaling not in (None, {}) and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) \
                not in (None, "default"):
            _fail("rope_scaling", self.rope_scaling, "only default RoPE (null) is supported")
        if self.attention_bias:
            _fail("attention_bias", self.attention_bias, "Trinity attention has no biases; only false is supported")
        if len(self.layer_types) != self.num_hidden_layers:
            _fail("layer_types", f"<{len(self.layer_types)} entries>",
                  f"must list one type per layer (num_hidden_layers = {self.num_hidden_layers})")
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                _fail(f"layer_types[{i}]", kind, f"allowed: {', '.join(LAYER_TYPES)}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            _fail("dtype", self.dtype, "allowed: bfloat16, float16, float32")

    # ------------------------------------------------------------------ derived
    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.num_dense_layers

    def is_sliding_layer(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == "sliding_attention"

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def num_parameters(self, active_only: bool = False) -> int:
        """Exact parameter count from the shapes (active_only: with top-k routed experts instead of all)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) \
            + self.num_attention_heads * d * h + 2 * d
        norms = 4 * h
        dense_mlp = 3 * h * self.intermediate_size
        experts = self.num_experts_per_tok if active_only else self.num_experts
        moe = 3 * h * self.moe_intermediate_size * (experts + self.num_shared_experts) \
            + self.num_experts * h + self.num_experts
        total = self.num_dense_layers * (attn + norms + dense_mlp) + self.num_moe_layers * (attn + norms + moe)
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return total + self.vocab_size * h + head + h

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrinityConfig":
        data = copy.deepcopy(data)
        model_type = data.get("model_type", "afmoe")
        if model_type != "afmoe":
            _fail("model_type", model_type, "expected 'afmoe' (AfmoeForCausalLM)")
        rope_parameters = data.get("rope_parameters")
        if isinstance(rope_parameters, dict):  # transformers 5 moves RoPE here, and it wins over the old keys
            data["rope_theta"] = rope_parameters.get("rope_theta", data.get("rope_theta", 10000.0))
            if rope_parameters.get("rope_type", "default") != "default":
                data["rope_scaling"] = rope_parameters
        dtype = data.get("dtype") or data.get("torch_dtype") or "bfloat16"
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "dtype"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k not in _DERIVED_KEYS}
        return cls(**known, dtype=str(dtype).removeprefix("torch."), extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "TrinityConfig":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "TrinityConfig":
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_json_file(file)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": ["AfmoeForCausalLM"], "model_type": "afmoe"}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        out["torch_dtype"] = self.dtype
        out.update(copy.deepcopy(self.extra))
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save_pretrained(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def replace(self, **changes: Any) -> "TrinityConfig":
        """A copy with some fields changed; layer_types is re-derived when the layer count changes."""
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if ("num_hidden_layers" in changes or "global_attn_every_n_layers" in changes) and "layer_types" not in changes:
            data["layer_types"] = None
        data.update(changes)
        return TrinityConfig(**data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def derive_layer_types(num_layers: int, every_n: int) -> list[str]:
    """Every `every_n`-th layer (1-based) is full attention, the rest sliding: 3 sliding : 1 full for n = 4."""
    if not (_is_int(every_n) and every_n >= 1):
        _fail("global_attn_every_n_layers", every_n, "must be an integer >= 1")
    return ["full_attention" if (i + 1) % every_n == 0 else "sliding_attention" for i in range(num_layers)]


# ---------------------------------------------------------------------- presets
_COMMON = dict(vocab_size=200192, rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu", score_func="sigmoid",
               route_norm=True, mup_enabled=True, n_group=1, topk_group=1, head_dim=128,
               global_attn_every_n_layers=4, num_shared_experts=1, tie_word_embeddings=False, dtype="bfloat16")

PRESETS: dict[str, dict[str, Any]] = {
    # A few MB, every feature on: dense + MoE layers, 3:1 sliding/full, a window shorter than test sequences.
    "tiny": dict(_COMMON, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=4, num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 num_experts=8, num_experts_per_tok=2, sliding_window=8, max_position_embeddings=4096,
                 route_scale=2.826, dtype="float32"),
    "nano": dict(_COMMON, hidden_size=1024, intermediate_size=3072, moe_intermediate_size=256,
                 num_hidden_layers=56, num_dense_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 num_experts=128, num_experts_per_tok=8, sliding_window=2048, max_position_embeddings=131072,
                 route_scale=2.826, load_balance_coeff=5e-05),
    "mini": dict(_COMMON, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=1024,
                 num_hidden_layers=32, num_dense_layers=2, num_attention_heads=32, num_key_value_heads=4,
                 num_experts=128, num_experts_per_tok=8, sliding_window=2048, max_position_embeddings=131072,
                 route_scale=2.826, load_balance_coeff=5e-05),
    "large": dict(_COMMON, hidden_size=3072, intermediate_size=12288, moe_intermediate_size=3072,
                  num_hidden_layers=60, num_dense_layers=6, num_attention_heads=48, num_key_value_heads=8,
                  num_experts=256, num_experts_per_tok=4, sliding_window=4096, max_position_embeddings=262144,
                  route_scale=2.448, load_balance_coeff=5e-05),
}


def preset(name: str, **overrides: Any) -> TrinityConfig:
    """A named configuration (`tiny`, `nano`, `mini`, `large`), optionally with some keys changed."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return TrinityConfig(**{**PRESETS[name], **overrides})
