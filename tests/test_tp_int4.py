"""4-bit checkpoints split over tensor-parallel ranks: codes split by bytes and scales by groups along a projection's
input, with its rows along its output; activation-order weights keep every group's scale on every rank; a split
inside a group is refused by name; and the ranks together compute the whole 4-bit model's logits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from distributed_helpers import run_ranks
from tp_model_ranks import checkpoint_sharded_logits

from trinity import TrinityForCausalLM, preset
from trinity.parallel.sharding import ShardingError, ShardPlan, shard_model
from trinity.quant.int4_modules import Int4Experts, Int4Linear

pytest.importorskip("compressed_tensors")
from int4_helpers import write_awq_checkpoint, write_ct_checkpoint, write_gptq_checkpoint  # noqa: E402

CFG = preset("tiny", vocab_size=301)
IDS = [[3, 17, 42, 5, 99, 250, 7, 1], [11, 12, 13, 14, 15, 16, 17, 18]]
# tiny: attention's o_proj has 64 inputs, the dense MLP's down 128, an expert's down 32 (moe_intermediate_size)
WRITERS = {
    "ct-group16-asym": lambda m, p: write_ct_checkpoint(m, p, "group", 16, symmetric=False),
    "ct-channel": lambda m, p: write_ct_checkpoint(m, p, "channel", None, symmetric=True),
    "awq-group32": lambda m, p: write_awq_checkpoint(m, p, 32),
    "gptq-group16-act-order": lambda m, p: write_gptq_checkpoint(m, p, 16, symmetric=False, act_order=True),
}
# at tp 4 an expert's down has 8 inputs per rank: not whole groups of 16 (nor o_proj's 16 whole groups of 32)
REFUSED_AT_TP4 = {"ct-group16-asym": "groups of 16", "awq-group32": "groups of 32"}


@pytest.fixture(scope="module")
def model():
    return TrinityForCausalLM.random(CFG, seed=5).eval()


def _shapes(module) -> tuple:
    if isinstance(module, Int4Linear):
        return module.in_features, module.out_features, module.group
    return module.hidden, module.inter, module.gate_group, module.down_group


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("tp,ep", [(2, False), (2, True), (4, False)])
def test_sharded_int4_load_equals_cutting_the_whole_int4_model(tmp_path, model, fmt, tp, ep):
    WRITERS[fmt](model, str(tmp_path))
    whole = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for rank in range(tp):
        plan = ShardPlan(CFG, rank, tp, ep)
        try:
            loaded = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, shard=plan)
        except ShardingError as e:
            assert tp == 4 and fmt in REFUSED_AT_TP4 and REFUSED_AT_TP4[fmt] in str(e), e
            with pytest.raises(ShardingError, match=REFUSED_AT_TP4[fmt]):  # cutting it from memory alike
                shard_model(copy.deepcopy(whole), ShardPlan(CFG, rank, tp, ep))
            return
        assert not (tp == 4 and fmt in REFUSED_AT_TP4)
        cut = shard_model(copy.deepcopy(whole), ShardPlan(CFG, rank, tp, ep))
        ours, want = dict(loaded.named_parameters()), dict(cut.named_parameters())
        assert ours.keys() == want.keys()
        for name in ours:
            assert torch.equal(ours[name], want[name]), (rank, name)
        for (name, m), (_, w) in zip(loaded.named_modules(), cut.named_modules()):
            if isinstance(m, (Int4Linear, Int4Experts)):
                assert _shapes(m) == _shapes(w), name
        q = loaded.model.layers[0].self_attn.q_proj
        assert isinstance(q, Int4Linear) and q.out_features == CFG.num_attention_heads * CFG.head_dim // tp
        experts = loaded.model.layers[1].mlp.experts
        assert experts.gate_up_proj.shape[0] == (CFG.num_experts // tp if ep else CFG.num_experts)


@pytest.mark.parametrize("fmt,ep,fused", [("gptq-group16-act-order", False, True), ("ct-group16-asym", True, False),
                                          ("awq-group32", False, False)])
def test_int4_ranks_compute_the_whole_int4_model(tmp_path, model, fmt, ep, fused):
    """Two ranks (gloo processes): row-parallel projections sum their partial outputs, the MoE block its experts'
    (with the shared expert stacked in the whole-layer C kernel where `fused`)."""
    WRITERS[fmt](model, str(tmp_path))
    whole = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.inference_mode():
        want = whole(torch.tensor(IDS)).numpy()
    for logits in run_ranks(checkpoint_sharded_logits, 2, str(tmp_path), ep, IDS, fused):
        assert np.abs(logits - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.slow
def test_engine_over_two_ranks_with_a_w4a16_checkpoint(tmp_path):
    """The seed's budget path in small: `trinity quantize` (W4A16, groups of 16: an expert's 96 columns split into
    48s) of the built-in model, served by `LLM(..., tensor_parallel_size=2)`: each rank holds half of every
    projection's codes and scales, and the pair answers the arithmetic question as the fp32 model does."""
    from trinity import LLM, SamplingParams
    from trinity.cli import main

    assert main(["quantize", "trinity-tiny", "--scheme", "w4a16", "--method", "rtn", "--group-size", "16",
                 "--out", str(tmp_path)]) == 0
    llm = LLM(str(tmp_path), dtype="float32", tensor_parallel_size=2)
    try:
        assert isinstance(llm.engine.model.model.layers[0].mlp.down_proj, Int4Linear)
        text = llm.chat([{"role": "user", "content": "What is 27 + 58?"}],
                        SamplingParams(max_tokens=200, temperature=0))[0].outputs[0].text
    finally:
        llm.shutdown()
    assert "The answer is 85." in text
