"""The 4-bit (W4A16) CPU kernels (`kernels/int4_cpu.c`) against their pure-torch references (`kernels/int4.py`,
`quant.int4.dequantize`), and the dispatch that picks them.

Weights come from `quant.int4.quantize` (round to nearest) of random matrices, so every code 0..15 occurs, with
groups of 32/64/128 columns, one per row (channel), and an odd group (7) that never fills a 32-column vector step;
partial last groups; symmetric and asymmetric; act-order g_idx. Tolerances, as for FP8 (`test_kernels_fp8.py`):

- dequantization: bit for bit ((code - zero) * scale in fp32 as the reference, rounded once);
- fp32 products: against the exact (fp64) product, within 1e-5 of sum_k |w_k x_k|;
- bf16 activations: within a bf16 rounding (2^-8 relative) of the exact product plus that fp32 bound, and on
  average no further from it than the reference (which rounds the weights and the output to bf16).
"""

import ctypes
import subprocess
from pathlib import Path

import pytest
import torch

from trinity import kernels
from trinity.kernels import int4 as k4
from trinity.kernels import native as knative
from trinity.quant import int4
from trinity.quant.int4 import Int4Weight

needs_native = pytest.mark.skipif(knative.library() is None, reason="no C compiler (or the build failed)")

# (out, in, group): partial last groups (300 = 9 x 32 + 12, 4 x 64 + 44, 2 x 128 + 44), channel over an odd width,
# an odd group, and a width under one 32-column step
SHAPES = [(200, 300, 32), (200, 300, 64), (96, 300, 128), (64, 77, None), (40, 50, 7), (24, 20, 128)]


def random_int4(out: int, inp: int, group: int | None, symmetric: bool, act_order: bool, seed: int) -> Int4Weight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) / inp ** 0.5
    g_idx = None
    if act_order:  # each column in a random group (every group used), as GPTQ's desc_act leaves them
        groups = int4.num_groups(inp, group or inp)
        g_idx = (torch.arange(inp) // (group or inp))[torch.randperm(inp, generator=g)].clamp(max=groups - 1)
    return int4.quantize(w, group, symmetric, g_idx=g_idx)


def variants():
    for out, inp, group in SHAPES:
        for symmetric in (True, False):
            for act_order in (False, True):
                yield pytest.param(out, inp, group, symmetric, act_order,
                                   id=f"{out}x{inp}-g{group}-{'sym' if symmetric else 'asym'}"
                                      f"{'-actorder' if act_order else ''}")


def exact(x: torch.Tensor, w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    wd = int4.dequantize(w, torch.float64)
    return x.double() @ wd.t(), x.double().abs() @ wd.abs().t()


def assert_fp32_close(got, x, w) -> None:
    want, size = exact(x, w)
    err = (got.double() - want).abs()
    assert (err <= 1e-5 * size + 1e-30).all(), f"max error {(err / size).max():.3g} of sum |w x|"


def assert_bf16_close(got, reference, x, w) -> None:
    assert got.dtype == torch.bfloat16
    want, size = exact(x, w)
    err = (got.double() - want).abs()
    assert (err <= 2 ** -8 * want.abs() + 1e-5 * size + 1e-30).all(), f"max error {err.max():.3g}"
    assert err.mean() <= (reference.double() - want).abs().mean()


# ------------------------------------------------------------------------------------------------ dequantize
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out,inp,group,symmetric,act_order", list(variants()))
def test_dequantize_native_is_bit_exact(out, inp, group, symmetric, act_order, dtype):
    w = random_int4(out, inp, group, symmetric, act_order, seed=out + inp)
    want = int4.dequantize(w, dtype)
    got = k4.dequantize_native(w, dtype)
    as_int = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(as_int), want.view(as_int))
    rows = k4.dequantize_native(w, dtype, 3, out - 5)  # a slab
    assert torch.equal(rows.view(as_int), want[3:out - 5].view(as_int))


@needs_native
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_code_reads_as_its_value(symmetric):
    """x = identity: each output is one weight, so the linear kernel's reading of every code (in the vector steps
    and the scalar tail: 70 columns = two steps + 6) must be the reference's value exactly."""
    w = random_int4(16, 70, 32, symmetric, False, seed=7)
    codes = torch.arange(16 * 70, dtype=torch.uint8).view(16, 70) % 16
    w = w._replace(codes=int4.pack(codes))
    with torch.no_grad():
        got = k4.linear_int4_native(torch.eye(70), w)
    assert torch.equal(got, int4.dequantize(w, torch.float32).t())


# ------------------------------------------------------------------------------------------------ linear
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16, 40])  # one pass of 8 and its tail, two passes, five
@pytest.mark.parametrize("out,inp,group,symmetric,act_order", list(variants()))
def test_linear_native_equals_reference(out, inp, group, symmetric, act_order, rows, dtype):
    w = random_int4(out, inp, group, symmetric, act_order, seed=rows * out + inp)
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows)).to(dtype)
    with torch.no_grad():
        got = k4.linear_int4_native(x, w)
        reference = k4.linear_int4_reference(x, w)
    assert got.shape == (rows, out) and got.dtype == dtype
    if dtype == torch.float32:
        assert_fp32_close(got, x, w)
        assert_fp32_close(reference, x, w)  # the bound is one the reference meets too
    else:
        assert_bf16_close(got, reference, x, w)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_native_keeps_leading_dimensions(dtype):
    w = random_int4(40, 64, 32, False, False, seed=1)
    x = torch.randn(2, 3, 64).to(dtype)
    with torch.no_grad():
        got = k4.linear_int4_native(x, w)
    assert got.shape == (2, 3, 40) and got.is_contiguous()
    assert torch.equal(got.view(6, 40), k4.linear_int4_native(x.view(6, 64), w))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slab_bytes", [k4.SLAB_BYTES, 1])  # one GEMM; a slab per row
def test_linear_dequantized_equals_reference(dtype, slab_bytes, monkeypatch):
    monkeypatch.setattr(k4, "SLAB_BYTES", slab_bytes)
    w = random_int4(200, 300, 64, False, False, seed=5)
    x = torch.randn(2, 40, 300).to(dtype)
    with torch.no_grad():
        got = k4.linear_int4_dequantized(x, w)
        want = k4.linear_int4_reference(x, w)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------ experts
def random_experts(experts: int, hidden: int, inter: int, group: int | None, symmetric: bool, act_order: bool,
                   seed: int) -> tuple[Int4Weight, Int4Weight]:
    """Int4Experts' layout: each expert's gate and up quantized as separate matrices (each its own g_idx)."""
    def stack(parts: list[Int4Weight]) -> Int4Weight:
        def cat(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.stack(values)
        return parts[0]._replace(codes=cat("codes"), scale=cat("scale"), zero_point=cat("zero_point"),
                                 g_idx=cat("g_idx"))

    gate_up, down = [], []
    for e in range(experts):
        gate = random_int4(inter, hidden, group, symmetric, act_order, seed=seed * 100 + 3 * e)
        up = random_int4(inter, hidden, group, symmetric, act_order, seed=seed * 100 + 3 * e + 1)
        both = gate._replace(codes=torch.cat([gate.codes, up.codes]), scale=torch.cat([gate.scale, up.scale]),
                             zero_point=None if symmetric else torch.cat([gate.zero_point, up.zero_point]),
                             g_idx=None if gate.g_idx is None else torch.cat([gate.g_idx, up.g_idx]))
        gate_up.append(both)
        down.append(random_int4(hidden, inter, group, symmetric, act_order, seed=seed * 100 + 3 * e + 2))
    return stack(gate_up), stack(down)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,k,group,symmetric,act_order", [
    (1, 4, 2, 128, True, False),    # batch-1 decode; groups wider than the matrices
    (5, 8, 2, 32, False, False),    # partial last groups in both projections (96 = 3 x 32, 80 = 2 x 32 + 16)
    (40, 6, 3, None, True, True),   # channel, act order; several 8-token passes per expert
    (70, 16, 4, 64, False, True),   # more tokens than one 64-token chunk for a crowded expert
])
def test_experts_native_equals_reference(tokens, experts, k, group, symmetric, act_order, dtype):
    hidden, inter = 96, 80
    gate_up, down = random_experts(experts, hidden, inter, group, symmetric, act_order, seed=tokens)
    g = torch.Generator().manual_seed(tokens + 1)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    if tokens >= 70:
        ids[:, 0] = 3  # one expert gets every token
    w = torch.rand(tokens, k, generator=g)
    with torch.no_grad():
        got = k4.experts_int4_native(x, w, ids, gate_up, down)
        exact_fp32 = k4.experts_int4_reference(x.float(), w, ids, gate_up, down, linear=k4.linear_int4_reference)
        reference = k4.experts_int4_reference(x, w, ids, gate_up, down, linear=k4.linear_int4_reference)
    assert got.shape == x.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), exact_fp32, rtol=1e-2, atol=1e-2)
        assert (got.float() - exact_fp32).abs().mean() <= (reference.float() - exact_fp32).abs().mean()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,shared,counted", [(1, True, True), (6, True, False), (9, False, True)])
def test_moe_layer_int4_native_equals_routing_then_experts(tokens, shared, counted, dtype):
    """The whole int4 MoE layer in one C call = `route_reference` (fp32 router) then the experts' reference, with
    the stacked shared expert as every token's last choice of weight 1; the routed tokens are counted."""
    from trinity.kernels.moe import route_reference

    hidden, inter, routed, k = 96, 80, 6, 2
    gate_up, down = random_experts(routed + shared, hidden, inter, 32, False, False, seed=tokens)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    router, bias = torch.randn(routed, hidden, generator=g) / 8, torch.randn(routed, generator=g) / 10
    counts = torch.zeros(routed, dtype=torch.long) if counted else None
    with torch.no_grad():
        got = k4.moe_layer_int4_native(x, router, bias, k, True, 2.0, gate_up, down, shared, counts)
        w, ids = route_reference(x.float(), router, bias, k, True, 2.0)
        if shared:
            w = torch.cat([w, torch.ones(tokens, 1)], 1)
            ids = torch.cat([ids, torch.full((tokens, 1), routed)], 1)
        expected = k4.experts_int4_reference(x.float(), w, ids, gate_up, down, linear=k4.linear_int4_reference)
    assert got.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.float(), expected, **tol)
    if counted:
        assert counts.tolist() == torch.bincount(ids[:, :k].flatten(), minlength=routed).tolist()


def _int4_experts_module(experts, hidden, inter, symmetric, act_order, seed):
    from trinity.quant.int4_modules import Int4Experts
    from trinity.quant.int4_scheme import Int4Scheme

    scheme = Int4Scheme("pack-quantized", 32, symmetric, act_order)
    module = Int4Experts(experts, hidden, inter, scheme)
    gate_up, down = random_experts(experts, hidden, inter, 32, symmetric, act_order, seed=seed)
    for base, wt in (("gate_up_proj", gate_up), ("down_proj", down)):
        for suffix, value in (("", wt.codes), ("_scale", wt.scale), ("_zero_point", wt.zero_point),
                              ("_g_idx", wt.g_idx)):
            if value is not None:
                getattr(module, base + suffix).data = value
    return module, scheme


@needs_native
@pytest.mark.parametrize("symmetric,act_order", [(True, False), (False, True)])
def test_int4_experts_module_layer_and_stacked_shared_expert(symmetric, act_order):
    """`Int4Experts`: forward takes the C kernel for decode batches (= its reference loop); `stack_shared` turns
    the block's shared expert (`Int4Linear`s) into expert E, its modules' parameters views of the stacks, and
    `layer` with it = routing + routed experts + the shared expert on its own."""
    from trinity.kernels.moe import route_reference
    from trinity.model.layers import SwiGLU
    from trinity.quant.int4_modules import Int4Linear

    hidden, inter, routed, k = 64, 48, 8, 2
    module, scheme = _int4_experts_module(routed, hidden, inter, symmetric, act_order, seed=3)
    x, w = torch.randn(3, hidden), torch.rand(3, 2)
    ids = torch.tensor([[0, 5], [5, 7], [2, 0]])
    with torch.no_grad():
        assert module.layer_wanted(x, k)
        got = module(x, w, ids)
        kernels.use_reference(True)
        try:
            assert not module.layer_wanted(x, k)
            expected = module(x, w, ids)
        finally:
            kernels.use_reference(None)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

        shared = SwiGLU.__new__(SwiGLU)
        torch.nn.Module.__init__(shared)
        extra, _ = _int4_experts_module(1, hidden, inter, symmetric, act_order, seed=4)
        gu, dn = extra.packed()
        for name, wt, rows in (("gate_proj", gu.expert(0), slice(0, inter)), ("up_proj", gu.expert(0),
                                                                              slice(inter, 2 * inter)),
                               ("down_proj", dn.expert(0), slice(None))):
            lin = Int4Linear(wt.out_features if name == "down_proj" else inter, wt.in_features, scheme)
            lin.weight.data, lin.weight_scale.data = wt.codes[rows].clone(), wt.scale[rows].clone()
            if not symmetric:
                lin.weight_zero_point.data = wt.zero_point[rows].clone()
            if act_order:
                lin.weight_g_idx.data = wt.g_idx[:1].clone() if name != "up_proj" else wt.g_idx[1:].clone()
            setattr(shared, name, lin)
        shared_alone = F_swiglu(shared, x)
        router, bias = torch.randn(routed, hidden) / 8, torch.randn(routed) / 10
        routed_alone = module.layer(x, router, bias, k, True, 2.0, False, None)
        assert not module.stacked_with(shared)
        assert module.stack_shared(shared) and module.stacked_with(shared)
        torch.testing.assert_close(F_swiglu(shared, x), shared_alone)  # the views hold the same weights
        wr, idr = route_reference(x, router, bias, k, True, 2.0)
        torch.testing.assert_close(module(x, wr, idr), routed_alone, rtol=1e-4, atol=1e-5)
        both = module.layer(x, router, bias, k, True, 2.0, True, None)
        torch.testing.assert_close(both, routed_alone + shared_alone, rtol=1e-4, atol=1e-5)
        module.gate_up_proj = torch.nn.Parameter(module.gate_up_proj.clone(), requires_grad=False)
        assert not module.stacked_with(shared)  # a replaced parameter no longer backs the stack


def F_swiglu(mlp, x):
    return mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


# ------------------------------------------------------------------------------------------------ dispatch
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_native_for_few_rows_gemm_beyond(dtype):
    w = random_int4(64, 96, 32, False, False, seed=2)
    few = torch.randn(k4.NATIVE_MAX_ROWS[dtype], 96).to(dtype)
    many = torch.randn(k4.NATIVE_MAX_ROWS[dtype] + 1, 96).to(dtype)
    with torch.no_grad():
        assert k4.native_wanted(few, w)
        assert torch.equal(k4.linear_int4(few, w), k4.linear_int4_native(few, w))
        assert torch.equal(k4.linear_int4(many, w), k4.linear_int4_dequantized(many, w))


@needs_native
def test_dispatch_respects_the_switches_and_autograd(monkeypatch):
    from trinity import switches

    w = random_int4(64, 96, 32, True, False, seed=3)
    x = torch.randn(2, 96)
    with torch.no_grad():
        assert k4.native_wanted(x, w)
        assert not k4.native_wanted(x.half(), w)  # fp16 activations: the reference
        kernels.use_reference(True)
        try:
            assert not k4.native_wanted(x, w)
            assert torch.equal(k4.linear_int4(x, w), k4.linear_int4_reference(x, w))
        finally:
            kernels.use_reference(None)
        monkeypatch.setenv("TRINITY_KERNELS", "reference")
        switches.refresh()
        assert not k4.native_wanted(x, w)
        monkeypatch.setenv("TRINITY_KERNELS", "auto")
        monkeypatch.setenv("TRINITY_CPU_NATIVE", "0")
        switches.refresh()
        assert knative.library() is None and not k4.native_wanted(x, w)
    monkeypatch.undo()
    switches.refresh()
    assert k4.native_wanted(x, w)  # grad mode on, nothing requiring grad: the kernel
    x.requires_grad_()
    assert not k4.native_wanted(x, w)
    y = k4.linear_int4(x, w)
    y.sum().backward()  # the reference, differentiable in x
    torch.testing.assert_close(x.grad, int4.dequantize(w, torch.float32).sum(0).expand(2, -1))


@needs_native
def test_native_refuses_shapes_that_do_not_fit_and_unknown_experts():
    w = random_int4(64, 96, 32, False, True, seed=4)
    with pytest.raises(ValueError, match="do not match"):
        k4.linear_int4_native(torch.randn(1, 96), w._replace(scale=w.scale[:, :2]))
    with pytest.raises(ValueError, match="a group outside"):
        k4.linear_int4_native(torch.randn(1, 96), w._replace(g_idx=w.g_idx + 3))
    with pytest.raises(ValueError, match="rows 60:65 of 64"):
        k4.dequantize_native(w, torch.float32, 60, 65)
    gate_up, down = random_experts(4, 32, 16, 16, True, False, seed=0)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        k4.experts_int4_native(torch.randn(2, 32), torch.rand(2, 1), torch.tensor([[1], [4]]), gate_up, down)


@needs_native
def test_generic_vector_path_agrees(tmp_path):
    """The build without AVX-512 (NEON, AVX2): int4_cpu.c compiled with TRINITY_INT4_GENERIC dequantizes bit for
    bit and computes the same products in the same order (the same values)."""
    here = Path(knative.__file__).parent
    target = tmp_path / "int4_generic.so"
    subprocess.run([knative.find_compiler(), *knative.FLAGS, "-DTRINITY_INT4_GENERIC", "-o", str(target),
                    str(here / "int4_cpu.c"), str(here / "moe_cpu.c"), "-lm"], check=True, capture_output=True,
                   timeout=300)  # moe_cpu.c: the routing trinity_moe_layer_int4 shares
    lib = ctypes.CDLL(str(target))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.trinity_int4_dequantize.argtypes = [p] * 4 + [i, i, p] + [i] * 5
    lib.trinity_linear_int4.argtypes, lib.trinity_linear_int4.restype = [p, i, p, p, p, p, i, i, p] + [i] * 4, i
    for out, inp, group in SHAPES:
        for symmetric, act_order in ((True, False), (False, True)):
            w = random_int4(out, inp, group, symmetric, act_order, seed=inp)
            codes, scale, zero, g_idx, block_rows = k4._checked(w)
            ptrs = (codes.data_ptr(), scale.data_ptr(), k4._ptr(zero), k4._ptr(g_idx), block_rows, w.group)
            deq = torch.empty(out, inp)
            lib.trinity_int4_dequantize(*ptrs, deq.data_ptr(), 0, 0, out, inp, 1)
            assert torch.equal(deq.view(torch.int32), int4.dequantize(w, torch.float32).view(torch.int32))
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(5, inp).to(dtype)
                y = torch.empty(5, out, dtype=dtype)
                assert lib.trinity_linear_int4(x.data_ptr(), dtype == torch.bfloat16, *ptrs, y.data_ptr(), 5, inp,
                                               out, 1) == 0
                with torch.no_grad():
                    assert torch.equal(y, k4.linear_int4_native(x, w))


@needs_native
def test_moe_block_takes_the_whole_layer_kernel_with_the_shared_expert_stacked():
    """A `tiny` model's MoE blocks with int4 experts and an int4 shared expert: after `fuse_projections` the shared
    expert is stacked, a CPU decode batch takes the one-call layer ("fp8" path: the quantized experts' own `layer`),
    and its output equals the block's routed path with the references forced."""
    from trinity import TrinityForCausalLM, preset
    from trinity.model.moe import MoEBlock
    from trinity.quant.int4_modules import Int4Experts, Int4Linear
    from trinity.quant.int4_scheme import Int4Scheme

    cfg = preset("tiny")
    model = TrinityForCausalLM.random(cfg, seed=0, dtype=torch.float32).eval()
    scheme = Int4Scheme("pack-quantized", 32, False)
    block = next(b for b in model.modules() if isinstance(b, MoEBlock))
    e, two_i, hidden = block.experts.gate_up_proj.shape
    experts = Int4Experts(e, hidden, two_i // 2, scheme)
    gate_up, down = random_experts(e, hidden, two_i // 2, 32, False, False, seed=1)
    for base, wt in (("gate_up_proj", gate_up), ("down_proj", down)):
        for suffix, value in (("", wt.codes), ("_scale", wt.scale), ("_zero_point", wt.zero_point)):
            getattr(experts, base + suffix).data = value
    block.experts = experts
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(block.shared_experts, name)
        q = Int4Linear(lin.out_features, lin.in_features, scheme)
        wt = int4.quantize(lin.weight.detach(), 32, False)
        q.weight.data, q.weight_scale.data, q.weight_zero_point.data = wt.codes, wt.scale, wt.zero_point
        setattr(block.shared_experts, name, q)
    block.fuse_projections()
    assert block.experts.stacked_with(block.shared_experts)
    x = torch.randn(2, hidden)
    with torch.no_grad():
        assert block._path(x) == "fp8"
        got = block(x)
        kernels.use_reference(True)
        try:
            assert block._path(x) == "routed"
            want = block(x)
        finally:
            kernels.use_reference(None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@needs_native
def test_int4_linears_fuse_into_one_call():
    """`Int4Linear.fuse` (what `layers.fuse_linears` calls for attention's q/k/v/gate): one concatenated weight,
    the modules' parameters views of it, the same outputs as each module alone; refused with act order."""
    from trinity.model.layers import fuse_linears, fused_projections_usable
    from trinity.quant.int4_modules import Int4Linear
    from trinity.quant.int4_scheme import Int4Scheme

    scheme = Int4Scheme("pack-quantized", 32, False)
    mods = []
    for i, out in enumerate((64, 32, 32, 64)):
        m = Int4Linear(out, 96, scheme)
        wt = random_int4(out, 96, 32, False, False, seed=i)
        m.weight.data, m.weight_scale.data, m.weight_zero_point.data = wt.codes, wt.scale, wt.zero_point
        mods.append(m)
    x = torch.randn(3, 96)
    with torch.no_grad():
        alone = [m(x) for m in mods]
        fused = fuse_linears(mods)
        assert fused is not None and fused_projections_usable(fused)
        for got, want in zip(fused(x), alone):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for got, want in zip([m(x) for m in mods], alone):  # the views hold the same weights
            assert torch.equal(got, want)
    ordered = Int4Scheme("pack-quantized", 32, True, act_order=True)
    assert fuse_linears([Int4Linear(8, 96, ordered), Int4Linear(8, 96, ordered)]) is None
