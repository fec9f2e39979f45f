"""The last-program epilogues (`kernels.last_program`) across their four users: the decode attention's split merge,
the projection + norm step, the router GEMM + routing, and the MoE down GEMM + norm step.

In the interpreter the programs run one after another, so these tests check the counting, the reset and the
switch; what only a GPU can show is that the last arriver really sees every other program's stores. The GPU tests
below run each user many times at the real Mini shapes and require every run to be bitwise identical to a result
computed without the epilogue's cross-program reads (a missed store would show up as a differing run).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
needs_triton = pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="Triton needs a GPU or TRITON_INTERPRET=1")
gpu_only = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA device")
REPEATS = 50


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRINITY_KERNELS", "triton")


@pytest.fixture
def separate_launches():
    """The epilogues switched off for the test's duration."""
    from trinity.kernels import last_program
    last_program.enable(False)
    yield
    last_program.enable(None)


def _norm_inputs(m: int, n: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    res = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    post, nxt = (1 + 0.1 * torch.randn(n, generator=g)).to(DEVICE), (1 + 0.1 * torch.randn(n, generator=g)).to(DEVICE)
    return res, post, nxt


# ------------------------------------------------------------------------------------------ the switch
def test_switch_off_gives_no_counters(monkeypatch):
    from trinity.kernels import last_program
    assert last_program.enabled()
    monkeypatch.setenv("TRINITY_LAST_PROGRAM", "0")
    assert last_program.arrival_counters(torch.device("cpu"), 1) is None
    last_program.enable(True)  # the explicit setting wins over the variable
    try:
        assert last_program.arrival_counters(torch.device("cpu"), 1) is not None
        assert last_program.arrival_counters(torch.device("cpu"), last_program.NUM_COUNTERS + 1) is None
    finally:
        last_program.enable(None)


@needs_triton
def test_switched_off_users_take_their_separate_launches(separate_launches):
    """With the epilogues off each user runs its second launch (merge, norm, library GEMM) and still gives the
    same results."""
    from test_kernels_attention import decode_case

    from trinity.kernels import attention_triton, linear_triton, moe_triton
    from trinity.kernels.launch_counter import LaunchCounter
    q, kc, vc, slots, lens = decode_case([30, 50], 8, 2, 16, torch.float32, seed=1)
    x = torch.randn(2, 64, device=DEVICE)
    w = torch.randn(32, 64, device=DEVICE) / 8
    res, post, nxt = _norm_inputs(2, 32, torch.float32, 2)
    gate_up = torch.randn(5, 2 * 16, 32, device=DEVICE) / 6
    down = torch.randn(5, 32, 16, device=DEVICE) / 4
    router = (torch.randn(2, 32, device=DEVICE), torch.randn(4, 32, device=DEVICE))
    with torch.no_grad(), LaunchCounter() as launches:
        attention_triton.decode_attention(q, kc, vc, slots, lens, 0.25, num_splits=3, block_n=16)
        assert not linear_triton.usable(x, w)
        moe_triton.fused_moe_layer(x[:, :32].contiguous(), None, torch.zeros(4, device=DEVICE), 2, True, 1.0,
                                   gate_up, down, shared=1, router=router, norm=(res, post, nxt, 1e-5))
    names = launches.names("")
    assert names["triton:_decode_merge_kernel"] == 1 and names["triton:_route_align_kernel"] == 1, names
    assert names["triton:_rms_norm_kernel"] == 1 and "triton:_router_route_align_kernel" not in names, names


# ------------------------------------------------------------------------------------ GPU: many runs
@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("splits", [4, 16, 64])
def test_gpu_split_merge_by_the_last_split_is_stable(splits):
    """Mini's heads at an 8K context, batch 1 and 8: every run equals the separate merge launch, bit for bit."""
    from test_kernels_attention import decode_case

    from trinity.kernels import attention_triton
    for lens in ([8192], [8192, 100, 4000, 1, 8192, 2048, 777, 5000]):
        q, kc, vc, slots, ctx = decode_case(lens, 32, 4, 128, torch.bfloat16, slots_total=sum(lens) + 64, seed=3)
        gate = torch.randn_like(q)
        want = attention_triton.decode_attention(q, kc, vc, slots, ctx, 128 ** -0.5, gate=gate, num_splits=splits,
                                                 merge_last=False)
        for _ in range(REPEATS):
            got = attention_triton.decode_attention(q, kc, vc, slots, ctx, 128 ** -0.5, gate=gate,
                                                    num_splits=splits)
            assert torch.equal(got, want)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(2048, 4096), (1024, 1024), (1024, 3072)])  # Mini o_proj, Nano o_proj, Nano down
def test_gpu_projection_and_norm_step_is_stable(m, n, k):
    """Every run equals the first, bit for bit, and the first matches the library GEMM + norm step."""
    from trinity.kernels import linear_triton
    from trinity.kernels.norm import norm_add_rms_norm_reference
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, torch.bfloat16)
    res, post, nxt = _norm_inputs(m, n, torch.bfloat16, m)
    first = linear_triton.linear_norm_add_rms_norm(x, w, res, post, nxt, 1e-5, fp32_copy=True)
    want = norm_add_rms_norm_reference(F.linear(x.float(), w.float()).to(torch.bfloat16), res, post, nxt, 1e-5)
    for got, ref in zip(first[:2], want):
        assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    for _ in range(REPEATS):
        again = linear_triton.linear_norm_add_rms_norm(x, w, res, post, nxt, 1e-5, fp32_copy=True)
        assert all(torch.equal(a, b) for a, b in zip(again, first))


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("t", [1, 3, 8])
def test_gpu_router_in_the_routing_launch_is_stable(t):
    """Mini's router (128 experts, hidden 2048) summed by the last program: the same experts and weights as routing
    on the library GEMM's logits, and every run identical."""
    from trinity.kernels import moe_triton
    g = torch.Generator().manual_seed(t)
    x32 = torch.randn(t, 2048, generator=g).to(DEVICE)
    router_w = (torch.randn(128, 2048, generator=g) / 2048 ** 0.5).to(DEVICE)
    bias = (torch.randn(128, generator=g) * 0.01).to(DEVICE)
    x = x32.to(torch.bfloat16)
    args = dict(expert_bias=bias, top_k=8, route_norm=True, route_scale=2.826, shared=1, counts=None,
                count_mask=None, num_experts=129, block_m=16)
    fused = moe_triton._route_align_launch(x, None, (x32, router_w), **args)
    library = moe_triton._route_align_launch(x, F.linear(x32, router_w), None, **args)
    assert torch.allclose(fused[0], library[0], rtol=1e-5, atol=1e-6)  # weights; logits differ in the last bits
    for _ in range(REPEATS):
        again = moe_triton._route_align_launch(x, None, (x32, router_w), **args)
        assert torch.equal(again[0], fused[0])
        assert torch.equal(again[2], fused[2])  # block -> expert; the slot order inside a run may differ


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("t", [1, 4])
def test_gpu_down_gemm_with_the_norm_step_is_stable(t):
    """Mini's MoE (128 + 1 experts of 1024, hidden 2048): the norm step in the down launch equals the per-choice
    outputs summed by the norm kernel, bit for bit, on every run."""
    from trinity.kernels import moe_triton
    from trinity.kernels.norm import sum_norm_add_rms_norm_reference
    g = torch.Generator().manual_seed(10 + t)
    h, inter, e = 2048, 1024, 128
    x = torch.randn(t, h, generator=g).to(DEVICE, torch.bfloat16)
    gate_up = (torch.randn(e + 1, 2 * inter, h, generator=g) / h ** 0.5).to(DEVICE, torch.bfloat16)
    down = (torch.randn(e + 1, h, inter, generator=g) / inter ** 0.5).to(DEVICE, torch.bfloat16)
    router = (x.float(), (torch.randn(e, h, generator=g) / h ** 0.5).to(DEVICE))
    bias = torch.zeros(e, device=DEVICE)
    res, post, nxt = _norm_inputs(t, h, torch.bfloat16, t)
    args = (x, None, bias, 8, True, 2.826, gate_up, down, 1)
    parts = moe_triton.fused_moe_layer(*args, combine=False, router=router)
    want = sum_norm_add_rms_norm_reference(parts, res, post, nxt, 1e-5)
    for _ in range(REPEATS):
        got = moe_triton.fused_moe_layer(*args, router=router, norm=(res, post, nxt, 1e-5))
        assert all(torch.equal(a, b) for a, b in zip(got, want))


# ------------------------------------------------------------------------------ the PTX each user emits
@pytest.mark.skipif(INTERPRET or os.environ.get("TRINITY_COMPILE_CHECK") != "1",
                    reason="set TRINITY_COMPILE_CHECK=1 (without TRITON_INTERPRET) to compile the kernels for sm_90")
def test_every_user_compiles_to_barrier_then_acquire_release_atomic():
    """The ordering the pattern rests on, read back from the sm_90 PTX of each user: a CTA barrier, then the count
    as one thread's GPU-scope acquire-release atomic, its result shared through shared memory behind another
    barrier, and only then the loads of the combine."""
    import re

    from test_kernels_norm import ptx_instructions, ptx_sm90
    from test_pdl import decode_chain

    users = {"decode attention": "_decode_kernel", "projection + norm": "_linear_norm_kernel",
             "router + routing": "_router_route_align_kernel", "down + norm": "_down_kernel"}
    chain = decode_chain(pdl=False)
    for name, kernel_name in users.items():
        kernel, types, constants = chain[kernel_name]
        lines = ptx_instructions(ptx_sm90(kernel, types, constants))
        atomics = [i for i, line in enumerate(lines) if re.search(r"atom\.global\.gpu\.acq_rel\.add", line)]
        assert atomics, name
        at = atomics[0]  # the count comes first (the routing launch's alignment adds atomics of its own after it)
        assert lines[at].startswith("@%p"), (name, lines[at])  # one thread (predicated), not every thread
        assert any(line.startswith("bar.sync") for line in lines[max(0, at - 8):at]), name  # barrier before
        after = lines[at + 1:at + 8]
        assert any("st.shared" in line for line in after) and any(line.startswith("bar.sync") for line in after), name
