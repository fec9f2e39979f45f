"""FP8 checkpoints split over tensor-parallel ranks: block scales follow their weights' rows and columns, a shard
boundary inside a scale block is refused, and the ranks together compute the whole FP8 model's logits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from distributed_helpers import run_ranks
from tp_model_ranks import checkpoint_sharded_logits

from trinity import TrinityForCausalLM, preset
from trinity.parallel.sharding import ShardingError, ShardPlan, shard_model

pytest.importorskip("compressed_tensors")
from fp8_helpers import write_fp8_checkpoint  # noqa: E402

CFG = preset("tiny", vocab_size=301, num_attention_heads=4, num_key_value_heads=2)
IDS = [[3, 17, 42, 5, 99, 250, 7, 1], [11, 12, 13, 14, 15, 16, 17, 18]]
# (strategy, block): blocks that split evenly at tp 2 (16 | 32 = moe_intermediate / 2), one block spanning a split
# dimension (128: each rank's piece shares its scale), per channel, per tensor
CASES = [("block", (16, 16)), ("block", (128, 128)), ("channel", None), ("tensor", None)]


@pytest.fixture(scope="module")
def model():
    return TrinityForCausalLM.random(CFG, seed=3).eval()


@pytest.mark.parametrize("strategy,block", CASES, ids=[f"{s}-{b}" for s, b in CASES])
@pytest.mark.parametrize("tp,ep", [(2, False), (2, True), (4, False)])
def test_sharded_fp8_load_equals_cutting_the_whole_fp8_model(tmp_path, model, strategy, block, tp, ep):
    write_fp8_checkpoint(model, str(tmp_path), strategy, block or (128, 128))
    whole = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for rank in range(tp):
        plan = ShardPlan(CFG, rank, tp, ep)
        try:
            loaded = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, shard=plan)
        except ShardingError as e:  # tp 4 cuts moe_intermediate 32 into 8s, inside 16-row blocks
            assert block == (16, 16) and tp == 4 and "FP8 scale blocks of 16" in str(e)
            return
        cut = shard_model(copy.deepcopy(whole), ShardPlan(CFG, rank, tp, ep))
        ours, want = dict(loaded.named_parameters()), dict(cut.named_parameters())
        assert ours.keys() == want.keys()
        for name in ours:
            assert torch.equal(ours[name].float(), want[name].float()), (rank, name)
        q = loaded.model.layers[0].self_attn.q_proj
        assert q.weight.dtype == torch.float8_e4m3fn and q.weight.shape[0] == CFG.num_attention_heads * CFG.head_dim // tp


@pytest.mark.parametrize("ep", [False, True])
def test_fp8_ranks_compute_the_whole_fp8_model(tmp_path, model, ep):
    write_fp8_checkpoint(model, str(tmp_path), "block", (16, 16))
    whole = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.inference_mode():
        want = whole(torch.tensor(IDS)).numpy()
    for logits in run_ranks(checkpoint_sharded_logits, 2, str(tmp_path), ep, IDS):
        assert np.abs(logits - want).max() / np.abs(want).max() < 1e-5


def test_online_fp8_over_ranks(tmp_path, model):
    """`--quantization fp8` with tensor parallelism: each rank quantizes the part it reads (its blocks start at its
    own part's origin); the ranks together run it."""
    model.save_pretrained(tmp_path)
    parts = [TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization="fp8",
                                                shard=ShardPlan(CFG, rank, 2)) for rank in range(2)]
    for part in parts:
        experts = part.model.layers[1].mlp.experts
        assert experts.gate_up_proj.dtype == torch.float8_e4m3fn
        assert experts.gate_up_proj.shape[1] == CFG.moe_intermediate_size  # half of 2 * I


@pytest.mark.slow
def test_engine_over_two_ranks_with_online_fp8_and_an_fp8_cache():
    """`LLM(..., tensor_parallel_size=2, quantization="fp8", kv_cache_dtype="fp8_e4m3")` on the built-in model: each
    rank quantizes its own part (the intermediate size 384 splits into 192s, not whole 128-blocks), and the pair
    answers the arithmetic question as the unquantized model does."""
    from trinity import LLM, SamplingParams

    question = [{"role": "user", "content": "What is 27 + 58?"}]
    params = SamplingParams(max_tokens=200, temperature=0)
    llm = LLM("trinity-tiny", dtype="float32", tensor_parallel_size=2, quantization="fp8", kv_cache_dtype="fp8_e4m3")
    try:
        assert type(llm.engine.model.model.layers[0].mlp.down_proj).__name__ == "Fp8Linear"
        text = llm.chat(question, params)[0].outputs[0].text
    finally:
        llm.shutdown()
    assert "The answer is 85." in text
