"""The CPU fast paths (oneDNN packed-weight linear, weight-first GEMM orientation for small fp32 batches) against
their references, and the dispatch that picks them."""

import ctypes

import pytest
import torch
import torch.nn.functional as F

from trinity.kernels import linear as klinear
from trinity.kernels import moe as kmoe
from trinity.kernels import native as knative
from trinity.kernels import use_reference


@pytest.mark.parametrize("impl", ["weight_first", "onednn"])
@pytest.mark.parametrize("rows", [1, 2, 3, 17, 64, 300])
@pytest.mark.parametrize("leading", [(), (2,)])
def test_fast_linears_equal_f_linear(impl, rows, leading):
    if impl == "onednn" and not klinear.onednn_available():
        pytest.skip("this torch build has no oneDNN")
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(*leading, rows, 96, generator=g)
    w = torch.randn(200, 96, generator=g)
    got = getattr(klinear, f"linear_{impl}")(x, w)
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


needs_onednn = pytest.mark.skipif(not klinear.onednn_available(), reason="this torch build has no oneDNN")


@needs_onednn
def test_packed_weight_follows_changes_to_the_weight():
    """The packed copy is reused while the weight is unchanged and redone after an in-place update (also one
    made through another view of the same storage) or a new `.data`."""
    fused = torch.randn(64, 32)
    w = fused[:40]  # a view, as FusedLinears hands out
    x = torch.randn(4, 32)
    first = klinear.packed_weight(w)
    assert klinear.packed_weight(w) is first
    fused.mul_(2)  # through the base
    assert klinear.packed_weight(w) is not first
    torch.testing.assert_close(klinear.linear_onednn(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
    p = torch.nn.Parameter(torch.randn(40, 32))
    before = klinear.linear_onednn(x, p)
    with torch.no_grad():
        p.data = torch.randn(40, 32)
    after = klinear.linear_onednn(x, p)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, F.linear(x, p), rtol=1e-4, atol=1e-4)


@needs_onednn
def test_packed_copy_is_dropped_with_its_weight():
    w = torch.randn(16, 8)
    klinear.packed_weight(w)
    key = id(w)
    assert key in klinear._packed
    del w
    assert key not in klinear._packed


def test_linear_dispatch_picks_onednn_for_fp32_cpu_inference_only():
    x, w = torch.randn(300, 16), torch.randn(4, 16)
    with torch.no_grad():
        assert klinear.onednn_wanted(x, w) == klinear.onednn_available()
        assert not klinear.onednn_wanted(x.bfloat16(), w.bfloat16())
        use_reference(True)
        try:
            assert not klinear.onednn_wanted(x, w)
        finally:
            use_reference(None)
    assert not klinear.onednn_wanted(x, w)  # autograd on: F.linear, whose backward is standard


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


def test_routed_experts_takes_weight_first_for_small_cpu_fp32_batches(monkeypatch):
    monkeypatch.setenv("TRINITY_CPU_NATIVE", "0")  # the native kernel, where built, comes first
    x, w, ids, gate_up, down = _problem(4, 8, 2, seed=1)
    with torch.no_grad():
        assert kmoe.weight_first_wanted(x, gate_up)
        assert not kmoe.weight_first_wanted(torch.randn(kmoe.CPU_WEIGHT_FIRST_MAX_TOKENS + 1, 24), gate_up)
        assert not kmoe.weight_first_wanted(x.bfloat16(), gate_up.bfloat16())
        torch.testing.assert_close(kmoe.routed_experts(x, w, ids, gate_up, down),
                                   kmoe.experts_weight_first(x, w, ids, gate_up, down), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- native C kernel
needs_native = pytest.mark.skipif(knative.library() is None, reason="no C compiler (or the build failed)")


@needs_native
@pytest.mark.parametrize("tokens,experts,k,hidden,inter", [
    (1, 4, 2, 24, 10),      # rows shorter than one vector: only the scalar tail
    (5, 8, 2, 40, 18),      # a vector plus a tail; row blocks that end early
    (32, 32, 4, 64, 48),    # a decode batch
    (300, 16, 4, 48, 32),   # many tokens per expert: several 8-token passes with a remainder
])
def test_experts_native_equals_reference(tokens, experts, k, hidden, inter):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    down = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    torch.testing.assert_close(kmoe.experts_native(x, w, ids, gate_up, down),
                               kmoe.experts_reference(x, w, ids, gate_up, down), rtol=1e-4, atol=1e-5)


@needs_native
def test_experts_native_unused_experts_one_token_groups_and_one_crowded_expert():
    x, w, _, gate_up, down = _problem(11, 6, 2, seed=7)
    ids = torch.tensor([[5, 0]] * 9 + [[2, 5], [0, 5]])  # expert 5 gets all 11 tokens, 2 gets one, 1/3/4 none
    torch.testing.assert_close(kmoe.experts_native(x, w, ids, gate_up, down),
                               kmoe.experts_reference(x, w, ids, gate_up, down), rtol=1e-4, atol=1e-5)


@needs_native
def test_experts_native_reads_views_of_the_stacked_tensor():
    """After `MoEBlock.fuse_projections` the routed experts are the first E of E + 1 stacked experts."""
    x, w, ids, gate_up, down = _problem(8, 8, 2, seed=3)
    stacked_gate_up, stacked_down = torch.cat([gate_up, gate_up[:1] * 9]), torch.cat([down, down[:1] * 9])
    torch.testing.assert_close(kmoe.experts_native(x, w, ids, stacked_gate_up[:8], stacked_down[:8]),
                               kmoe.experts_reference(x, w, ids, gate_up, down), rtol=1e-4, atol=1e-5)


@needs_native
def test_routed_experts_takes_the_native_kernel_for_cpu_inference(monkeypatch):
    x, w, ids, gate_up, down = _problem(4, 8, 2, seed=1)
    with torch.no_grad():
        assert kmoe.native_wanted(x, gate_up) and kmoe.native_wanted(x.bfloat16(), gate_up.bfloat16())
        assert not kmoe.native_wanted(x.half(), gate_up.half())
        torch.testing.assert_close(kmoe.routed_experts(x, w, ids, gate_up, down),
                                   kmoe.experts_native(x, w, ids, gate_up, down), rtol=0, atol=0)
        monkeypatch.setenv("TRINITY_CPU_NATIVE", "0")
        assert knative.library() is None and not kmoe.native_wanted(x, gate_up)


@needs_native
def test_native_build_is_cached_by_content(tmp_path, monkeypatch):
    """A second build with the same source, compiler and CPU finds the first one's file; a fresh cache folder
    gets a fresh build that loads and runs."""
    monkeypatch.setenv("TRINITY_CACHE", str(tmp_path))
    compiler = knative.find_compiler()
    first = knative._build(compiler)
    assert first.parent == tmp_path / "native" and first.exists()
    mtime = first.stat().st_mtime_ns
    assert knative._build(compiler) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left behind
    ctypes.CDLL(str(first)).trinity_moe_experts  # noqa: B018  (the symbol is there)


@needs_native
@pytest.mark.parametrize("batch,hq,hkv,dim,slots,width", [
    (1, 1, 1, 8, 16, 5),        # head_dim below one vector
    (3, 4, 2, 40, 64, 17),      # GQA groups of 2, a vector plus a tail
    (32, 4, 2, 128, 512, 96),   # the benchmark model's decode shape
    (2, 8, 1, 64, 32, 32),      # one KV head for 8 query heads
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_attention_equals_gather_and_sdpa(batch, hq, hkv, dim, slots, width, dtype):
    """Random contexts with padding, read by slot; the new K/V written to their slots first, as the engine does.
    bf16 pools: compared with fp32 attention over the same bf16 values (the kernel computes in fp32)."""
    from trinity.kernels import attention as kattn

    g = torch.Generator().manual_seed(batch * 100 + dim)
    k_cache, v_cache = torch.randn(slots, hkv, dim, generator=g), torch.randn(slots, hkv, dim, generator=g)
    q = torch.randn(batch, hq, dim, generator=g)
    new_k, new_v = torch.randn(batch, hkv, dim, generator=g), torch.randn(batch, hkv, dim, generator=g)
    perm = torch.randperm(slots, generator=g)
    new_slots = perm[:batch]
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    # other slots drawn from those no new token goes to (another sequence's new slot is never in a context)
    ctx = perm[batch:][torch.randint(0, slots - batch, (batch, width), generator=g)]
    valid = torch.arange(width)[None, :] < lengths[:, None]
    ctx[torch.arange(batch), lengths - 1] = new_slots  # each context ends with its new token
    ctx = ctx.masked_fill(~valid, 0)
    q, k_cache, v_cache, new_k, new_v = (t.to(dtype) for t in (q, k_cache, v_cache, new_k, new_v))
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_k[new_slots], ref_v[new_slots] = new_k, new_v
    expected = kattn.decode_attention_reference(q.float(), ref_k.float(), ref_v.float(), ctx, valid, dim ** -0.5)
    got = kattn.decode_attention_native(q, k_cache, v_cache, ctx, valid, dim ** -0.5, new_k, new_v, new_slots)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)  # the writes, and nothing else


@needs_native
def test_native_decode_attention_rejects_unsupported_shapes():
    from trinity.kernels import attention as kattn

    q, cache = torch.randn(1, 3, 8), torch.randn(4, 2, 8)  # 3 query heads over 2 KV heads
    with pytest.raises(ValueError, match="3 query heads over 2 KV heads"):
        kattn.decode_attention_native(q, cache, cache.clone(), torch.zeros(1, 1, dtype=torch.long),
                                      torch.ones(1, 1, dtype=torch.bool), 1.0)


def _close(dtype):
    """fp32: within rounding of a different summation order; bf16: within one or two bf16 steps."""
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n", [(1, 8), (5, 40), (32, 512), (300, 512)])  # the last runs multi-threaded
def test_native_norms_equal_references(rows, n, dtype):
    from trinity.kernels import norm as knorm

    g = torch.Generator().manual_seed(rows + n)
    x, res = (torch.randn(rows, n, generator=g) * 3).to(dtype), torch.randn(rows, n, generator=g).to(dtype)
    w1, w2 = torch.rand(n, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5
    got = knorm.rms_norm_native(x, w1, 1e-6)
    assert got.dtype == dtype
    torch.testing.assert_close(got, knorm.rms_norm_reference(x, w1, 1e-6), **_close(dtype))
    got, expected = (knorm.norm_add_rms_norm_native(x, res, w1, w2, 1e-6),
                     knorm.norm_add_rms_norm_reference(x, res, w1, w2, 1e-6))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **_close(dtype))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("apply_rope", [True, False])
@pytest.mark.parametrize("tokens,hq,hkv,dim", [(1, 2, 1, 8), (7, 4, 2, 40), (600, 4, 2, 128)])
def test_native_qk_norm_rope_equals_reference(apply_rope, tokens, hq, hkv, dim, dtype):
    from trinity.kernels import norm as knorm
    from trinity.model.layers import RotaryEmbedding

    g = torch.Generator().manual_seed(tokens + dim)
    q, k = torch.randn(tokens, hq, dim, generator=g).to(dtype), torch.randn(tokens, hkv, dim, generator=g).to(dtype)
    qw, kw = torch.rand(dim, generator=g) + 0.5, torch.rand(dim, generator=g) + 0.5
    cos, sin = RotaryEmbedding(dim, 10000.0).cos_sin(torch.randint(0, 4000, (tokens,), generator=g), dtype)
    got = knorm.qk_norm_rope_native(q, k, qw, kw, 1e-6, cos, sin, apply_rope)
    expected = knorm.qk_norm_rope_reference(q, k, qw, kw, 1e-6, cos, sin, apply_rope)
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **_close(dtype))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_inference_dispatch_takes_native_norms_and_chained_norms_stay_bit_identical(dtype):
    """In fp32 CPU inference the model's norms run the C kernels; the chained sandwich norm and the separate norm
    + add + norm go through the same row routine, so they agree bit for bit (as the layer-by-layer forward and
    the fused one must)."""
    from trinity.kernels import norm as knorm

    x, res = torch.randn(4, 64).to(dtype), torch.randn(4, 64).to(dtype)
    w1, w2 = torch.rand(64) + 0.5, torch.rand(64) + 0.5
    with torch.no_grad():
        assert knorm.native_wanted(x, w1)
        normed, new_res = knorm.norm_add_rms_norm(x, res, w1, w2, 1e-6)
        assert torch.equal(new_res, res + knorm.rms_norm(x, w1, 1e-6))
        assert torch.equal(normed, knorm.rms_norm(new_res, w2, 1e-6))
    assert not knorm.native_wanted(x, w1.requires_grad_())  # autograd on: the references


@needs_native
@pytest.mark.parametrize("rows,k,n", [(1, 24, 10), (3, 40, 130), (8, 512, 600), (9, 64, 64), (70, 48, 100)])
def test_linear_native_equals_f_linear(rows, k, n):
    """Row tails, weight-row blocks that end early, and more rows than one pass (9) or one call chunk (70)."""
    g = torch.Generator().manual_seed(rows * k)
    x, w = torch.randn(2, rows, k, generator=g), torch.randn(n, k, generator=g)
    got = klinear.linear_native(x, w)
    assert got.shape == (2, rows, n) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-4, atol=1e-4)


@needs_native
def test_linear_dispatch_takes_native_for_a_few_rows_and_onednn_beyond():
    w = torch.randn(32, 16)
    with torch.no_grad():
        assert klinear.native_wanted(torch.randn(klinear.NATIVE_MAX_ROWS, 16), w)
        assert not klinear.native_wanted(torch.randn(klinear.NATIVE_MAX_ROWS + 1, 16), w)
        x = torch.randn(3, 16)
        torch.testing.assert_close(klinear.linear(x, w), klinear.linear_native(x, w), rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("tokens", [1, 32, 300])
def test_experts_native_bf16_weights_within_bf16_tolerance(tokens):
    """bf16 weights and activations: the kernel widens the weights exactly and keeps products, sums and SwiGLU in
    fp32, rounding only its output; compared with the fp32 computation on the same (bf16-valued) inputs it is
    within bf16 rounding, and closer to it than the bf16 reference, which rounds after every op."""
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 64, generator=g).bfloat16()
    gate_up = (torch.randn(8, 96, 64, generator=g) / 8).bfloat16()
    down = (torch.randn(8, 64, 48, generator=g) / 7).bfloat16()
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2, generator=g)
    exact = kmoe.experts_reference(x.float(), w, ids, gate_up.float(), down.float())
    got = kmoe.experts_native(x, w, ids, gate_up, down)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), exact, rtol=1e-2, atol=1e-2)
    err_native = (got.float() - exact).abs().mean()
    err_reference = (kmoe.experts_reference(x, w, ids, gate_up, down).float() - exact).abs().mean()
    assert err_native <= err_reference


@needs_native
def test_linear_native_bf16_weights_within_bf16_tolerance():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 80, generator=g).bfloat16(), torch.randn(130, 80, generator=g).bfloat16()
    got = klinear.linear_native(x, w)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2)


@needs_native
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("tokens,route_norm", [(1, True), (32, True), (70, False)])  # 70: routing in parallel
def test_moe_layer_native_equals_reference_routing_and_experts(tokens, route_norm, shared):
    g = torch.Generator().manual_seed(tokens)
    experts, top_k, hidden, inter = 12, 3, 40, 24
    x = torch.randn(tokens, hidden, generator=g)
    router = torch.randn(experts, hidden, generator=g) / hidden ** 0.5
    bias = torch.randn(experts, generator=g) * 0.1  # shifts which experts are chosen, not their weights
    stacked = experts + int(shared)
    gate_up = torch.randn(stacked, 2 * inter, hidden, generator=g) / hidden ** 0.5
    down = torch.randn(stacked, hidden, inter, generator=g) / inter ** 0.5
    weights, ids = kmoe.route_reference(x, router, bias, top_k, route_norm, 2.5)
    expected = kmoe.experts_reference(x, weights, ids, gate_up[:experts], down[:experts])
    if shared:
        gg, u = F.linear(x, gate_up[experts]).chunk(2, dim=-1)
        expected = expected + F.linear(F.silu(gg) * u, down[experts])
    counts = torch.full((experts,), 5, dtype=torch.long)
    with torch.no_grad():
        got = kmoe.moe_layer_native(x, router, bias, top_k, route_norm, 2.5, gate_up, down, shared, counts)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(counts, 5 + torch.bincount(ids.reshape(-1), minlength=experts))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_block_cpu_inference_takes_the_native_layer_and_matches_the_reference(dtype, monkeypatch):
    """The model's MoE block, fused (shared expert stacked) and not, against the same block with the references
    forced; the native path really runs (the torch routing is never called)."""
    from trinity.config import preset
    from trinity.model import moe as model_moe
    from trinity.model.moe import MoEBlock

    cfg = preset("tiny", hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    block = MoEBlock(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / 8)
    block = block.to(dtype)
    x = torch.randn(6, 64, generator=g).to(dtype)
    for fuse in (False, True):
        if fuse:
            block.fuse_projections()
        with torch.no_grad():
            use_reference(True)
            try:
                expected = block(x)
            finally:
                use_reference(None)
            monkeypatch.setattr(model_moe, "kernel_route", None)  # would raise if the torch routing ran
            got = block(x)
            monkeypatch.undo()
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(got, expected, **tol)
