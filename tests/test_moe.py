"""MoE routing and expert compute against hand-computed cases (HF always normalises; we honour route_norm)."""

import math

import pytest
import torch
import torch.nn.functional as F

from trinity import TrinityForCausalLM, preset
from trinity.kernels.moe import experts_reference
from trinity.kernels.moe import route_reference as route
from trinity.model.moe import MoEBlock


def _gate_reading_coordinates(num_experts: int, hidden: int) -> torch.Tensor:
    """Router weight whose logit for expert e is x[e]: scores are sigmoid of the input's first coordinates."""
    w = torch.zeros(num_experts, hidden)
    w[:, :num_experts] = torch.eye(num_experts)
    return w


def test_bias_selects_but_does_not_weight():
    # logits [0, ln 3, -ln 3] -> sigmoid scores [0.5, 0.75, 0.25]
    x = torch.tensor([[0.0, math.log(3.0), -math.log(3.0), 0.0]])
    gate = _gate_reading_coordinates(3, 4)
    bias = torch.tensor([1.0, 0.0, 0.0])  # pushes expert 0 above expert 1 for selection only
    w, ids = route(x, gate, bias, top_k=1, route_norm=False, route_scale=2.0)
    assert ids.tolist() == [[0]]
    assert torch.allclose(w, torch.tensor([[0.5 * 2.0]]))  # its unbiased score, scaled
    w, ids = route(x, gate, bias, top_k=2, route_norm=True, route_scale=2.0)
    assert ids.tolist() == [[0, 1]]
    assert torch.allclose(w, torch.tensor([[0.5 / 1.25 * 2.0, 0.75 / 1.25 * 2.0]]))


def test_route_norm_false_keeps_raw_scores():
    x = torch.tensor([[0.0, math.log(3.0), -math.log(3.0), 0.0]])
    gate = _gate_reading_coordinates(3, 4)
    w, ids = route(x, gate, torch.zeros(3), top_k=2, route_norm=False, route_scale=1.5)
    assert ids.tolist() == [[1, 0]]
    assert torch.allclose(w, torch.tensor([[0.75 * 1.5, 0.5 * 1.5]]))
    assert abs(w.sum().item() - 1.5) > 0.3  # not normalised


def test_router_runs_in_fp32_for_bf16_inputs():
    x = torch.randn(5, 16).to(torch.bfloat16)
    w, ids = route(x, torch.randn(8, 16).to(torch.bfloat16), torch.zeros(8), 2, True, 1.0)
    assert w.dtype == torch.float32 and ids.shape == (5, 2)


def _swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def test_moe_block_matches_per_token_loop_without_shared_expert_and_norm():
    cfg = preset("tiny", num_shared_experts=0, route_norm=False, num_experts=6, num_experts_per_tok=3,
                 route_scale=1.7)
    torch.manual_seed(0)
    block = MoEBlock(cfg)
    assert block.shared_experts is None
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(7, cfg.hidden_size)
    inter = cfg.moe_intermediate_size
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):  # one token at a time, written out
        scores = torch.sigmoid(x[t] @ block.router.gate.weight.T)
        chosen = torch.topk(scores + block.expert_bias, 3).indices
        for e in chosen.tolist():
            gu = block.experts.gate_up_proj[e]
            y = _swiglu(x[t:t + 1], gu[:inter], gu[inter:], block.experts.down_proj[e])[0]
            expected[t] += scores[e] * 1.7 * y
    with torch.no_grad():
        got = block(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_shared_expert_is_added_for_every_token():
    cfg = preset("tiny", num_shared_experts=2)
    torch.manual_seed(1)
    block = MoEBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    assert block.shared_experts.gate_proj.weight.shape == (2 * cfg.moe_intermediate_size, cfg.hidden_size)
    x = torch.randn(4, cfg.hidden_size)
    with torch.no_grad():
        w, ids = route(x, block.router.gate.weight, block.expert_bias, cfg.num_experts_per_tok, True,
                       cfg.route_scale)
        routed = experts_reference(x, w, ids, block.experts.gate_up_proj, block.experts.down_proj)
        # the block may run another expert kernel (its own rounding) than the reference it is compared with
        torch.testing.assert_close(block(x), routed + block.shared_experts(x), rtol=1e-5, atol=1e-5)


def test_model_without_shared_experts_and_route_norm_runs_and_round_trips(tmp_path):
    cfg = preset("tiny", num_shared_experts=0, route_norm=False)
    model = TrinityForCausalLM.random(cfg, seed=3)
    model.save_pretrained(tmp_path)
    names = {n for n, _ in model.named_parameters()}
    assert not any("shared_experts" in n for n in names)
    again = TrinityForCausalLM.from_pretrained(tmp_path)
    assert again.config.route_norm is False and again.config.num_shared_experts == 0
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_experts_reference_handles_unused_experts_and_repeated_tokens():
    torch.manual_seed(2)
    gate_up, down = torch.randn(4, 6, 5), torch.randn(4, 5, 3)
    x = torch.randn(3, 5)
    ids = torch.tensor([[3, 3], [3, 0], [0, 3]])  # experts 1 and 2 unused; expert 3 twice for token 0
    w = torch.tensor([[0.25, 0.5], [1.0, 2.0], [0.5, 0.5]])
    got = experts_reference(x, w, ids, gate_up, down)
    for t in range(3):
        want = sum(w[t, j] * _swiglu(x[t:t + 1], gate_up[e, :3], gate_up[e, 3:], down[e])[0]
                   for j, e in enumerate(ids[t].tolist()))
        assert torch.allclose(got[t], want, atol=1e-5)


def test_router_weight_cache_is_inference_only_and_follows_updates():
    """bf16 inference reads a cached fp32 copy of the router weight; autograd always sees the parameter itself."""
    cfg = preset("tiny")
    block = MoEBlock(cfg).to(torch.bfloat16)
    with torch.no_grad():
        block.router.gate.weight.copy_(torch.randn_like(block.router.gate.weight))
        cached = block.router_weight_fp32()
        assert cached.dtype == torch.float32 and torch.equal(cached, block.router.gate.weight.float())
        assert block.router_weight_fp32() is cached  # converted once
        block.router.gate.weight.mul_(2)  # an in-place update (a load, an optimizer step) is picked up
        assert torch.equal(block.router_weight_fp32(), block.router.gate.weight.float())
    assert block.router_weight_fp32() is block.router.gate.weight  # grad enabled: no detached copy


@pytest.mark.parametrize("fused", [False, True])
def test_blocks_count_into_the_step_metadata_rows(fused):
    """The step's `expert_counts` table: the MoE block of MoE index j adds its routed tokens to row j (each block's
    own counter when the metadata has none), weighted by `count_weight`; on the CPU's native path and the torch one,
    layer by layer and chained (`fuse_projections`)."""
    from dataclasses import dataclass

    from trinity.kernels import use_reference
    from trinity.model.attention import PackedSequences

    @dataclass(slots=True)
    class CountedSequences(PackedSequences):
        expert_counts: torch.Tensor | None = None
        count_weight: torch.Tensor | None = None

    cfg = preset("tiny")
    model = TrinityForCausalLM.random(cfg, seed=7).eval()
    if fused:
        model.fuse_projections()
    blocks = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoEBlock)]
    assert [b.moe_index for b in blocks] == list(range(cfg.num_moe_layers))
    ids = torch.randint(0, cfg.vocab_size, (9,), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(9)
    for reference in (False, True):
        use_reference(reference)
        try:
            with torch.no_grad():
                for b in blocks:
                    b.track_expert_load()
                model(ids, pos, PackedSequences([9]))
                own = torch.stack([b.expert_counts for b in blocks])
                for b in blocks:
                    b.track_expert_load(False)
                table = torch.zeros(cfg.num_moe_layers, cfg.num_experts, dtype=torch.long)
                model(ids, pos, CountedSequences([9], expert_counts=table))
                weighted = torch.zeros_like(table)
                model(ids, pos, CountedSequences([9], expert_counts=weighted,
                                                 count_weight=torch.tensor([1] * 7 + [0] * 2)))
                prefix = torch.zeros_like(table)  # causal: the first 7 tokens route alike without the last 2
                model(ids[:7], pos[:7], CountedSequences([7], expert_counts=prefix))
        finally:
            use_reference(None)
        assert torch.equal(table, own) and (table.sum(dim=1) == 9 * cfg.num_experts_per_tok).all()
        assert torch.equal(weighted, prefix)
