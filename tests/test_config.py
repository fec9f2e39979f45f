"""TrinityConfig: every validation message, layer_types derivation, lossless JSON round trips, presets."""

import json
import re

import pytest
import torch

from trinity import ConfigError, TrinityConfig, TrinityForCausalLM, preset
from trinity.config import PRESETS, derive_layer_types

ALLOWED_LAYER_TYPES = "allowed: sliding_attention, full_attention"


def config_error(**overrides) -> str:
    """The ConfigError message for the tiny preset with `overrides` (fails the test if none is raised)."""
    with pytest.raises(ConfigError) as exc:
        preset("tiny", **overrides)
    return str(exc.value)


def check_message(msg: str, key: str, value: str, allowed: str) -> None:
    """The message names the key (quoted), the offending value (repr) and what is allowed."""
    assert f"config key '{key}' = {value} is invalid" in msg, msg
    assert allowed in msg, msg


# ---------------------------------------------------------------------------------------------- validation
# (overrides, key named, value as the message writes it, fragment saying what is allowed)
INVALID = {
    "kv_heads_not_divisor": (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads", "3",
                             "num_attention_heads (4) must be divisible by it"),
    "unknown_layer_type": (dict(layer_types=["sliding_attention", "full_attention", "chunked_attention",
                                             "full_attention"]),
                           "layer_types[2]", "'chunked_attention'", ALLOWED_LAYER_TYPES),
    "layer_types_too_short": (dict(layer_types=["full_attention"] * 3), "layer_types", "'<3 entries>'",
                              "must list one type per layer (num_hidden_layers = 4)"),
    "layer_types_too_long": (dict(layer_types=["sliding_attention"] * 5), "layer_types", "'<5 entries>'",
                             "num_hidden_layers = 4"),
    "score_func_softmax": (dict(score_func="softmax"), "score_func", "'softmax'", "only 'sigmoid'"),
    "hidden_act_gelu": (dict(hidden_act="gelu"), "hidden_act", "'gelu'", "only 'silu'"),
    "sliding_window_0": (dict(sliding_window=0), "sliding_window", "0", "must be an integer >= 1"),
    "sliding_window_neg": (dict(sliding_window=-3), "sliding_window", "-3", "must be an integer >= 1"),
    "sliding_window_float": (dict(sliding_window=2048.0), "sliding_window", "2048.0", "must be an integer >= 1"),
    "sliding_window_str": (dict(sliding_window="2048"), "sliding_window", "'2048'", "must be an integer >= 1"),
    "topk_gt_experts": (dict(num_experts=8, num_experts_per_tok=9), "num_experts_per_tok", "9",
                        "must be between 1 and num_experts (8)"),
    "topk_0": (dict(num_experts_per_tok=0), "num_experts_per_tok", "0", "must be between 1 and num_experts (8)"),
    "dense_gt_layers": (dict(num_dense_layers=5), "num_dense_layers", "5",
                        "must be between 0 and num_hidden_layers (4)"),
    "dense_negative": (dict(num_dense_layers=-1), "num_dense_layers", "-1",
                       "must be between 0 and num_hidden_layers (4)"),
    "n_group_2": (dict(n_group=2), "n_group", "2", "only 1 is supported"),
    "topk_group_4": (dict(topk_group=4), "topk_group", "4", "only 1 is supported"),
    "rope_yarn": (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling",
                  "{'rope_type': 'yarn', 'factor': 4.0}", "only default RoPE (null) is supported"),
    "rope_linear_legacy_key": (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling",
                               "{'type': 'linear', 'factor': 2.0}", "only default RoPE (null) is supported"),
    "attention_bias": (dict(attention_bias=True), "attention_bias", "True", "only false is supported"),
    "odd_head_dim": (dict(head_dim=15), "head_dim", "15", "must be even"),
    "hidden_size_0": (dict(hidden_size=0), "hidden_size", "0", "must be a positive integer"),
    "vocab_size_neg": (dict(vocab_size=-1), "vocab_size", "-1", "must be a positive integer"),
    "layers_0": (dict(num_hidden_layers=0, layer_types=[]), "num_hidden_layers", "0", "must be a positive integer"),
    "intermediate_bool": (dict(intermediate_size=True), "intermediate_size", "True", "must be a positive integer"),
    "unknown_dtype": (dict(dtype="int8"), "dtype", "'int8'", "allowed: bfloat16, float16, float32"),
    "num_experts_0": (dict(num_experts=0), "num_experts", "0", "must be >= 1 when the model has MoE layers"),
    "shared_negative": (dict(num_shared_experts=-1), "num_shared_experts", "-1", "must be >= 0"),
    "rms_norm_eps_0": (dict(rms_norm_eps=0.0), "rms_norm_eps", "0.0", "must be > 0"),
    "rope_theta_neg": (dict(rope_theta=-1.0), "rope_theta", "-1.0", "must be > 0"),
    "every_n_0": (dict(global_attn_every_n_layers=0), "global_attn_every_n_layers", "0", "must be an integer >= 1"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_value_names_key_value_and_allowed(case):
    overrides, key, value, allowed = INVALID[case]
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' = {value}")) as exc:
        preset("tiny", **overrides)
    check_message(str(exc.value), key, value, allowed)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        preset("tiny", hidden_act="relu")


def test_unknown_layer_type_lists_allowed_ones():
    msg = config_error(layer_types=["sliding_attention", "full_attention", "sliding_attention", "global"])
    assert "layer_types[3]" in msg and "'global'" in msg
    assert "sliding_attention" in msg and "full_attention" in msg


def test_mutating_then_validate_catches_it():
    cfg = preset("tiny")
    cfg.sliding_window = -3
    with pytest.raises(ConfigError, match=r"'sliding_window' = -3"):
        cfg.validate()


def test_default_rope_scaling_is_accepted():
    assert preset("tiny", rope_scaling={"rope_type": "default"}).rope_scaling == {"rope_type": "default"}
    assert preset("tiny", rope_scaling={}).rope_scaling == {}


def test_topk_not_checked_when_every_layer_is_dense():
    cfg = preset("tiny", num_dense_layers=4, num_experts_per_tok=99)
    assert cfg.num_moe_layers == 0 and not any(cfg.is_moe_layer(i) for i in range(4))


@pytest.mark.parametrize("overrides", [dict(num_dense_layers="2"), dict(num_dense_layers=1.5),
                                       dict(num_experts_per_tok=2.0), dict(rope_scaling="yarn"),
                                       dict(sliding_window=True)], ids=repr)
def test_wrongly_typed_values_raise_config_error(overrides):
    (key, value), = overrides.items()
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' = {value!r}")):
        preset("tiny", **overrides)


def test_model_type_other_than_afmoe():
    data = dict(preset("tiny").to_dict(), model_type="llama")
    with pytest.raises(ConfigError, match=r"'model_type' = 'llama'") as exc:
        TrinityConfig.from_dict(data)
    assert "expected 'afmoe'" in str(exc.value) and "AfmoeForCausalLM" in str(exc.value)


def test_unknown_dtype_from_dict():
    data = dict(preset("tiny").to_dict(), torch_dtype="int8", dtype=None)
    with pytest.raises(ConfigError, match=r"'dtype' = 'int8'") as exc:
        TrinityConfig.from_dict(data)
    assert "allowed: bfloat16, float16, float32" in str(exc.value)


def test_torch_prefixed_dtype_from_dict():
    data = dict(preset("tiny").to_dict(), torch_dtype="torch.float16")
    del data["dtype"]
    assert TrinityConfig.from_dict(data).dtype == "float16"


def test_invalid_json_file(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64,\n "vocab_size": }')
    with pytest.raises(ConfigError, match="not valid JSON") as exc:
        TrinityConfig.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(exc.value)
    assert "line 2" in str(exc.value)  # the decoder's position is passed on
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrinityConfig.from_json_file(tmp_path / "config.json")


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json at"):
        TrinityConfig.from_pretrained(tmp_path)


def test_unknown_preset_name():
    with pytest.raises(ConfigError, match=r"unknown preset 'medium'") as exc:
        preset("medium")
    assert "allowed: tiny, nano, mini, large" in str(exc.value)


# ---------------------------------------------------------------------------------------------- layer_types
def test_derive_layer_types_three_sliding_one_full():
    s, f = "sliding_attention", "full_attention"
    assert derive_layer_types(8, 4) == [s, s, s, f, s, s, s, f]
    assert derive_layer_types(3, 1) == [f, f, f]
    assert derive_layer_types(3, 5) == [s, s, s]
    with pytest.raises(ConfigError, match=r"'global_attn_every_n_layers' = 0 is invalid: must be an integer >= 1"):
        derive_layer_types(4, 0)


def test_large_layer_types_derived():
    cfg = preset("large")
    assert len(cfg.layer_types) == 60
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    assert full == list(range(3, 60, 4)) and len(full) == 15
    assert full[0] == 3 and full[-1] == 59
    assert all(cfg.is_sliding_layer(i) for i in range(60) if i not in full)
    assert cfg.layer_types.count("sliding_attention") == 45


def test_custom_every_n_layer_types():
    cfg = preset("tiny", num_hidden_layers=7, global_attn_every_n_layers=3)
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [2, 5]
    data = cfg.to_dict()
    del data["layer_types"]  # absent in the file: derived from global_attn_every_n_layers
    assert TrinityConfig.from_dict(data).layer_types == cfg.layer_types


def test_explicit_layer_types_kept_and_replace_rederives():
    explicit = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    cfg = preset("tiny", layer_types=explicit)
    assert cfg.layer_types == explicit and cfg.layer_types is not explicit
    deeper = cfg.replace(num_hidden_layers=8)
    assert deeper.layer_types == derive_layer_types(8, 4)
    assert cfg.replace(sliding_window=3).layer_types == explicit


# ---------------------------------------------------------------------------------------------- round trips
EXTRA_KEYS = {
    "auto_map": {"AutoConfig": "configuration_afmoe.AfmoeConfig",
                 "AutoModelForCausalLM": "modeling_afmoe.AfmoeForCausalLM"},
    "use_grouped_mm": True,
    "num_expert_groups": 1,
    "some_future_key": {"nested": [1, 2]},
}


def test_unknown_keys_survive_round_trip():
    data = dict(preset("tiny").to_dict(), **EXTRA_KEYS)
    cfg = TrinityConfig.from_dict(data)
    assert cfg.extra == EXTRA_KEYS
    out = cfg.to_dict()
    for key, value in EXTRA_KEYS.items():
        assert out[key] == value
    again = TrinityConfig.from_dict(out)
    assert again == cfg and again.extra == EXTRA_KEYS
    # the written dict is a copy: changing it does not change the config
    out["some_future_key"]["nested"].append(3)
    assert cfg.extra["some_future_key"] == {"nested": [1, 2]}
    assert json.loads(cfg.to_json_string())["some_future_key"] == {"nested": [1, 2]}


S, F = "sliding_attention", "full_attention"
# Trinity-Mini's config.json as released in shape (TRINITY.md table); token ids and auto_map are illustrative.
MINI_CONFIG_JSON = {
    "architectures": ["AfmoeForCausalLM"],
    "model_type": "afmoe",
    "auto_map": {"AutoConfig": "configuration_afmoe.AfmoeConfig",
                 "AutoModel": "modeling_afmoe.AfmoeModel",
                 "AutoModelForCausalLM": "modeling_afmoe.AfmoeForCausalLM"},
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1",
    "vocab_size": 200192,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 1024,
    "num_hidden_layers": 32,
    "num_dense_layers": 2,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-05,
    "use_cache": True,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_shared_experts": 1,
    "score_func": "sigmoid",
    "route_norm": True,
    "route_scale": 2.826,
    "n_group": 1,
    "topk_group": 1,
    "load_balance_coeff": 5e-05,
    "global_attn_every_n_layers": 4,
    "sliding_window": 2048,
    "layer_types": [S, S, S, F] * 8,
    "mup_enabled": True,
    "num_expert_groups": 1,
    "use_grouped_mm": True,
    "bos_token_id": 0,
    "eos_token_id": [3, 4],
    "pad_token_id": 12,
}


def test_realistic_mini_config_round_trips_through_files(tmp_path):
    cfg = TrinityConfig.from_dict(MINI_CONFIG_JSON)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_moe_layers, cfg.dtype) == (2048, 32, 30, "bfloat16")
    assert cfg.route_scale == 2.826 and cfg.eos_token_ids == [3, 4]
    assert set(cfg.extra) == {"auto_map", "transformers_version", "num_expert_groups", "use_grouped_mm"}
    cfg.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    for key, value in MINI_CONFIG_JSON.items():
        assert key in written, key
        assert written[key] == value, key
        assert type(written[key]) is type(value), key
    again = TrinityConfig.from_pretrained(tmp_path)
    assert again == cfg
    assert TrinityConfig.from_pretrained(tmp_path / "config.json") == cfg
    # and a second generation writes the same file
    again.save_pretrained(tmp_path / "second")
    assert json.loads((tmp_path / "second" / "config.json").read_text()) == written


def test_rope_parameters_of_transformers5():
    data = preset("tiny").to_dict()
    del data["rope_theta"], data["rope_scaling"]
    data["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    cfg = TrinityConfig.from_dict(data)
    assert cfg.rope_theta == 500.0 and cfg.rope_scaling is None
    assert "rope_parameters" not in cfg.extra
    assert cfg.to_dict()["rope_theta"] == 500.0


def test_rope_parameters_non_default_rejected():
    data = preset("tiny").to_dict()
    del data["rope_theta"], data["rope_scaling"]
    data["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match=r"'rope_scaling' = \{'rope_type': 'yarn'") as exc:
        TrinityConfig.from_dict(data)
    assert "only default RoPE (null) is supported" in str(exc.value)


@pytest.mark.parametrize("case", ["theta", "yarn"])
def test_rope_parameters_take_precedence_like_transformers(case):
    data = preset("tiny").to_dict()
    if case == "theta":
        data["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
        assert TrinityConfig.from_dict(data).rope_theta == 500.0
    else:
        data["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
        with pytest.raises(ConfigError, match="rope_scaling"):
            TrinityConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------- presets
TABLE = {  # TRINITY.md "Released configurations"
    "nano": dict(num_hidden_layers=56, num_dense_layers=2, hidden_size=1024, intermediate_size=3072,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_experts=128, num_experts_per_tok=8,
                 num_shared_experts=1, moe_intermediate_size=256, sliding_window=2048,
                 max_position_embeddings=131072, route_scale=2.826),
    "mini": dict(num_hidden_layers=32, num_dense_layers=2, hidden_size=2048, intermediate_size=6144,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                 num_shared_experts=1, moe_intermediate_size=1024, sliding_window=2048,
                 max_position_embeddings=131072, route_scale=2.826),
    "large": dict(num_hidden_layers=60, num_dense_layers=6, hidden_size=3072, intermediate_size=12288,
                  num_attention_heads=48, num_key_value_heads=8, head_dim=128, num_experts=256, num_experts_per_tok=4,
                  num_shared_experts=1, moe_intermediate_size=3072, sliding_window=4096,
                  max_position_embeddings=262144, route_scale=2.448),
}
COMMON = dict(vocab_size=200192, rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu", score_func="sigmoid",
              route_norm=True, mup_enabled=True, n_group=1, topk_group=1, dtype="bfloat16", tie_word_embeddings=False,
              global_attn_every_n_layers=4, rope_scaling=None, attention_bias=False)


def test_preset_names():
    assert list(PRESETS) == ["tiny", "nano", "mini", "large"]


@pytest.mark.parametrize("name", list(TABLE))
def test_release_presets_match_table(name):
    cfg = preset(name)
    for key, value in {**COMMON, **TABLE[name]}.items():
        assert getattr(cfg, key) == value, key
    n = cfg.num_hidden_layers
    assert cfg.layer_types == derive_layer_types(n, 4) and cfg.layer_types.count("full_attention") == n // 4


def meta_counts(cfg):
    """(total, active) parameter counts read off a model built on the meta device (independent of the formula)."""
    with torch.device("meta"):
        model = TrinityForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    inactive = sum((p.numel() // cfg.num_experts) * (cfg.num_experts - cfg.num_experts_per_tok)
                   for name, p in model.named_parameters() if ".mlp.experts." in name)
    return total, total - inactive


# total, active (TRINITY.md: 6.12B / ~1B, 26.1B / ~3B, ~398B / ~13B)
SIZES = {"nano": (6.12e9, None), "mini": (26.1e9, 3e9), "large": (398e9, 13e9)}


@pytest.mark.parametrize("name", list(SIZES))
def test_parameter_counts(name):
    cfg = preset(name)
    total_claim, active_claim = SIZES[name]
    total, active = cfg.num_parameters(), cfg.num_parameters(active_only=True)
    assert abs(total - total_claim) / total_claim < 0.01, total
    assert (total, active) == meta_counts(cfg)
    if active_claim is not None:
        # The quoted active figure counts the matmul weights a token touches: the input embedding is a lookup.
        # (With it, Mini is 3.47B: 16% above "~3B"; Large is 13.37B.)
        touched = active - cfg.vocab_size * cfg.hidden_size
        assert abs(touched - active_claim) / active_claim < 0.15, touched
    assert active < total / 5


def test_exact_active_counts():
    assert preset("mini").num_parameters(active_only=True) == 3_474_732_800
    assert preset("large").num_parameters(active_only=True) == 13_371_686_400
    assert preset("nano").num_parameters() == 6_120_003_328


def test_tiny_preset_small_with_every_feature():
    cfg = preset("tiny")
    assert cfg.num_parameters() * 4 < 8 * 2**20
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert cfg.num_dense_layers >= 1 and cfg.num_moe_layers >= 1
    assert cfg.num_shared_experts >= 1 and cfg.mup_enabled
    assert 1 < cfg.num_experts_per_tok < cfg.num_experts
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.sliding_window < 16  # shorter than test sequences
    assert cfg.dtype == "float32"
    model = TrinityForCausalLM.empty(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    tied = preset("tiny", tie_word_embeddings=True)
    assert sum(p.numel() for p in TrinityForCausalLM.empty(tied).parameters()) == tied.num_parameters() \
        == cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size


def test_preset_overrides_and_replace():
    cfg = preset("mini", sliding_window=1024, dtype="float16")
    assert cfg.sliding_window == 1024 and cfg.dtype == "float16" and cfg.hidden_size == 2048
    assert PRESETS["mini"]["sliding_window"] == 2048  # the table itself is untouched
    with pytest.raises(ConfigError, match=r"'hidden_act' = 'gelu'"):
        cfg.replace(hidden_act="gelu")


# ---------------------------------------------------------------------------------------------- transformers
def test_transformers_accepts_our_dict():
    transformers = pytest.importorskip("transformers")
    explicit = ["full_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    ours = preset("tiny", num_hidden_layers=5, layer_types=explicit, sliding_window=5, rope_theta=500.0,
                  num_experts_per_tok=3)
    for cfg in (ours, TrinityConfig.from_dict(MINI_CONFIG_JSON)):
        hf = transformers.AfmoeConfig.from_dict(cfg.to_dict())
        assert list(hf.layer_types) == cfg.layer_types
        assert hf.sliding_window == cfg.sliding_window
        assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
        assert hf.num_experts_per_tok == cfg.num_experts_per_tok
        assert (hf.num_hidden_layers, hf.num_dense_layers, hf.route_scale) == \
            (cfg.num_hidden_layers, cfg.num_dense_layers, cfg.route_scale)
    assert hf.rope_parameters["rope_theta"] == 10000.0
    hf = transformers.AfmoeConfig.from_dict(ours.to_dict())
    assert hf.rope_parameters["rope_theta"] == 500.0 and hf.num_experts_per_tok == 3
    # and back: what transformers writes reads as the same config
    back = TrinityConfig.from_dict(hf.to_dict())
    for key in ("layer_types", "sliding_window", "rope_theta", "num_experts_per_tok", "hidden_size", "dtype"):
        assert getattr(back, key) == getattr(ours, key), key
