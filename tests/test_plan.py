"""`trinity plan`: its numbers against arithmetic done by hand from the configs, and the seeds' deployments."""

from __future__ import annotations

import json

import pytest

from trinity.cli import main
from trinity.config import preset
from trinity.ops.plan import PlanError, PlanInputs, expected_distinct_experts, make_plan, tp_problem

VOCAB = 200192


def _plan(model: str, **kw) -> dict:
    return make_plan(PlanInputs(model=model, config=preset(model), **kw))


def _cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors (bad choice, not a number)
        return e.code


# ---------------------------------------------------------------------- weights, by hand
# Parameters written out from the released shapes (TRINITY.md), per layer and per model:
# attention = q [heads*128, h] + gate [heads*128, h] + o [h, heads*128] + k, v [kv*128, h] + q_norm, k_norm [128]
# layer norms = 4 * h; dense MLP = 3 * h * I; expert = 3 * h * I_moe; router = E * h; expert bias = E.
NANO_PARAMS = (
    56 * (3 * 1024 * 1024 + 2 * 256 * 1024 + 2 * 128 + 4 * 1024)  # attention + norms, 56 layers
    + 2 * 3 * 1024 * 3072  # 2 dense layers
    + 54 * ((128 + 1) * 3 * 1024 * 256 + 128 * 1024 + 128)  # 54 MoE layers: 128 routed + 1 shared, router, bias
    + 2 * VOCAB * 1024 + 1024  # embeddings, untied head, final norm
)
MINI_PARAMS = (
    32 * (3 * 2048 * 4096 + 2 * 512 * 2048 + 2 * 128 + 4 * 2048)
    + 2 * 3 * 2048 * 6144
    + 30 * ((128 + 1) * 3 * 2048 * 1024 + 128 * 2048 + 128)
    + 2 * VOCAB * 2048 + 2048
)
LARGE_PARAMS = (
    60 * (3 * 3072 * 6144 + 2 * 1024 * 3072 + 2 * 128 + 4 * 3072)
    + 6 * 3 * 3072 * 12288
    + 54 * ((256 + 1) * 3 * 3072 * 3072 + 256 * 3072 + 256)
    + 2 * VOCAB * 3072 + 3072
)


@pytest.mark.parametrize("model, params, published", [("nano", NANO_PARAMS, 6.12e9), ("mini", MINI_PARAMS, 26.1e9),
                                                      ("large", LARGE_PARAMS, 398e9)])
def test_bf16_weight_bytes_are_two_per_hand_counted_parameter(model, params, published):
    plan = _plan(model, max_model_len=4096)
    assert abs(params - published) / published < 0.005  # the hand count matches the model cards
    assert plan["model"]["total_params"] == params
    assert plan["weights"]["bytes"] == 2 * params
    assert sum(g["params"] for g in plan["weights"]["groups"].values()) == params
    assert preset(model).num_parameters() == params


def test_fp8_large_bytes_by_hand():
    # Linear weights at 1 byte + one fp32 scale per 128x128 block; embeddings, head, router, bias, norms at 2 bytes.
    # Blocks per layer (h = 3072 -> 24, q width 6144 -> 48, kv width 1024 -> 8, I 12288 -> 96, I_moe 3072 -> 24):
    attention_blocks = 3 * 48 * 24 + 2 * 8 * 24
    dense_blocks = 3 * 96 * 24
    expert_blocks = 3 * 24 * 24
    blocks = 60 * attention_blocks + 6 * dense_blocks + 54 * (256 + 1) * expert_blocks
    bf16_params = 2 * VOCAB * 3072 + 54 * (256 * 3072 + 256) + 60 * (4 * 3072 + 2 * 128) + 3072
    linear_params = LARGE_PARAMS - bf16_params
    plan = _plan("large", weights_dtype="fp8", max_model_len=4096)
    assert plan["weights"]["bytes"] == linear_params + 4 * blocks + 2 * bf16_params
    assert 399e9 < plan["weights"]["bytes"] < 401e9  # seed 000: "the FP8 weights require around 400 GB"


def test_w4a16_mini_routed_experts_by_hand():
    # gate/up [1024, 2048]: half a byte per weight + (fp32 scale + uint8 zero) per 128 inputs per row -> 16 groups;
    # down [2048, 1024]: 8 groups per row.
    gate = 1024 * 2048 // 2 + 5 * 1024 * 16
    down = 2048 * 1024 // 2 + 5 * 2048 * 8
    plan = _plan("mini", weights_dtype="w4a16", max_model_len=4096)
    assert plan["weights"]["groups"]["routed_experts"]["bytes"] == 30 * 128 * (2 * gate + down)
    assert plan["weights"]["groups"]["embed_tokens"]["bytes"] == 2 * VOCAB * 2048  # stays bf16
    sizes = [_plan("mini", weights_dtype=d, max_model_len=4096)["weights"]["bytes"] for d in ("w4a16", "fp8", "bf16")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


# ---------------------------------------------------------------------- KV cache, by hand
# K and V, kv heads x 128, 2 bytes (bf16): per layer per token nano (2 heads) 1,024 B, mini (4) 2,048, large (8) 4,096.
# Every 4th layer is full: nano 14 of 56, mini 8 of 32, large 15 of 60; windows 2048, 2048, 4096.
@pytest.mark.parametrize("model, full, sliding, window", [
    ("nano", 14 * 1024, 42 * 1024, 2048),
    ("mini", 8 * 2048, 24 * 2048, 2048),
    ("large", 15 * 4096, 45 * 4096, 4096),
])
def test_kv_bytes_per_token_per_pool(model, full, sliding, window):
    for kv_dtype, scale in (("bf16", 1), ("fp8", 2)):
        kv = _plan(model, kv_dtype=kv_dtype, max_model_len=32768)["kv_cache"]
        assert kv["full_bytes_per_token"] == full // scale
        assert kv["sliding_bytes_per_token"] == sliding // scale
        assert kv["sliding_bytes_cap_per_sequence"] == sliding * window // scale
        # a 32K sequence: the full pool holds all of it, the sliding pool only the last window
        assert kv["bytes_per_sequence"] == (full * 32768 + sliding * window) // scale
    short = _plan(model, max_model_len=1000)["kv_cache"]  # shorter than the window: both pools hold every token
    assert short["bytes_per_sequence"] == (full + sliding) * 1000


# ---------------------------------------------------------------------- fit: the seeds' deployments
def test_fp8_large_fits_on_two_mi350x_with_tp2():
    # Seed 000: Trinity Large Preview FP8 on 2x MI350X (288 GB each), vLLM TP=2, 259.6 GB used per GPU at 0.90.
    plan = _plan("large", weights_dtype="fp8", gpu="mi350x", gpus=2, memory_gb=288, bandwidth_tbps=8.0,
                 max_model_len=32768, concurrency=8)
    fit = plan["fit"]
    assert fit["fits"] and fit["tensor_parallel_size"] == 2 and fit["replicas"] == 1
    assert [t["fits"] for t in fit["tried"]] == [False, True]  # one GPU cannot hold ~400 GB
    assert 199 < fit["weights_gb_per_gpu"] < 201
    # 288 * 0.9 - 4 reserve - ~200 weights leaves ~55 GB for KV; a 32K Large sequence is ~1.4 GB per GPU
    assert 50 < fit["kv_budget_gb_per_gpu"] < 60 and fit["max_sequences_per_replica"] > 30
    assert fit["concurrency_fits"] and fit["headroom_gb_per_gpu"] > 0


def test_bf16_large_does_not_fit_on_eight_h100():
    plan = _plan("large", weights_dtype="bf16", gpu="h100", gpus=8, memory_gb=80, bandwidth_tbps=3.35,
                 max_model_len=32768)
    fit = plan["fit"]
    assert not fit["fits"] and plan["decode"] is None and plan["cost"] is None
    # 797 GB of weights over 8 GPUs is ~99.7 GB each, against 80 * 0.9 - 4 = 68 GB usable; the router, expert
    # bias and norms are copied onto every GPU rather than split
    replicated = 54 * (256 * 3072 + 256) + 60 * (4 * 3072 + 2 * 128) + 3072
    weights_per_gpu = (2 * (LARGE_PARAMS - replicated) / 8 + 2 * replicated) / 1e9
    seq_per_gpu = (61440 * 32768 + 184320 * 4096) / 8 / 1e9
    assert fit["tensor_parallel_size"] == 8
    assert fit["shortfall_gb_per_gpu"] == pytest.approx(weights_per_gpu + 4 + seq_per_gpu - 72, rel=1e-9)
    assert fit["shortfall_gb"] == pytest.approx(8 * fit["shortfall_gb_per_gpu"])


def test_seed_001_fp8_large_on_four_h200_and_its_break_even():
    # Seed 001: 4x H200 (564 GB) runs FP8 Large; at $3.70/GPU-hour, 720 h/month and $25/M, break-even is ~426M.
    plan = _plan("large", weights_dtype="fp8", gpu="h200", gpus=4, memory_gb=141, bandwidth_tbps=4.8,
                 max_model_len=32768, concurrency=16, price_per_gpu_hour=3.70, api_price_per_mtok=25.0,
                 hours_per_month=720)
    assert plan["fit"]["fits"] and plan["fit"]["tensor_parallel_size"] == 4
    cost = plan["cost"]
    assert cost["usd_per_hour"] == pytest.approx(14.80)
    assert cost["monthly_usd"] == pytest.approx(10656.0)
    assert cost["break_even_tokens_per_month"] == pytest.approx(426.24e6)


def test_tensor_parallel_constraints():
    assert tp_problem(preset("nano"), 16, "bf16")  # 8 attention heads
    assert tp_problem(preset("mini"), 8, "bf16") is None  # 4 KV heads, each copied onto two GPUs
    assert tp_problem(preset("nano"), 4, "fp8")  # 256 / 4 = 64: not a whole 128-wide fp8 block
    assert tp_problem(preset("large"), 8, "fp8") is None  # 3072 / 8 = 384 = 3 blocks
    with pytest.raises(PlanError, match="tensor-parallel-size 3"):
        PlanInputs(model="large", config=preset("large"), gpus=4, tensor_parallel_size=3)


# ---------------------------------------------------------------------- decode bounds and cost
@pytest.mark.parametrize("model, published_gb", [("nano", 1.64), ("mini", 6.13)])
def test_batch1_bytes_match_the_measured_notes(model, published_gb):
    # TRINITY.md: batch-1 decode reads 1.64 GB (Nano) / 6.13 GB (Mini) of bf16 weights per token.
    plan = _plan(model, gpu="h100", memory_gb=80, bandwidth_tbps=3.0, max_model_len=1024, concurrency=1)
    dec = plan["decode"]
    assert dec["batch1_weight_bytes_per_token"] / 1e9 == pytest.approx(published_gb, abs=0.006)
    full, sliding = {"nano": (14 * 1024, 42 * 1024), "mini": (8 * 2048, 24 * 2048)}[model]
    assert dec["batch1_kv_bytes_per_token"] == (full + sliding) * 1024
    assert dec["batch1_tokens_per_s"] == pytest.approx(3.0e12 / dec["batch1_bytes_per_token"])


def test_expected_distinct_experts():
    assert expected_distinct_experts(128, 8, 1) == pytest.approx(8)
    assert expected_distinct_experts(128, 8, 2) == pytest.approx(8 + 8 * 120 / 128)  # second token's new experts
    assert expected_distinct_experts(256, 4, 10_000) == pytest.approx(256)


def test_batching_and_replicas_raise_throughput():
    one = _plan("nano", gpus=1, concurrency=16, max_model_len=8192)
    eight = _plan("nano", gpus=8, concurrency=128, max_model_len=8192)
    # 16 tokens touch ~101 of 128 experts, so a step reads ~3.5x the bytes of batch 1 for 16x the tokens
    assert one["decode"]["expected_experts_per_layer"] == pytest.approx(128 * (1 - (120 / 128) ** 16))
    assert one["decode"]["batch_tokens_per_s_per_replica"] > 2 * one["decode"]["batch1_tokens_per_s"]
    assert eight["fit"]["replicas"] == 8 and eight["decode"]["batch_per_replica"] == 16
    assert eight["decode"]["total_tokens_per_s"] == pytest.approx(8 * one["decode"]["total_tokens_per_s"])


def test_concurrency_beyond_the_kv_budget_is_reported_and_capped():
    # 80 * 0.9 - 4 - 52.25 GB of weights leaves 15.75 GB: seven 128K-token sequences of 2.25 GB each
    plan = _plan("mini", gpu="h100", memory_gb=80, bandwidth_tbps=3.35, max_model_len=131072, concurrency=64)
    fit = plan["fit"]
    assert fit["fits"] and not fit["concurrency_fits"] and fit["headroom_gb_per_gpu"] < 0
    assert fit["max_sequences_per_replica"] == (72e9 - 4e9 - 2 * MINI_PARAMS) // (8 * 2048 * 131072 + 24 * 2048 * 2048)
    assert plan["decode"]["batch_per_replica"] == fit["max_sequences_per_replica"] < 64


def test_cost_scales_with_price_and_break_even_needs_a_cheaper_deployment():
    cheap = _plan("mini", gpu="h200", memory_gb=141, bandwidth_tbps=4.8, concurrency=32, price_per_gpu_hour=2.0,
                  api_price_per_mtok=1.0)["cost"]
    dear = _plan("mini", gpu="h200", memory_gb=141, bandwidth_tbps=4.8, concurrency=32, price_per_gpu_hour=4.0,
                 api_price_per_mtok=1.0)["cost"]
    assert dear["usd_per_mtok_output"] == pytest.approx(2 * cheap["usd_per_mtok_output"])
    assert cheap["break_even_tokens_per_month"] == pytest.approx(2.0 * 730 / 1.0 * 1e6)
    assert cheap["beats_api"] == (cheap["break_even_utilization"] < 1)
    expensive_api = _plan("mini", gpu="h200", memory_gb=141, bandwidth_tbps=4.8, concurrency=1,
                          price_per_gpu_hour=100.0, api_price_per_mtok=0.01)["cost"]
    assert expensive_api["beats_api"] is False and expensive_api["break_even_utilization"] > 1


# ---------------------------------------------------------------------- the command
PLAN_KEYS = {"model", "weights", "kv_cache", "gpu", "fit", "decode", "cost", "assumptions"}


def test_cli_json_has_the_documented_keys(capsys):
    code = main(["plan", "--model", "large", "--weights-dtype", "fp8", "--gpu", "mi350x", "--gpus", "2",
                 "--max-model-len", "32768", "--concurrency", "8", "--price-per-gpu-hour", "3",
                 "--api-price-per-mtok", "25", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == PLAN_KEYS
    assert out["fit"]["fits"] and out["fit"]["tensor_parallel_size"] == 2
    assert out["gpu"] == {"name": "mi350x", "count": 2, "memory_gb": 288, "bandwidth_tbps": 8.0,
                          "memory_utilization": 0.9, "reserve_gb": 4.0}
    for key in ("full_bytes_per_token", "sliding_bytes_per_token", "bytes_per_sequence"):
        assert key in out["kv_cache"]
    for key in ("batch1_tokens_per_s", "batch_tokens_per_s_per_replica", "total_tokens_per_s"):
        assert out["decode"][key] > 0
    for key in ("usd_per_mtok_output", "break_even_tokens_per_month", "beats_api"):
        assert out["cost"][key] is not None


def test_cli_table_and_a_config_folder(tmp_path, capsys):
    preset("nano").save_pretrained(tmp_path / "nano")
    assert main(["plan", "--model", str(tmp_path / "nano"), "--gpu", "rtx4090", "--max-model-len", "8192"]) == 0
    table = capsys.readouterr().out
    assert "fits with TP=1" in table and "12.24 GB" in table  # 2 x 6.12B parameters
    assert main(["plan", "--model", "large", "--gpus", "8", "--gpu", "h100"]) == 0
    assert "does not fit" in capsys.readouterr().out
    assert main(["plan", "--model", "nano", "--gpu", "my-gpu", "--gpu-memory", "16", "--gpu-bandwidth", "0.5",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu"]["name"] == "my-gpu"


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "h1000"], "unknown --gpu 'h1000'"),
    (["--gpus", "0"], "--gpus must be a positive integer"),
    (["--gpu-memory", "-80"], "--gpu-memory must be a positive number"),
    (["--max-model-len", "0"], "--max-model-len must be a positive integer"),
    (["--price-per-gpu-hour", "0"], "--price-per-gpu-hour must be a positive number"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1]"),
    (["--model", "/no/such/folder"], "neither a preset"),
    (["--weights-dtype", "int3"], "invalid choice"),
    (["--gpus", "two"], "invalid int value"),
])
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert _cli(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
