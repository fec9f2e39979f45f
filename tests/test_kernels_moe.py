"""The fused Triton MoE against `experts_reference` (run under TRITON_INTERPRET=1 on the CPU, or on a CUDA
device), the token/expert alignment it relies on, its config table, and the `routed_experts` dispatch."""


import pytest
import torch

from trinity import preset
from trinity.kernels import moe as kmoe
from trinity.kernels.moe import experts_reference, routed_experts
from trinity.kernels.moe import route_reference as route

# the interpreter/GPU switches, tolerances and comparison are the norm kernels' tests' own
from test_kernels_norm import (DEVICE, HAS_CUDA, HAS_TRITON, INTERPRET, TOL, _assert_close,  # noqa: F401
                               compile_sm90, needs_compile_check, needs_gpu, needs_triton, spill_free)

needs_triton_module = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def _problem(t, e, k, h, inter, dtype, device=DEVICE, ids=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(device=device, dtype=dtype)
    gate_up = (torch.randn(e, 2 * inter, h, generator=g) / h ** 0.5).to(device=device, dtype=dtype)
    down = (torch.randn(e, h, inter, generator=g) / inter ** 0.5).to(device=device, dtype=dtype)
    scores = torch.sigmoid(torch.randn(t, e, generator=g))
    w, top = torch.topk(scores, k, dim=-1)
    if ids is None:
        ids = top
    w = (w / w.sum(-1, keepdim=True) * 2.5).to(device)
    return x, w, ids.to(device), gate_up, down


# ============================================================================== alignment and configs
def _align_impl(name):
    from trinity.kernels import moe_triton
    if name == "triton" and not (INTERPRET or HAS_CUDA):
        pytest.skip("the Triton align kernel needs a CUDA device or the interpreter (TRITON_INTERPRET=1)")
    return moe_triton.moe_align if name == "torch" else moe_triton.moe_align_triton


@needs_triton_module
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("t,e,k,block_m", [(9, 6, 3, 1), (9, 6, 3, 4), (9, 6, 3, 16), (40, 128, 8, 16),
                                           (1, 128, 8, 16)])
def test_moe_align_groups_slots_by_expert(impl, t, e, k, block_m):
    moe_align = _align_impl(impl)
    torch.manual_seed(t * e + block_m)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    ids[:, 0] = 4  # one expert for every token; some experts may get none
    slots, block_expert = moe_align(ids.to(DEVICE), e, block_m)
    slots, block_expert = slots.cpu(), block_expert.cpu()
    n = t * k
    assert slots.numel() == block_expert.numel() * block_m
    flat = ids.reshape(-1)
    seen = []
    for b, ex in enumerate(block_expert.tolist()):
        rows = slots[b * block_m:(b + 1) * block_m].tolist()
        if ex == e:  # past the end: padding only
            assert all(s == n for s in rows)
            continue
        real = [s for s in rows if s < n]
        assert real and all(flat[s].item() == ex for s in real)
        assert rows[:len(real)] == real  # padding only at the end of an expert's run
        seen += real
    assert sorted(seen) == list(range(n))  # every slot exactly once
    experts_in_order = [ex for ex in block_expert.tolist() if ex < e]
    assert experts_in_order == sorted(experts_in_order)


@needs_triton_module
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_moe_align_block_bound_covers_worst_case(impl):
    moe_align = _align_impl(impl)
    ids = torch.arange(8).reshape(1, 8)  # T=1, 8 distinct experts: 8 blocks of 16, each with one slot
    slots, block_expert = moe_align(ids.to(DEVICE), 128, 16)
    assert block_expert.tolist() == list(range(8))
    assert slots.view(8, 16)[:, 0].tolist() == list(range(8))
    assert (slots.view(8, 16)[:, 1:] == 8).all()


@needs_triton_module
def test_config_table_buckets():
    from trinity.kernels.moe_triton import CONFIGS, MoEConfig, get_config
    nano, mini = (1024, 256, 128, 8), (2048, 1024, 128, 8)
    for key in (nano, mini):
        for t, bucket in [(1, 1), (5, 1), (8, 8), (31, 8), (32, 32), (64, 64), (200, 64)]:
            assert get_config(t, *key) == CONFIGS[key][bucket]
    assert get_config(4, 96, 48, 8, 2) == MoEConfig()  # untuned default
    assert get_config(4096, *mini).block_m == 64  # prefill-sized: bigger row blocks
    assert get_config(100000, 96, 48, 8, 2).block_m == 64


@needs_triton_module
def test_fit_shared_memory_shrinks_stages_then_k_tiles():
    from trinity.kernels.moe_triton import MoEConfig, fit_shared_memory
    cfg = MoEConfig(block_m=16, up_n=64, up_k=128, down_n=64, down_k=128, num_stages=4)
    assert fit_shared_memory(cfg, 2, 227 * 1024) == cfg  # bf16 on an H100: as is
    fp32 = fit_shared_memory(cfg, 4, 99 * 1024)  # fp32 on a 99 KiB GPU: fewer stages suffice
    assert fp32 == MoEConfig(block_m=16, up_n=64, up_k=128, down_n=64, down_k=128, num_stages=2)
    tiny = fit_shared_memory(cfg, 4, 48 * 1024)  # then shorter K tiles
    assert tiny.num_stages == 2 and tiny.up_k == tiny.down_k == 64 and tiny.up_n == 64


# ============================================================================== Triton vs reference
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("t", [1, 3, 17])
def test_fused_moe_matches_reference(dtype, k, t):
    from trinity.kernels.moe_triton import MoEConfig, fused_moe
    x, w, ids, gate_up, down = _problem(t, 8, k, 64, 48, dtype, seed=t * 10 + k)
    # 16-wide tiles: several K steps in both GEMMs and a masked tail on I (48) and H (64 = 4 x 16)
    cfg = MoEConfig(block_m=16, up_n=32, up_k=16, down_n=16, down_k=32)
    got = fused_moe(x, w, ids, gate_up, down, config=cfg)
    _assert_close(got, experts_reference(x, w, ids, gate_up, down), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_one_expert_for_many_tokens(dtype):
    """Expert 3 takes all 17 tokens (two row blocks), experts 0 and 7 none; others a few each."""
    from trinity.kernels.moe_triton import MoEConfig, fused_moe
    t, e, k = 17, 8, 2
    second = torch.tensor([1, 2, 4, 5, 6] * 4)[:t]
    ids = torch.stack([torch.full((t,), 3), second], dim=1)
    x, w, ids, gate_up, down = _problem(t, e, k, 40, 24, dtype, ids=ids, seed=3)
    got = fused_moe(x, w, ids, gate_up, down, config=MoEConfig(block_m=16, up_n=16, up_k=16, down_n=16,
                                                                down_k=16))
    _assert_close(got, experts_reference(x, w, ids, gate_up, down), dtype)


@needs_triton
def test_fused_moe_with_the_torch_alignment(monkeypatch):
    """Batches past ALIGN_KERNEL_MAX_SLOTS are aligned in torch; same results."""
    from trinity.kernels import moe_triton
    monkeypatch.setattr(moe_triton, "ALIGN_KERNEL_MAX_SLOTS", 0)
    x, w, ids, gate_up, down = _problem(17, 8, 4, 32, 16, torch.bfloat16, seed=21)
    got = moe_triton.fused_moe(x, w, ids, gate_up, down)
    _assert_close(got, experts_reference(x, w, ids, gate_up, down), torch.bfloat16)


@needs_triton
def test_fused_moe_default_config_and_strided_input():
    from trinity.kernels.moe_triton import fused_moe
    x, w, ids, gate_up, down = _problem(5, 8, 2, 96, 32, torch.float32, seed=11)
    big = torch.zeros(5, 2 * 96, device=DEVICE)
    big[:, ::2] = x
    xs = big[:, ::2]  # column stride 2
    got = fused_moe(xs, w, ids, gate_up, down)
    _assert_close(got, experts_reference(x, w, ids, gate_up, down), torch.float32)


def _with_shared(x, w, ids, gate_up, down):
    """The reference for `shared=1`: routed experts, plus the last expert applied to every token with weight 1."""
    routed = experts_reference(x, w, ids, gate_up[:-1], down[:-1])
    inter = down.shape[2]
    h = x.float() @ gate_up[-1].float().T
    shared = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype).float() @ down[-1].float().T
    return (routed.float() + shared).to(x.dtype)


def _layer_with_shared(x, gate_up, down, k, seed, config=None):
    """`fused_moe_layer` with the shared expert stacked last (the decode path), from random router logits ->
    (its output, the reference: the model's routing, `experts_reference` plus the shared expert)."""
    from trinity.kernels.moe_triton import fused_moe_layer
    from trinity.kernels.moe import select_experts
    routed = gate_up.shape[0] - 1
    logits = torch.randn(x.shape[0], routed, generator=torch.Generator().manual_seed(seed)).to(x.device)
    bias = torch.zeros(routed, device=x.device)
    got = fused_moe_layer(x, logits, bias, k, True, 2.5, gate_up, down, shared=1, config=config)
    w, ids = select_experts(logits, bias, k, True, 2.5)
    return got, _with_shared(x, w, ids, gate_up, down)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 5, 17])
def test_fused_moe_with_a_shared_expert_matches_reference(dtype, t):
    from trinity.kernels.moe_triton import MoEConfig
    x, _, _, gate_up, down = _problem(t, 9, 2, 64, 48, dtype, seed=t)  # 8 routed experts + 1 shared
    cfg = MoEConfig(block_m=16, up_n=32, up_k=16, down_n=16, down_k=32)
    got, want = _layer_with_shared(x, gate_up, down, 2, seed=t, config=cfg)
    _assert_close(got, want, dtype)


@needs_triton
def test_routed_experts_dispatches_to_fused_moe_when_forced(monkeypatch):
    from trinity.kernels import moe_triton
    monkeypatch.setenv("TRINITY_KERNELS", "triton")
    calls = []
    real = moe_triton.fused_moe
    monkeypatch.setattr(moe_triton, "fused_moe", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, w, ids, gate_up, down = _problem(3, 8, 2, 32, 16, torch.float32, seed=5)
    with torch.no_grad():
        got = routed_experts(x, w, ids, gate_up, down)
    assert calls
    _assert_close(got, experts_reference(x, w, ids, gate_up, down), torch.float32)


@needs_triton
@pytest.mark.parametrize("stacked", [False, True], ids=["separate_shared", "stacked_shared"])
def test_moe_block_with_fused_kernel_matches_reference(monkeypatch, stacked):
    from trinity.kernels import moe_triton
    from trinity.model.moe import MoEBlock
    cfg = preset("tiny", num_experts=8, num_experts_per_tok=2)
    assert cfg.num_shared_experts == 1
    torch.manual_seed(0)
    block = MoEBlock(cfg).to(DEVICE)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        x = torch.randn(3, cfg.hidden_size, device=DEVICE)
        monkeypatch.setenv("TRINITY_KERNELS", "reference")
        want = block(x)
        if stacked:  # the shared expert joins the routed ones in one fused pass
            block.fuse_projections()
            assert block.stacked_valid()
        calls = []
        real = moe_triton.fused_moe_layer
        monkeypatch.setattr(moe_triton, "fused_moe_layer", lambda *a, **kw: calls.append(a[8]) or real(*a, **kw))
        monkeypatch.setenv("TRINITY_KERNELS", "triton")
        got = block(x)
    assert calls == [1 if stacked else 0]  # the whole layer in the fused kernels, the shared expert stacked or not
    _assert_close(got, want, torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,e,h,k,norm", [(1, 8, 96, 2, True), (17, 8, 40, 4, False), (3, 128, 256, 8, True),
                                          (5, 6, 64, 6, True)])
def test_fused_route_matches_route(dtype, t, e, h, k, norm):
    from trinity.kernels.moe_triton import fused_route
    g = torch.Generator().manual_seed(t * e + k)
    x = torch.randn(t, h, generator=g).to(device=DEVICE, dtype=dtype)
    gate = (torch.randn(e, h, generator=g) / h ** 0.5).to(device=DEVICE, dtype=dtype)
    bias = (torch.randn(e, generator=g) * 0.1).to(DEVICE)
    want_w, want_ids = route(x, gate, bias, k, norm, 2.826)
    logits = torch.nn.functional.linear(x.float(), gate.float())
    got_w, got_ids = fused_route(logits, bias, k, norm, 2.826)
    assert got_ids.dtype == torch.int64 and torch.equal(got_ids, want_ids)
    assert got_w.dtype == torch.float32 and torch.allclose(got_w, want_w, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_with_the_gather_combine_kernel(monkeypatch, dtype):
    """The prefill path (`experts_grouped`: F.grouped_mm) with its combine in one Triton launch, against the
    reference experts; and the kernel against the torch combine it replaces."""
    from trinity.kernels import moe_triton
    x, w, ids, gate_up, down = _problem(37, 8, 3, 48, 32, dtype, seed=8)
    with torch.no_grad():
        want = experts_reference(x, w, ids, gate_up, down)  # references: the torch combine
        monkeypatch.setenv("TRINITY_KERNELS", "triton")
        calls = []
        real = moe_triton.gather_combine
        monkeypatch.setattr(moe_triton, "gather_combine", lambda *a: calls.append(1) or real(*a))
        got = kmoe.experts_grouped(x, w, ids, gate_up, down)
    assert calls
    _assert_close(got, want, dtype)
    g = torch.Generator().manual_seed(1)
    ys = torch.randn(37 * 3, 48, generator=g).to(device=DEVICE, dtype=dtype)
    order = torch.randperm(37 * 3, generator=g).to(DEVICE)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=DEVICE)
    per_choice = ys.index_select(0, position).float().view(37, 3, -1)
    want = (per_choice * w.reshape(37, 3, 1).float()).sum(dim=1).to(dtype)
    _assert_close(real(ys, w, position, 37, dtype), want, dtype)


def _router_problem(t, e, h, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(device=DEVICE, dtype=dtype)
    gate = (torch.randn(e, h, generator=g) / h ** 0.5).to(DEVICE)
    bias = (torch.randn(e, generator=g) * 0.1).to(DEVICE)
    return x, gate, bias


@needs_triton
@pytest.mark.parametrize("t", [1, 7, 40])  # 40 tokens: several token tiles (16 per program at 128 experts)
@pytest.mark.parametrize("masked", [False, True])
def test_fused_route_with_shared_choice_and_counts(t, masked):
    from trinity.kernels.moe_triton import fused_route
    e, k = 128, 8
    x, gate, bias = _router_problem(t, e, 64, seed=t)
    want_w, want_ids = route(x, gate, bias, k, True, 2.826)
    mask = (torch.arange(t, device=DEVICE) % 3 != 1).long() if masked else None  # some rows weigh 0
    counts = torch.full((e,), 5, dtype=torch.long, device=DEVICE)  # counts accumulate onto what is there
    w, ids = fused_route(torch.nn.functional.linear(x, gate), bias, k, True, 2.826, shared=1, counts=counts,
                         count_mask=mask)
    assert torch.equal(ids[:, :k], want_ids) and (ids[:, k] == e).all()  # the shared expert: stacked last
    assert torch.allclose(w[:, :k], want_w, rtol=1e-5, atol=1e-6) and (w[:, k] == 1).all()
    per_choice = (mask if masked else torch.ones(t, dtype=torch.long, device=DEVICE))[:, None].expand(t, k)
    want_counts = torch.full((e,), 5, dtype=torch.long, device=DEVICE).scatter_add_(
        0, want_ids.reshape(-1), per_choice.reshape(-1))
    assert torch.equal(counts, want_counts)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,single_launch,router_in_launch", [(1, True, True), (1, True, False), (5, True, True),
                                                              (5, True, False), (5, False, False), (37, False, False)])
@pytest.mark.parametrize("shared", [0, 1])
def test_fused_moe_layer_matches_reference(monkeypatch, dtype, t, single_launch, router_in_launch, shared):
    """Routing + alignment in one launch (decode-sized batches; the router GEMM in it too for the smallest, summed
    by the last of its programs) or in two, with and without the stacked shared expert: the same output as
    routing by the model's code and `experts_reference`, and the same counts."""
    from trinity.kernels import moe_triton
    e, k, h, inter = 16, 4, 200, 32  # 200: the router GEMM splits its keys, unevenly
    monkeypatch.setattr(moe_triton, "ROUTE_ALIGN_MAX_TOKENS", 64 if single_launch else 0)
    monkeypatch.setattr(moe_triton, "ROUTER_FUSED_MAX_TOKENS", 8 if router_in_launch else 0)
    x, gate, bias = _router_problem(t, e, h, seed=100 + t, dtype=dtype)
    _, _, _, gate_up, down = _problem(t, e + shared, k, h, inter, dtype, seed=t)
    counts = torch.zeros(e, dtype=torch.long, device=DEVICE)
    from trinity.kernels.launch_counter import LaunchCounter
    with torch.no_grad(), LaunchCounter() as launches:
        got = kmoe.moe_layer_triton(x, gate, bias, k, True, 2.0, gate_up, down, bool(shared), counts=counts)
    gemm = {"aten:linear", "aten:mm", "aten:addmm"}  # the library router GEMM (linear, or mm outside inference mode)
    routing = {"gemm" if n in gemm else n for n in launches.names("") if "route" in n or n in gemm}
    assert routing == ({"triton:_router_route_align_kernel"} if router_in_launch
                       else {"gemm", "triton:_route_align_kernel"} if single_launch
                       else {"gemm", "triton:_route_kernel"}), launches.names("")
    with torch.no_grad():
        w, ids = route(x, gate, bias, k, True, 2.0)
        if shared:  # the reference: every token's extra choice, the last expert, weight 1
            ids = torch.cat([ids, torch.full((t, 1), e, device=DEVICE)], dim=1)
            w = torch.cat([w, torch.ones(t, 1, device=DEVICE)], dim=1)
        want = experts_reference(x, w, ids, gate_up, down)
    _assert_close(got, want, dtype)
    assert torch.equal(counts, torch.bincount(ids[:, :k].reshape(-1), minlength=e))


@needs_triton
def test_fused_route_bias_selects_but_does_not_weight():
    from trinity.kernels.moe_triton import fused_route
    logits = torch.tensor([[0.0, 1.0986123, -1.0986123]], device=DEVICE)  # scores 0.5, 0.75, 0.25
    bias = torch.tensor([1.0, 0.0, 0.0], device=DEVICE)
    w, ids = fused_route(logits, bias, 2, True, 2.0)
    assert ids.tolist() == [[0, 1]]
    assert torch.allclose(w.cpu(), torch.tensor([[0.5 / 1.25 * 2.0, 0.75 / 1.25 * 2.0]]), atol=1e-6)


@needs_triton
def test_route_dispatches_to_fused_route_when_forced(monkeypatch):
    from trinity.kernels import moe_triton
    monkeypatch.setenv("TRINITY_KERNELS", "triton")
    calls = []
    real = moe_triton.fused_route
    monkeypatch.setattr(moe_triton, "fused_route", lambda *a: calls.append(1) or real(*a))
    x, gate = torch.randn(4, 32, device=DEVICE), torch.randn(8, 32, device=DEVICE)
    bias = torch.zeros(8, device=DEVICE)
    with torch.no_grad():
        w, ids = kmoe.route(x, gate, bias, 2, True, 1.5)
    assert calls
    want_w, want_ids = route(x, gate, bias, 2, True, 1.5)
    assert torch.equal(ids, want_ids) and torch.allclose(w, want_w, rtol=1e-5, atol=1e-6)


# ============================================================================== dispatch on the CPU (always)
def test_route_reference_equals_model_route(monkeypatch):
    monkeypatch.delenv("TRINITY_KERNELS", raising=False)
    g = torch.Generator().manual_seed(4)
    for norm in (True, False):
        x, gate = torch.randn(6, 32, generator=g).bfloat16(), torch.randn(8, 32, generator=g).bfloat16()
        bias = torch.randn(8, generator=g)
        want, got = route(x, gate, bias, 3, norm, 2.5), kmoe.route_reference(x, gate, bias, 3, norm, 2.5)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(kmoe.route(x, gate, bias, 3, norm, 2.5), want))


def test_routed_experts_unchanged_on_cpu_by_default(monkeypatch):
    monkeypatch.delenv("TRINITY_KERNELS", raising=False)
    x, w, ids, gate_up, down = _problem(4, 8, 2, 32, 16, torch.float32, device="cpu", seed=9)
    assert not kmoe.fused_moe_wanted(x)
    with torch.no_grad():
        got = routed_experts(x, w, ids, gate_up, down)
    assert torch.allclose(got, experts_reference(x, w, ids, gate_up, down), atol=1e-5, rtol=1e-4)


# ============================================================================== real shapes (GPU only)
NANO = dict(h=1024, inter=256, e=128, k=8)
MINI = dict(h=2048, inter=1024, e=128, k=8)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", [NANO, MINI], ids=["nano", "mini"])
@pytest.mark.parametrize("t", [1, 8, 32, 64, 300])
def test_gpu_fused_moe_real_shapes(shape, t):
    from trinity.kernels.moe_triton import fused_moe
    x, w, ids, gate_up, down = _problem(t, shape["e"], shape["k"], shape["h"], shape["inter"], torch.bfloat16,
                                        device="cuda", seed=t)
    _assert_close(fused_moe(x, w, ids, gate_up, down), experts_reference(x, w, ids, gate_up, down),
                  torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", [NANO, MINI], ids=["nano", "mini"])
@pytest.mark.parametrize("t", [1, 64])
def test_gpu_fused_moe_with_shared_expert_real_shapes(shape, t):
    x, _, _, gate_up, down = _problem(t, shape["e"] + 1, shape["k"], shape["h"], shape["inter"],
                                      torch.bfloat16, device="cuda", seed=t)
    got, want = _layer_with_shared(x, gate_up, down, shape["k"], seed=t)
    _assert_close(got, want, torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", [NANO, MINI], ids=["nano", "mini"])
def test_gpu_fused_moe_captures_in_a_cuda_graph(shape):
    """No host syncs: the whole fused path (alignment included) records into a CUDA graph and replays."""
    from trinity.kernels.moe_triton import fused_moe
    t = 4
    x, w, ids, gate_up, down = _problem(t, shape["e"], shape["k"], shape["h"], shape["inter"], torch.bfloat16,
                                        device="cuda", seed=1)
    fused_moe(x, w, ids, gate_up, down)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w, ids, gate_up, down)
    x2, w2, ids2, _, _ = _problem(t, shape["e"], shape["k"], shape["h"], shape["inter"], torch.bfloat16,
                                  device="cuda", seed=2)
    x.copy_(x2), w.copy_(w2), ids.copy_(ids2)
    graph.replay()
    torch.cuda.synchronize()
    _assert_close(out, experts_reference(x2, w2, ids2, gate_up, down), torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("e,h,k", [(128, 1024, 8), (128, 2048, 8), (256, 3072, 4)])
@pytest.mark.parametrize("t", [1, 64, 256])
def test_gpu_fused_route_real_shapes(e, h, k, t):
    x = torch.randn(t, h, device="cuda").bfloat16()
    gate = (torch.randn(e, h, device="cuda") / h ** 0.5).bfloat16()
    bias = torch.randn(e, device="cuda") * 0.01
    want_w, want_ids = route(x, gate, bias, k, True, 2.826)
    got_w, got_ids = kmoe.route(x, gate, bias, k, True, 2.826)  # the CUDA dispatch: cuBLAS logits + fused_route
    # fp32 sums in a different order can swap near-tied experts: demand agreement on almost all tokens
    same = (got_ids == want_ids).all(dim=1)
    assert same.float().mean().item() >= 0.97
    assert torch.allclose(got_w[same], want_w[same], rtol=1e-4, atol=1e-5)


# ============================================================================== sm_90 compile check (opt-in)
H100_SMEM = 227 * 1024


@needs_compile_check
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_moe_kernels_compile_for_sm90(dtype):
    """Every table config (and the untuned defaults) lowers to sm_90 without spills and within shared memory."""
    import triton

    from trinity.kernels import moe_triton as mt
    p = "*" + dtype
    elem = 4 if dtype == "fp32" else 2
    prec = "ieee" if dtype == "fp32" else "tf32"
    assert all(mt.get_config(t, h, i, 128, 8).block_m == 16 for t in range(1, mt.DOWN_NORM_MAX_TOKENS + 1)
               for h, i in [(1024, 256), (2048, 1024), (4096, 2048)])  # what the norm variants below assume
    configs = {c for table in mt.CONFIGS.values() for c in table.values()}
    configs |= {mt.MoEConfig(), mt.get_config(4096, 2048, 1024, 128, 8)}
    for cfg in sorted(configs, key=repr):
        cfg = mt.fit_shared_memory(cfg, elem, H100_SMEM)
        common = {"BLOCK_M": ("c", cfg.block_m), "UPCAST": ("c", False), "DOT_PREC": ("c", prec)}
        use = compile_sm90(mt._gate_up_swiglu_kernel, {
            "x_ptr": p, "w_ptr": p, "act_ptr": p, "slots_ptr": "*i32", "block_expert_ptr": "*i32",
            "num_slots": "i32", "top_k": "i32",
            **{n: "i32:16" for n in ["N", "K", "num_experts", "stride_xt", "stride_we", "stride_wn", "stride_as"]},
            **{n: "one" for n in ["stride_xk", "stride_wk", "stride_an"]},
            "BLOCK_N": ("c", cfg.up_n), "BLOCK_K": ("c", cfg.up_k), "FIX_BF16": ("c", False), **common},
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        assert spill_free(use) and use["shared"] <= H100_SMEM, (cfg, use)
        # with the norm step in the last program (hidden 2048: Mini), in the configs it runs with: at most
        # DOWN_NORM_MAX_TOKENS tokens, so 16-row blocks
        for norm in (False, True) if cfg.block_m == 16 else (False,):
            use = compile_sm90(mt._down_kernel, {
                "act_ptr": p, "w_ptr": p, "rw_ptr": "*fp32", "y_ptr": "*fp32", "slots_ptr": "*i32",
                "block_expert_ptr": "*i32", "num_slots": "i32",
                **{n: "i32:16" for n in ["N", "K", "num_experts", "stride_as", "stride_we", "stride_wn", "stride_ys",
                                         "stride_r", "stride_o", "stride_ro"]},
                **{n: "one" for n in ["stride_ak", "stride_wk", "stride_yn"]},
                "res_ptr": p, "post_w_ptr": "*fp32", "next_w_ptr": "*fp32", "out_ptr": p, "res_out_ptr": p,
                "counter_ptr": "*i32", "num_tokens": "i32", "eps": "fp32", "TOP_K": ("c", 9),
                "BLOCK_N": ("c", cfg.down_n), "BLOCK_K": ("c", cfg.down_k), "NORM": ("c", norm),
                "BLOCK_ROW": ("c", 2048), "FIX_BF16": ("c", False), **common},
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            assert spill_free(use) and use["shared"] <= H100_SMEM, (cfg, norm, use)
    use = compile_sm90(mt._combine_kernel, {"y_ptr": "*fp32", "out_ptr": p, "N": "i32:16", "top_k": "i32",
                                            "stride_ys": "i32:16", "stride_ot": "i32:16", "BLOCK_N": ("c", 1024),
                                            "FIX_BF16": ("c", False)})
    assert use["stack"] == 0, use
    use = compile_sm90(mt._gather_combine_kernel, {
        "ys_ptr": p, "w_ptr": "*fp32", "pos_ptr": "*i64", "out_ptr": p, "N": "i32:16", "top_k": "i32",
        "stride_ys": "i32:16", "stride_ot": "i32:16", "BLOCK_N": ("c", 1024), "FIX_BF16": ("c", False)})
    assert use["stack"] == 0, use
    for e, k in [(128, 8), (256, 4)]:
        for block_t in (1, 16):  # a one-token decode, a full tile
            for use in _compile_route_kernels(e, k, block_t):
                assert use["stack"] == 0, use


def _compile_route_kernels(e: int, k: int, block_t: int = 16):
    """The routing kernel (with the shared choice, masked counts) and routing + align in one launch, for sm_90."""
    import triton

    from trinity.kernels import moe_triton as mt
    be = triton.next_power_of_2(e)
    block_t = max(1, min(block_t, 2048 // be))
    route = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "w_ptr": "*fp32", "ids_ptr": "*i64", "counts_ptr": "*i64",
             "count_mask_ptr": "*i64", "num_tokens": "i32", "num_experts": "i32:16", "top_k": "i32",
             "route_scale": "fp32", "stride_lt": "i32:16", "stride_le": "one",
             "BLOCK_T": ("c", block_t), "BLOCK_E": ("c", be),
             "BLOCK_K": ("c", triton.next_power_of_2(k + 1)), "NORM": ("c", True), "SHARED": ("c", 1),
             "COUNT": ("c", True), "MASKED": ("c", True)}
    yield compile_sm90(mt._route_kernel, route, num_warps=mt._route_warps(be))
    bae = triton.next_power_of_2(e + 2)
    yield compile_sm90(mt._route_align_kernel, {
        **route, "slots_ptr": "*i32", "block_expert_ptr": "*i32", "cursor_ptr": "*i32", "num_slots": "i32",
        "num_aligned_experts": "i32", "num_blocks": "i32", "BLOCK_M": ("c", 16), "BLOCK_S": ("c", 512),
        "BLOCK_AE": ("c", bae), "BLOCK_B": ("c", max(1, min(64, 8192 // bae))), "BLOCK_P": ("c", 1024)},
        num_warps=mt._route_warps(be))


@needs_compile_check
@pytest.mark.parametrize("slots", [8, 512, 4096])
def test_align_kernel_compiles_for_sm90(slots):
    import triton

    from trinity.kernels import moe_triton as mt
    be = triton.next_power_of_2(128 + 1)
    use = compile_sm90(mt._align_kernel, {
        "ids_ptr": "*i64", "slots_ptr": "*i32", "block_expert_ptr": "*i32", "cursor_ptr": "*i32",
        "num_slots": "i32", "num_experts": "i32", "num_blocks": "i32", "BLOCK_M": ("c", 16),
        "BLOCK_S": ("c", max(16, triton.next_power_of_2(slots))), "BLOCK_E": ("c", be),
        "BLOCK_B": ("c", max(1, min(64, 8192 // be))), "BLOCK_P": ("c", 1024)})
    assert use["stack"] == 0, use


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 3, 6])
def test_fused_moe_layer_with_the_norm_step(dtype, t):
    """`norm=`: the decoder layer's norm step after the MoE layer, run by the down GEMM's last program (up to
    DOWN_NORM_MAX_TOKENS tokens) or by the norm kernel after it, equals summing the per-choice outputs then the
    norm step's reference; and the arrival counter is back at 0."""
    from trinity.kernels import moe_triton
    from trinity.kernels.last_program import arrival_counters
    from trinity.kernels.launch_counter import LaunchCounter
    from trinity.kernels.norm import sum_norm_add_rms_norm_reference
    e, k, h, inter = 8, 2, 96, 32
    x, gate, bias = _router_problem(t, e, h, seed=7 + t, dtype=dtype)
    _, _, _, gate_up, down = _problem(t, e + 1, k, h, inter, dtype, seed=t)
    g = torch.Generator().manual_seed(t)
    residual = torch.randn(t, h, generator=g).to(device=DEVICE, dtype=dtype)
    post, nxt = (1 + 0.1 * torch.randn(h, generator=g)).to(DEVICE), (1 + 0.1 * torch.randn(h, generator=g)).to(DEVICE)
    args = (x, None, bias, k, True, 2.0, gate_up, down, 1)
    router = (x.float(), gate.float())
    with torch.no_grad():
        parts = moe_triton.fused_moe_layer(*args, combine=False, router=router)
        with LaunchCounter() as launches:
            normed, new_res = moe_triton.fused_moe_layer(*args, router=router, norm=(residual, post, nxt, 1e-5))
    want, want_res = sum_norm_add_rms_norm_reference(parts, residual, post, nxt, 1e-5)
    assert torch.equal(new_res, want_res) or dtype == torch.float32 and torch.allclose(new_res, want_res, atol=1e-6)
    _assert_close(normed, want, dtype)
    in_down = t <= moe_triton.DOWN_NORM_MAX_TOKENS
    assert ("triton:_rms_norm_kernel" in launches.names("")) != in_down, launches.names("")
    assert arrival_counters(x.device, 1).abs().sum() == 0


@needs_compile_check
@pytest.mark.parametrize("experts,top_k", [(128, 8), (256, 4)])  # Nano/Mini, Large
def test_router_route_align_kernel_compiles_for_sm90(experts, top_k):
    """The router GEMM + routing + alignment launch at the model shapes (top-k + the shared expert), at the warps
    the launch gives it."""
    import triton

    from trinity.kernels import moe_triton as mt
    kern = mt._router_route_align_kernel
    args = {n: "*fp32" if n.endswith("_ptr") else "i32" for n in kern.arg_names}
    args.update({"ids_ptr": "*i64", "counts_ptr": "*i64", "count_mask_ptr": "*i32", "slots_ptr": "*i32",
                 "block_expert_ptr": "*i32", "cursor_ptr": "*i32", "counter_ptr": "*i32", "route_scale": "fp32"})
    block_ae = triton.next_power_of_2(experts + 2)
    constants = dict(BLOCK_GT=16, BLOCK_GE=16, BLOCK_GK=64, SPLITS=8, UPCAST=False, PRECISION="ieee", BLOCK_T=1,
                     BLOCK_E=experts, BLOCK_K=triton.next_power_of_2(top_k + 1), NORM=True, SHARED=1, COUNT=True,
                     MASKED=True, BLOCK_M=16, BLOCK_S=16, BLOCK_AE=block_ae, BLOCK_B=max(1, min(64, 8192 // block_ae)),
                     BLOCK_P=1024, PDL=False)
    args.update({k: ("c", v) for k, v in constants.items()})
    use = compile_sm90(kern, args, num_warps=mt._route_warps(experts))
    assert use["stack"] == 0, use
