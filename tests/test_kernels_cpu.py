"""The CPU fast paths (weight-first GEMM orientation for small fp32 batches) against their references, and
the dispatch that picks them."""

import pytest
import torch
import torch.nn.functional as F

from trinity.kernels import linear as klinear
from trinity.kernels import moe as kmoe
from trinity.kernels import use_reference


@pytest.mark.parametrize("rows", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("leading", [(), (2,)])
def test_linear_weight_first_equals_f_linear(rows, leading):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(*leading, rows, 96, generator=g)
    w = torch.randn(200, 96, generator=g)
    got = klinear.linear_weight_first(x, w)
    assert got.shape == (*leading, rows, 200) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_linear_dispatch_picks_weight_first_only_for_small_fp32_inference():
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    with torch.no_grad():
        assert klinear.weight_first_wanted(x, w)
        assert not klinear.weight_first_wanted(torch.randn(klinear.CPU_SMALL_ROWS + 1, 16), w)
        assert not klinear.weight_first_wanted(x.bfloat16(), w.bfloat16())
        use_reference(True)
        try:
            assert not klinear.weight_first_wanted(x, w)
        finally:
            use_reference(None)
    assert not klinear.weight_first_wanted(x, w)  # autograd on: the plain F.linear (its backward is standard)


def _problem(tokens, experts, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 24, generator=g)
    gate_up = torch.randn(experts, 2 * 10, 24, generator=g) / 5
    down = torch.randn(experts, 24, 10, generator=g) / 3
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    return x, w, ids, gate_up, down


@pytest.mark.parametrize("tokens,experts,k", [(1, 4, 2), (5, 8, 2), (32, 32, 4), (128, 16, 4)])
def test_experts_weight_first_equals_reference(tokens, experts, k):
    x, w, ids, gate_up, down = _problem(tokens, experts, k, seed=tokens)
    torch.testing.assert_close(kmoe.experts_weight_first(x, w, ids, gate_up, down),
                               kmoe.experts_reference(x, w, ids, gate_up, down), rtol=1e-4, atol=1e-5)


def test_experts_weight_first_single_token_groups_and_unused_experts():
    x, w, _, gate_up, down = _problem(3, 6, 2, seed=7)
    ids = torch.tensor([[5, 0], [5, 2], [0, 5]])  # experts 1, 3, 4 unused; expert 2 gets one token
    torch.testing.assert_close(kmoe.experts_weight_first(x, w, ids, gate_up, down),
                               kmoe.experts_reference(x, w, ids, gate_up, down), rtol=1e-4, atol=1e-5)


def test_routed_experts_takes_weight_first_for_small_cpu_fp32_batches():
    x, w, ids, gate_up, down = _problem(4, 8, 2, seed=1)
    with torch.no_grad():
        assert kmoe.weight_first_wanted(x, gate_up)
        assert not kmoe.weight_first_wanted(torch.randn(kmoe.CPU_WEIGHT_FIRST_MAX_TOKENS + 1, 24), gate_up)
        assert not kmoe.weight_first_wanted(x.bfloat16(), gate_up.bfloat16())
        torch.testing.assert_close(kmoe.routed_experts(x, w, ids, gate_up, down),
                                   kmoe.experts_weight_first(x, w, ids, gate_up, down), rtol=0, atol=0)
