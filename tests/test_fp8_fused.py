"""FP8 projections fused for inference (`quant.modules.Fp8FusedLinears`, re-blocked where a part's rows are not
whole blocks) and FP8 experts with the shared expert stacked (`Fp8Experts.stack_shared`), which the model's whole-
layer C path (`MoEBlock` path "fp8") computes in one call: the same outputs as the separate modules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trinity import TrinityForCausalLM, preset
from trinity.kernels import native
from trinity.model.layers import fuse_linears
from trinity.model.moe import MoEBlock
from trinity.quant import fp8
from trinity.quant.modules import Fp8Experts, Fp8FusedLinears, Fp8Linear, quantize_model
from trinity.quant.scheme import QuantConfig

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler (or the build failed)")


def fp8_linear(out: int, inp: int, block=(128, 128), seed: int = 0) -> Fp8Linear:
    m = Fp8Linear(out, inp, block)
    m.weight.data, m.weight_scale.data = fp8.quantize(torch.randn(out, inp, generator=torch.Generator()
                                                                  .manual_seed(seed)) / 8, block)
    return m


@pytest.mark.parametrize("sizes,block", [([128, 64, 64, 128], (128, 128)),  # the built-in model's attention
                                          ([96, 96], (128, 128)),            # its shared expert: partial blocks
                                          ([200, 72], (64, 32))])
@pytest.mark.parametrize("rows", [1, 40])  # the C kernel (decode) and dequantize + GEMM (prefill)
def test_fused_fp8_projections_equal_the_separate_ones(sizes, block, rows):
    modules = [fp8_linear(n, 160, block, seed=i) for i, n in enumerate(sizes)]
    x = torch.randn(rows, 160)
    with torch.no_grad():
        separate = [m(x) for m in modules]
        fused = fuse_linears(modules)
        assert isinstance(fused, Fp8FusedLinears) and fused.valid()
        assert all(m.weight.data_ptr() == fused.weight.data_ptr() + offset * 160
                   for m, offset in zip(modules, [sum(sizes[:i]) for i in range(len(sizes))]))
        for got, want in zip(fused(x), separate, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        modules[1].weight_scale = nn.Parameter(modules[1].weight_scale.clone(), requires_grad=False)
        assert not fused.valid()  # a replaced scale: the separate modules run again


def test_projections_that_cannot_share_a_gemm_are_not_fused():
    a, b = fp8_linear(64, 160, (64, 32)), fp8_linear(64, 160, (64, 48))  # different column blocks
    assert fuse_linears([a, b]) is None
    assert fuse_linears([nn.Linear(160, 8, bias=False), a]) is None  # plain and FP8 mixed


def quantized_moe_model(dtype=torch.float32):
    cfg = preset("tiny", vocab_size=301, hidden_size=128, moe_intermediate_size=96, num_experts=8,
                 num_experts_per_tok=2)
    return quantize_model(TrinityForCausalLM.random(cfg, seed=0, dtype=dtype).eval(), QuantConfig.online_fp8())


@needs_native
# decode-sized (the whole-layer C call) and prefill-sized (over 32 tokens per expert: the routed path, where the
# stacked shared expert's gate and up run fused)
@pytest.mark.parametrize("tokens,path", [(3, "fp8"), (200, "routed")])
def test_fp8_model_with_fused_projections_and_stacked_shared_expert(tokens, path):
    plain = quantized_moe_model()
    fused = copy.deepcopy(plain).fuse_projections()
    blocks = [m for m in fused.modules() if isinstance(m, MoEBlock)]
    assert blocks and all(b.experts.stacked_with(b.shared_experts) for b in blocks)
    ids = torch.randint(0, 301, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode():
        assert blocks[0]._path(torch.randn(tokens, 128)) == path
        assert isinstance(blocks[0].shared_experts.fused, Fp8FusedLinears)
        want, got = plain(ids).float(), fused(ids).float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the stacked tensors hold the shared expert's own FP8 weights: its module reads them as before
    b = blocks[0]
    assert torch.equal(b.experts.stacked[0][-1, :96].view(torch.uint8),
                       b.shared_experts.gate_proj.weight.view(torch.uint8))


@needs_native
def test_fp8_layer_counts_expert_load_and_agrees_with_the_routed_path():
    """The "fp8" path against the routed path (router in torch, experts, shared expert apart) on one block, with
    the step's expert-load row counted the same."""
    block = next(m for m in quantized_moe_model().modules() if isinstance(m, MoEBlock))
    block.fuse_projections()
    x = torch.randn(4, 128)

    class Step:
        def __init__(self):
            self.expert_counts = torch.zeros(1, 8, dtype=torch.long)

    with torch.inference_mode():
        assert block._path(x) == "fp8"
        fast_step = Step()
        fast = block(x, fast_step)
        block.record_router = True  # forces the routed path (training's)
        slow_step = Step()
        slow = block(x, slow_step)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    assert torch.equal(fast_step.expert_counts, slow_step.expert_counts) and fast_step.expert_counts.sum() == 8


def test_stacking_is_refused_where_the_shared_expert_does_not_match():
    experts = Fp8Experts(8, 128, 96, QuantConfig.online_fp8())
    block = next(m for m in quantized_moe_model().modules() if isinstance(m, MoEBlock))
    shared = block.shared_experts
    shared.down_proj = fp8_linear(128, 96, (64, 64))  # other blocks than the routed experts'
    assert not experts.stack_shared(shared) and experts.stacked is None
