"""Tensor and expert parallelism on the CPU: real gloo process groups of 2 and 4 ranks (`distributed_helpers`).

The sharded model's logits equal the whole model's for random configs (KV heads fewer than, equal to and more than
the ranks; dense and MoE layers; top-k 1..4; vocabularies that do not divide); the engine over two ranks gives the
whole engine's greedy tokens with chunked prefill, prefix caching, preemption and look-ahead in play; sizes that
cannot be split are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distributed_helpers import run_ranks
from engine_helpers import random_prompts
from tp_model_ranks import sharded_logits

from trinity import TrinityForCausalLM, preset
from trinity.parallel.sharding import ShardingError, ShardPlan, check_sizes

IDS = [[3, 17, 42, 5, 99, 250, 7, 1, 64, 128], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


def _cases(tp: int) -> list[tuple[dict, int, bool, bool]]:
    """Configs for `tp` ranks: KV heads below, at and above tp (heads 8), top-k 1..4, a vocabulary that does
    not divide, tied and untied heads, tensor- and expert-parallel experts, fused and plain forwards."""
    cases = []
    for i, (kv, top_k, ep) in enumerate(((1, 1, False), (tp, 2, True), (2 * tp, 3, False), (2, 4, True))):
        cfg = preset("tiny", num_attention_heads=8, num_key_value_heads=kv, num_experts_per_tok=top_k,
                     vocab_size=301 + i, tie_word_embeddings=i % 2 == 1, num_experts=8)
        cases.append((cfg.to_dict(), 10 + i, ep, i % 2 == 0))
    return cases


def _whole_logits(config: dict, seed: int) -> np.ndarray:
    from trinity.config import TrinityConfig
    model = TrinityForCausalLM.random(TrinityConfig.from_dict(config), seed=seed).eval()
    with torch.inference_mode():
        return model(torch.tensor(IDS)).numpy()


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_logits_equal_the_whole_model(tp):
    cases = _cases(tp)
    per_rank = run_ranks(sharded_logits, tp, cases, IDS)
    for c, (config, seed, ep, fused) in enumerate(cases):
        want = _whole_logits(config, seed)
        cfg = preset("tiny")
        assert cfg.num_dense_layers >= 1 and cfg.num_hidden_layers > cfg.num_dense_layers  # dense and MoE layers
        for rank, logits in enumerate(per_rank):
            got = logits[c]
            assert got.shape == want.shape  # the gathered vocabulary cut back to the real one
            rel = np.abs(got - want).max() / np.abs(want).max()
            assert rel < 1e-5, f"case {c} (kv {config['num_key_value_heads']}, ep {ep}, fused {fused}) rank {rank}"


def test_sizes_that_cannot_split_name_those_that_can():
    cfg = preset("tiny", num_attention_heads=8, num_key_value_heads=2, num_experts=8)
    with pytest.raises(ShardingError, match=r"num_attention_heads = 8.*sizes that split this model: 1, 2, 4, 8"):
        check_sizes(cfg, 3)
    odd = preset("tiny", num_attention_heads=12, num_key_value_heads=4, num_experts=6)
    with pytest.raises(ShardingError, match=r"num_experts = 6 \(expert parallel\)"):
        check_sizes(odd, 4, expert_parallel=True)
    with pytest.raises(ShardingError, match=r"num_key_value_heads = 3"):
        check_sizes(preset("tiny", num_attention_heads=12, num_key_value_heads=3), 2)
    check_sizes(odd, 2, expert_parallel=True)  # 6 experts over 2 ranks


def test_kv_heads_replicate_within_their_query_group():
    """Large has 8 KV heads and 48 query heads: at TP=16 each KV head is held by 2 ranks, and every rank's 3 query
    heads belong to the KV head it holds."""
    large = preset("large")
    group = large.num_attention_heads // large.num_key_value_heads
    for rank in range(16):
        plan = ShardPlan(large, rank, 16)
        assert plan.num_kv_heads == 1 and plan.num_heads == 3
        kv_head = plan.kv_range[0] // large.head_dim
        q_heads = range(plan.q_range[0] // large.head_dim, plan.q_range[1] // large.head_dim)
        assert kv_head == rank // 2 and all(h // group == kv_head for h in q_heads)


def _generate(tp: int, prompts, **settings):
    from trinity.engine import LLM, SamplingParams
    llm = LLM("trinity-tiny", dtype="float32", tensor_parallel_size=tp, **settings)
    try:
        outs = llm.generate(prompt_token_ids=prompts,
                            sampling_params=SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
        return [o.outputs[0].token_ids for o in outs], llm.engine.stats()
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_engine_greedy_tokens_tp2_equal_tp1():
    """64 greedy tokens per prompt on the built-in model: chunked prefill (chunks of 48 tokens), prefix caching
    (prompts sharing a long prefix), preemption (a KV pool too small for every sequence at once) and look-ahead
    decoding, over one process and over two."""
    shared = random_prompts([70], seed=5)[0]
    prompts = [shared + p for p in random_prompts([5, 20, 9], seed=6)] + random_prompts([90, 3], seed=7)
    settings = dict(max_num_seqs=4, max_num_batched_tokens=48, num_kv_blocks=30, block_size=8,
                    async_scheduling=True, enable_prefix_caching=True)
    want, stats1 = _generate(1, prompts, **settings)
    got, stats2 = _generate(2, prompts, **settings)
    assert got == want
    for stats in (stats1, stats2):
        assert stats["num_preemptions"] > 0 and stats["prefix_cache"]["hit_tokens"] > 0
        assert stats["num_lookahead_steps"] > 0


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_plan_and_engine_agree_on_large_per_gpu(tp):
    """`trinity plan` and a tensor-parallel rank of the engine, for Trinity Large in bf16 at TP=2/4/8: the same
    weights per GPU (the rank's parameters, built on the meta device), the same KV bytes per token per GPU (the
    rank's KV heads) and so the same KV budget per GPU (on a device of 480 GB: bf16 Large leaves no room for KV on
    two 80 GB GPUs, where both would say 0)."""
    from trinity.engine.runner import kv_budget, plan_cache
    from trinity.ops.plan import GB, PlanInputs, make_plan

    large = preset("large")
    planned = make_plan(PlanInputs(model="large", config=large, gpus=tp, tensor_parallel_size=tp, memory_gb=480))
    fit, kv = planned["fit"], planned["kv_cache"]
    for rank in (0, tp - 1):
        model = TrinityForCausalLM.empty(large, torch.bfloat16, "meta", shard=ShardPlan(large, rank, tp))
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        # the planner counts every tensor in bf16 and no vocabulary padding: the engine keeps norms in fp32
        assert weights == pytest.approx(fit["weights_gb_per_gpu"] * GB, rel=2e-3)
        cache = plan_cache(model, 16, 1, 32768, kv_cache_memory=1 << 40)
        copies = min(tp, large.num_key_value_heads)
        assert cache.full_block_bytes / 16 == kv["full_bytes_per_token"] / copies
        assert cache.sliding_block_bytes / 16 == kv["sliding_bytes_per_token"] / copies
        budget = kv_budget(int(480 * GB), 0.9, weights, 0, int(planned["gpu"]["reserve_gb"] * GB))
        assert budget > 0
        assert budget == pytest.approx(fit["kv_budget_gb_per_gpu"] * GB, rel=5e-3)


@pytest.mark.parametrize("tp", [4, 8])
def test_plan_and_engine_agree_on_large_w4a16_per_gpu(tp):
    """Seed 001's budget path: Trinity Large in W4A16 (groups of 128, asymmetric, lm_head and routers left in 16
    bits) over 4 or 8 GPUs: `trinity plan --weights-dtype w4a16` and a rank of the engine hold the same weights per
    GPU (its packed codes, fp32 scales and uint8 zero points, built on the meta device)."""
    from trinity.ops.plan import GB, PlanInputs, make_plan
    from trinity.quant.scheme import from_hf

    quant = from_hf({"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": [
        "lm_head", "re:.*mlp\\.router\\.gate$"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128}}}})
    large = preset("large")
    planned = make_plan(PlanInputs(model="large", config=large, gpus=tp, tensor_parallel_size=tp,
                                   weights_dtype="w4a16", memory_gb=80))
    for rank in (0, tp - 1):
        model = TrinityForCausalLM.empty(large, torch.bfloat16, "meta", quant=quant,
                                         shard=ShardPlan(large, rank, tp, quant=quant))
        assert type(model.model.layers[-1].mlp.experts).__name__ == "Int4Experts"
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        assert weights == pytest.approx(planned["fit"]["weights_gb_per_gpu"] * GB, rel=2e-3)
    assert planned["fit"]["fits"] and planned["fit"]["weights_gb_per_gpu"] < 60


def test_update_weights_reaches_every_rank():
    """GRPO's in-place weight update over two ranks: rank 0 sends each whole tensor, every rank copies its own slice,
    and the greedy tokens are then those of one process serving the new weights (the prefix cache forgotten)."""
    from engine_helpers import tiny_model

    from trinity.engine import LLM, SamplingParams

    old, new = tiny_model(seed=0), tiny_model(seed=3)
    prompts = random_prompts([12, 30, 7], seed=8)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def greedy(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]

    want = greedy(LLM(new))
    llm = LLM(old, tensor_parallel_size=2, enable_prefix_caching=True)
    try:
        before = greedy(llm)
        assert llm.update_weights(new.state_dict()) == len(new.state_dict())
        after = greedy(llm)
        with pytest.raises(ValueError, match="shape"):  # whole shapes are checked before anything is sent
            llm.update_weights({"model.embed_tokens.weight": torch.zeros(3, 3)})
        assert greedy(llm) == after  # and the ranks still agree
    finally:
        llm.shutdown()
    assert before != want and after == want
