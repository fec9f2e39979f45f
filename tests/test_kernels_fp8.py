"""The FP8 CPU kernels (`kernels/fp8_cpu.c`) against their pure-torch references (`kernels/fp8.py`), and the
dispatch that picks them.

Weights are drawn from every finite e4m3fn code (negative zero and the subnormals included; the NaN codes 0x7f
and 0xff never occur in quantized weights and are undefined in the kernels). Tolerances:

- dequantization: bit for bit (the kernel computes code * scale in fp32 as the reference does, rounds once);
- fp32 products: against the exact (fp64) product, within 1e-5 of sum_k |w_k x_k| (fp32 sums of a few hundred
  terms in another order than the reference's; the reference meets the same bound);
- bf16 activations: the kernels sum in fp32 and round once, so within a bf16 rounding (2^-8 relative) of the
  exact product plus that fp32 bound, and on average no further from it than the reference (which rounds the
  dequantized weight and every op's result to bf16).
"""

import ctypes
import subprocess
from pathlib import Path

import pytest
import torch

from trinity import kernels
from trinity.kernels import fp8 as kfp8
from trinity.kernels import native as knative
from trinity.quant import fp8

needs_native = pytest.mark.skipif(knative.library() is None, reason="no C compiler (or the build failed)")

# every finite code: 0x00-0x7e and 0x80-0xfe (0x80 is -0, 0x01-0x07 / 0x81-0x87 the subnormals, 0x7e = 448)
FINITE_CODES = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)

# (out, in, block): the online/DeepSeek blocks with partial edges, an odd block, channel, tensor, and a block
# narrower than one vector whose width is no multiple of anything (scalar columns only)
SHAPES = [(200, 300, (128, 128)), (200, 300, (32, 48)), (200, 300, (1, 300)), (200, 300, (200, 300)),
          (64, 77, (16, 7))]


def random_fp8(out: int, inp: int, block: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes drawn uniformly from every finite code (the first 254 in order, so each appears), scales around
    1 / (448 sqrt(in)) so that outputs stay near 1."""
    g = torch.Generator().manual_seed(seed)
    codes = FINITE_CODES[torch.randint(0, len(FINITE_CODES), (out * inp,), generator=g)]
    codes[: len(FINITE_CODES)] = FINITE_CODES
    scale = (torch.rand(fp8.grid((out, inp), block), generator=g) + 0.5) / (448 * inp ** 0.5)
    return codes.view(out, inp).view(fp8.FP8), scale


def exact(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """The product in fp64 from the same (fp32/bf16-valued) inputs, and sum_k |w_k x_k| (the scale of fp32 error)."""
    w = fp8.dequantize(q, scale.double(), block, torch.float64)
    return x.double() @ w.t(), x.double().abs() @ w.abs().t()


def assert_fp32_close(got: torch.Tensor, x, q, scale, block) -> None:
    want, size = exact(x, q, scale, block)
    err = (got.double() - want).abs()
    assert (err <= 1e-5 * size + 1e-30).all(), f"max error {(err / size).max():.3g} of sum |w x|"


def assert_bf16_close(got: torch.Tensor, reference: torch.Tensor, x, q, scale, block) -> None:
    assert got.dtype == torch.bfloat16
    want, size = exact(x, q, scale, block)
    err = (got.double() - want).abs()
    assert (err <= 2 ** -8 * want.abs() + 1e-5 * size + 1e-30).all(), f"max error {err.max():.3g}"
    assert err.mean() <= (reference.double() - want).abs().mean()


# ------------------------------------------------------------------------------------------------ dequantize
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out,inp,block", SHAPES)
def test_dequantize_native_is_bit_exact(out, inp, block, dtype):
    q, s = random_fp8(out, inp, block, seed=out + inp)
    want = fp8.dequantize(q, s, block, dtype)
    got = kfp8.dequantize_native(q, s, block, dtype)
    as_int = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(as_int), want.view(as_int))  # bit patterns: -0.0 keeps its sign
    end = min(out, 170)
    rows = kfp8.dequantize_native(q, s, block, dtype, 33, end)  # a slab that starts inside a block row
    assert torch.equal(rows.view(as_int), want[33:end].view(as_int))


@needs_native
@pytest.mark.parametrize("block", [(2, 64), (4, 32), (3, 7)])  # 64-column loop, 16-column loop, scalar tail
def test_every_code_reads_as_its_value(block):
    """x = identity: each output is one weight times 1 (plus zero products), so the linear kernel's reading of
    each code, times its block's scale, must be the reference's value exactly (compared by value: -0 * 1 summed
    with +0 products is +0). Every finite code appears, two of them twice."""
    codes = torch.cat([FINITE_CODES, FINITE_CODES[:2]]).view(4, 64)
    q = codes.view(fp8.FP8)
    s = torch.tensor([0.5, 3.0, 2.0 ** -7, 1.0, 0.1, 7.0, 0.25, 2.0, 1.5] * 30)[: fp8.grid((4, 64), block)[0]
                                                                            * fp8.grid((4, 64), block)[1]]
    s = s.view(fp8.grid((4, 64), block))
    with torch.no_grad():
        got = kfp8.linear_fp8_native(torch.eye(64), q, s, block)
    assert torch.equal(got, fp8.dequantize(q, s, block, torch.float32).t())


# ------------------------------------------------------------------------------------------------ linear
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16, 40])  # one pass of 8 and its tail, two passes, five
@pytest.mark.parametrize("out,inp,block", SHAPES)
def test_linear_native_equals_reference(out, inp, block, rows, dtype):
    q, s = random_fp8(out, inp, block, seed=rows * out + inp)
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows)).to(dtype)
    with torch.no_grad():
        got = kfp8.linear_fp8_native(x, q, s, block)
        reference = kfp8.linear_fp8_reference(x, q, s, block)
    assert got.shape == (rows, out) and got.dtype == dtype
    if dtype == torch.float32:
        assert_fp32_close(got, x, q, s, block)
        assert_fp32_close(reference, x, q, s, block)  # the bound is one the reference meets too
    else:
        assert_bf16_close(got, reference, x, q, s, block)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_native_keeps_leading_dimensions(dtype):
    q, s = random_fp8(40, 64, (32, 32), seed=1)
    x = torch.randn(2, 3, 64).to(dtype)
    with torch.no_grad():
        got = kfp8.linear_fp8_native(x, q, s, (32, 32))
    assert got.shape == (2, 3, 40) and got.is_contiguous()
    assert torch.equal(got.view(6, 40), kfp8.linear_fp8_native(x.view(6, 64), q, s, (32, 32)))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slab_bytes", [kfp8.SLAB_BYTES, 1])  # one GEMM; a slab per block row
def test_linear_dequantized_equals_reference(dtype, slab_bytes, monkeypatch):
    """Dequantize-then-GEMM computes the reference's values with the same op: equal up to the GEMM's own
    blocking (slabs are GEMMs over fewer output rows)."""
    monkeypatch.setattr(kfp8, "SLAB_BYTES", slab_bytes)
    q, s = random_fp8(200, 300, (32, 48), seed=5)
    x = torch.randn(2, 40, 300).to(dtype)
    with torch.no_grad():
        got = kfp8.linear_fp8_dequantized(x, q, s, (32, 48))
        want = kfp8.linear_fp8_reference(x, q, s, (32, 48))
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------ experts
def random_experts(experts, hidden, inter, gate_block, down_block, seed):
    """Fp8Experts' layout from float weights: each half of gate_up quantized on its own, scales stacked."""
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    down = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
    (qg, sg), (qu, su) = fp8.quantize(gate_up[:, :inter], gate_block), fp8.quantize(gate_up[:, inter:], gate_block)
    qd, sd = fp8.quantize(down, down_block)
    return torch.cat([qg, qu], 1), torch.cat([sg, su], 1), qd, sd


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,k,gate_block,down_block", [
    (1, 4, 2, (128, 128), (128, 128)),   # batch-1 decode; blocks wider than the matrices
    (5, 8, 2, (32, 48), (32, 48)),       # partial edge blocks in both projections
    (40, 6, 3, (1, 96), (1, 80)),        # channel scales; 20 tokens per expert: several 8-token passes
    (70, 16, 4, (16, 16), (48, 32)),     # more tokens than one 64-token chunk for a crowded expert
])
def test_experts_native_equals_reference(tokens, experts, k, gate_block, down_block, dtype):
    hidden, inter = 96, 80
    gate_up, gs, down, ds = random_experts(experts, hidden, inter, gate_block, down_block, seed=tokens)
    g = torch.Generator().manual_seed(tokens + 1)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    if tokens >= 70:
        ids[:, 0] = 3  # one expert gets every token
    w = torch.rand(tokens, k, generator=g)
    args = (w, ids, gate_up, gs, down, ds, gate_block, down_block)
    with torch.no_grad():
        got = kfp8.experts_fp8_native(x, *args)
        exact_fp32 = kfp8.experts_fp8_reference(x.float(), *args)
        reference = kfp8.experts_fp8_reference(x, *args)
    assert got.shape == x.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
    else:  # fp32 inside, one rounding: within bf16 rounding of the fp32 computation, closer than the reference
        torch.testing.assert_close(got.float(), exact_fp32, rtol=1e-2, atol=1e-2)
        assert (got.float() - exact_fp32).abs().mean() <= (reference.float() - exact_fp32).abs().mean()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,shared,counted", [(1, True, True), (6, True, False), (9, False, True)])
def test_moe_layer_fp8_native_equals_routing_then_experts(tokens, shared, counted, dtype):
    """The whole FP8 MoE layer in one C call = `route_reference` (fp32 router) then the experts' reference, with
    the stacked shared expert as every token's last choice of weight 1; the routed tokens are counted."""
    from trinity.kernels.moe import route_reference

    hidden, inter, routed, k = 96, 80, 6, 2
    block = (32, 48)
    gate_up, gs, down, ds = random_experts(routed + shared, hidden, inter, block, block, seed=tokens)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    router, bias = torch.randn(routed, hidden, generator=g) / 8, torch.randn(routed, generator=g) / 10
    counts = torch.zeros(routed, dtype=torch.long) if counted else None
    with torch.no_grad():
        got = kfp8.moe_layer_fp8_native(x, router, bias, k, True, 2.0, gate_up, gs, down, ds, block, block, shared,
                                        counts)
        w, ids = route_reference(x.float(), router, bias, k, True, 2.0)
        if shared:
            w = torch.cat([w, torch.ones(tokens, 1)], 1)
            ids = torch.cat([ids, torch.full((tokens, 1), routed)], 1)
        expected = kfp8.experts_fp8_reference(x.float(), w, ids, gate_up, gs, down, ds, block, block)
    assert got.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.float(), expected, **tol)
    if counted:
        assert counts.tolist() == torch.bincount(ids[:, :k].flatten(), minlength=routed).tolist()


@needs_native
def test_fp8_experts_module_takes_the_native_kernel_for_decode_batches():
    """`Fp8Experts.forward` (the model's module) hands CPU decode batches to the C kernel, which agrees with its
    own per-expert loop (run with the references forced)."""
    from trinity.quant.modules import Fp8Experts
    from trinity.quant.scheme import QuantConfig

    module = Fp8Experts(8, 64, 48, QuantConfig.online_fp8())
    gate_up, gs, down, ds = random_experts(8, 64, 48, module.gate_block, module.down_block, seed=0)
    with torch.no_grad():
        for p, v in ((module.gate_up_proj, gate_up), (module.gate_up_proj_scale, gs), (module.down_proj, down),
                     (module.down_proj_scale, ds)):
            p.data = v
    x, w = torch.randn(3, 64), torch.rand(3, 2)
    ids = torch.tensor([[0, 5], [5, 7], [2, 0]])
    with torch.no_grad():
        assert kfp8.experts_native_wanted(x, ids.numel(), module.gate_up_proj)
        got = module(x, w, ids)
        assert torch.equal(got, kfp8.experts_fp8_native(x, w, ids, gate_up, gs, down, ds, module.gate_block,
                                                        module.down_block))
        kernels.use_reference(True)
        try:
            assert not kfp8.experts_native_wanted(x, ids.numel(), module.gate_up_proj)
            expected = module(x, w, ids)
        finally:
            kernels.use_reference(None)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    many = torch.zeros(8 * kfp8.NATIVE_MAX_ROWS[torch.float32] + 1, 1, dtype=torch.long)  # a prefill's worth
    assert not kfp8.experts_native_wanted(torch.randn(many.shape[0], 64), many.numel(), module.gate_up_proj)


# ------------------------------------------------------------------------------------------------ dispatch
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_native_for_few_rows_gemm_beyond(dtype):
    q, s = random_fp8(64, 96, (32, 32), seed=2)
    few = torch.randn(kfp8.NATIVE_MAX_ROWS[dtype], 96).to(dtype)
    many = torch.randn(kfp8.NATIVE_MAX_ROWS[dtype] + 1, 96).to(dtype)
    with torch.no_grad():
        assert kfp8.native_wanted(few, q, s)
        assert torch.equal(kfp8.linear_fp8(few, q, s, (32, 32)), kfp8.linear_fp8_native(few, q, s, (32, 32)))
        assert torch.equal(kfp8.linear_fp8(many, q, s, (32, 32)), kfp8.linear_fp8_dequantized(many, q, s, (32, 32)))


@needs_native
def test_dispatch_respects_the_switches_and_autograd(monkeypatch):
    q, s = random_fp8(64, 96, (32, 32), seed=3)
    x = torch.randn(2, 96)
    with torch.no_grad():
        assert kfp8.native_wanted(x, q, s)
        assert not kfp8.native_wanted(x.half(), q, s)  # fp16 activations: the reference
        kernels.use_reference(True)
        try:
            assert not kfp8.native_wanted(x, q, s)
            assert torch.equal(kfp8.linear_fp8(x, q, s, (32, 32)), kfp8.linear_fp8_reference(x, q, s, (32, 32)))
        finally:
            kernels.use_reference(None)
        monkeypatch.setenv("TRINITY_KERNELS", "reference")
        assert not kfp8.native_wanted(x, q, s)
        monkeypatch.setenv("TRINITY_KERNELS", "auto")
        monkeypatch.setenv("TRINITY_CPU_NATIVE", "0")
        assert knative.library() is None and not kfp8.native_wanted(x, q, s)
    monkeypatch.undo()
    assert kfp8.native_wanted(x, q, s)  # grad mode on, nothing requiring grad: the kernel (no graph to record)
    x.requires_grad_()
    assert not kfp8.native_wanted(x, q, s)
    y = kfp8.linear_fp8(x, q, s, (32, 32))
    y.sum().backward()  # the reference, differentiable in x
    torch.testing.assert_close(x.grad, fp8.dequantize(q, s, (32, 32), torch.float32).sum(0).expand(2, -1))


@needs_native
def test_native_refuses_a_scale_grid_that_does_not_fit_and_unknown_experts():
    q, s = random_fp8(64, 96, (32, 32), seed=4)
    with pytest.raises(ValueError, match="does not match"):
        kfp8.linear_fp8_native(torch.randn(1, 96), q, s, (16, 32))
    with pytest.raises(ValueError, match="does not match"):
        kfp8.dequantize_native(q, s[:1], (32, 32), torch.float32)
    with pytest.raises(ValueError, match="rows 60:65 of 64"):
        kfp8.dequantize_native(q, s, (32, 32), torch.float32, 60, 65)
    gate_up, gs, down, ds = random_experts(4, 32, 16, (16, 16), (16, 16), seed=0)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        kfp8.experts_fp8_native(torch.randn(2, 32), torch.rand(2, 1), torch.tensor([[1], [4]]), gate_up, gs, down, ds,
                                (16, 16), (16, 16))


# ------------------------------------------------------------------------------------------------ portability
@needs_native
def test_generic_vector_path_agrees(tmp_path):
    """The conversion that builds without AVX-512 (NEON, AVX2): fp8_cpu.c compiled with TRINITY_FP8_GENERIC
    dequantizes bit for bit and computes the same products (same order of sums: the same values)."""
    here = Path(knative.__file__).parent
    target = tmp_path / "fp8_generic.so"
    subprocess.run([knative.find_compiler(), *knative.FLAGS, "-DTRINITY_FP8_GENERIC", "-o", str(target),
                    str(here / "fp8_cpu.c"), str(here / "moe_cpu.c"), "-lm"], check=True, capture_output=True,
                   timeout=300)  # moe_cpu.c: the routing trinity_moe_layer_fp8 shares
    lib = ctypes.CDLL(str(target))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.trinity_fp8_dequantize.argtypes = [p, p, i, i, p] + [i] * 5
    lib.trinity_linear_fp8.argtypes, lib.trinity_linear_fp8.restype = [p, i, p, p, i, i, p] + [i] * 4, i
    for out, inp, block in SHAPES:
        q, s = random_fp8(out, inp, block, seed=inp)
        codes = q.view(torch.uint8)
        deq = torch.empty(out, inp)
        lib.trinity_fp8_dequantize(codes.data_ptr(), s.data_ptr(), block[0], block[1], deq.data_ptr(), 0, 0, out,
                                   inp, 1)
        assert torch.equal(deq.view(torch.int32), fp8.dequantize(q, s, block, torch.float32).view(torch.int32))
        x = torch.randn(5, inp)
        y = torch.empty(5, out)
        assert lib.trinity_linear_fp8(x.data_ptr(), 0, codes.data_ptr(), s.data_ptr(), block[0], block[1],
                                      y.data_ptr(), 5, inp, out, 1) == 0
        with torch.no_grad():
            assert torch.equal(y, kfp8.linear_fp8_native(x, q, s, block))
