"""RMSNorm-family kernels: the references equal the model's module code exactly (always run); the Triton
kernels match the references (run under TRITON_INTERPRET=1 on the CPU, or on a CUDA device)."""

import os
import re

import pytest
import torch

from trinity.kernels import norm
from trinity.kernels.norm import (add_rms_norm_reference, norm_add_rms_norm_reference, qk_norm_rope_reference,
                                  rms_norm_reference, sigmoid_gate_reference, silu_mul_reference,
                                  sum_norm_add_rms_norm_reference)
from trinity.kernels.norm import rotate_half
from trinity.model.layers import RMSNorm, RotaryEmbedding

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRET or HAS_CUDA),
    reason="Triton kernels need a CUDA device or the interpreter (run with TRITON_INTERPRET=1)")
needs_gpu = pytest.mark.skipif(not HAS_TRITON or not HAS_CUDA or INTERPRET,
                               reason="real-shape kernel checks need a CUDA device (and no interpreter)")
DEVICE = "cpu" if INTERPRET or not HAS_CUDA else "cuda"


@pytest.fixture(autouse=True)
def _module_code_without_native_kernels(monkeypatch):
    """Here the model's module code must run its torch ops, which the references restate: the native C kernels
    it takes in fp32 CPU inference are checked against the references in test_kernels_cpu.py."""
    monkeypatch.setenv("TRINITY_CPU_NATIVE", "0")
# Opt-in (slow, ~1 min): compile the kernels to sm_90 cubins with Triton's bundled ptxas, no GPU needed.
needs_compile_check = pytest.mark.skipif(
    not HAS_TRITON or INTERPRET or os.environ.get("TRINITY_COMPILE_CHECK") != "1",
    reason="set TRINITY_COMPILE_CHECK=1 (without TRITON_INTERPRET) to compile the kernels for sm_90")
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1e-6), f"max err {err} vs max |ref| {scale} ({dtype})"


def _weight(n: int, device=DEVICE) -> torch.Tensor:
    return (1.0 + 0.3 * torch.randn(n, device=device)).float()


# ============================================================================== references == model ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_reference_equals_module(dtype):
    mod = RMSNorm(96, 1e-5)
    with torch.no_grad():
        mod.weight.copy_(_weight(96, "cpu"))
        x = torch.randn(5, 96).to(dtype) * 3
        assert torch.equal(rms_norm_reference(x, mod.weight, 1e-5), mod(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_and_sandwich_references_equal_decoder_layer_code(dtype):
    post, nxt = RMSNorm(96, 1e-5), RMSNorm(96, 1e-5)
    with torch.no_grad():
        post.weight.copy_(_weight(96, "cpu"))
        nxt.weight.copy_(_weight(96, "cpu"))
        x = torch.randn(7, 96).to(dtype)
        sub = torch.randn(7, 96).to(dtype) * 4  # a sublayer's output
        # DecoderLayer: x = x + post_norm(sublayer(...)); h = next_norm(x)
        want_res = x + post(sub)
        want = nxt(want_res)
        got, got_res = norm_add_rms_norm_reference(sub, x, post.weight, nxt.weight, 1e-5)
        assert torch.equal(got_res, want_res) and torch.equal(got, want)
        h = post(sub)
        got, got_res = add_rms_norm_reference(h, x, nxt.weight, 1e-5)
        assert torch.equal(got_res, x + h) and torch.equal(got, nxt(x + h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("apply_rope", [True, False])
def test_qk_norm_rope_reference_equals_attention_code(dtype, apply_rope):
    t, hq, hk, d = 6, 4, 2, 32
    qn, kn = RMSNorm(d, 1e-5), RMSNorm(d, 1e-5)
    with torch.no_grad():
        qn.weight.copy_(_weight(d, "cpu"))
        kn.weight.copy_(_weight(d, "cpu"))
        q = torch.randn(t, hq, d).to(dtype)
        k = torch.randn(t, hk, d).to(dtype)
        cos, sin = RotaryEmbedding(d, 10000.0).cos_sin(torch.randint(0, 5000, (t,)), dtype)
        # the attention layer's q/k norm and RoPE, written out
        wq, wk = qn(q), kn(k)
        if apply_rope:
            wq = wq * cos[:, None] + rotate_half(wq) * sin[:, None]  # neox RoPE, written out
            wk = wk * cos[:, None] + rotate_half(wk) * sin[:, None]
        gq, gk = qk_norm_rope_reference(q, k, qn.weight, kn.weight, 1e-5, cos, sin, apply_rope)
        assert torch.equal(gq, wq) and torch.equal(gk, wk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sigmoid_gate_reference_equals_attention_code(dtype):
    o, g = torch.randn(3, 64).to(dtype), torch.randn(3, 64).to(dtype)
    assert torch.equal(sigmoid_gate_reference(o, g), o * torch.sigmoid(g))


def test_dispatch_uses_references_on_cpu_by_default(monkeypatch):
    monkeypatch.delenv("TRINITY_KERNELS", raising=False)
    x = torch.randn(2, 8)
    assert not norm.use_triton(x)
    monkeypatch.setenv("TRINITY_KERNELS", "reference")
    assert not norm.use_triton(x)
    w = torch.ones(8)
    assert torch.equal(norm.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))


def test_dispatch_keeps_autograd_on_the_reference(monkeypatch):
    monkeypatch.setenv("TRINITY_KERNELS", "triton")
    w = torch.ones(8, requires_grad=True)
    with torch.enable_grad():
        assert not norm.use_triton(torch.randn(2, 8), w)


def test_forcing_triton_on_cpu_without_interpreter_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setenv("TRINITY_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.randn(2, 8), torch.ones(8)
    with torch.no_grad():
        assert not norm.use_triton(x)
        assert torch.equal(norm.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))


# ============================================================================== Triton vs references
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h", [(1, 96), (33, 96), (4, 1000)])
def test_triton_rms_norm(dtype, t, h):
    from trinity.kernels import norm_triton
    torch.manual_seed(t * 1000 + h)
    x = (torch.randn(t, h, device=DEVICE) * 3).to(dtype)
    w = _weight(h)
    _assert_close(norm_triton.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), dtype)


@needs_triton
def test_triton_rms_norm_strided_and_3d_input():
    from trinity.kernels import norm_triton
    big = torch.randn(5, 3, 160, device=DEVICE)
    x = big[..., :96]  # row stride 160
    w = _weight(96)
    _assert_close(norm_triton.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h", [(1, 96), (33, 96)])
def test_triton_add_rms_norm(dtype, t, h):
    from trinity.kernels import norm_triton
    torch.manual_seed(t + h)
    x = torch.randn(t, h, device=DEVICE).to(dtype)
    res = (torch.randn(t, h, device=DEVICE) * 5).to(dtype)
    w = _weight(h)
    got, got_res = norm_triton.add_rms_norm(x, res, w, 1e-5)
    want, want_res = add_rms_norm_reference(x, res, w, 1e-5)
    assert torch.equal(got_res, want_res)  # one rounding of an exact fp32 sum: bit-identical
    _assert_close(got, want, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h", [(1, 96), (33, 96)])
def test_triton_norm_add_rms_norm(dtype, t, h):
    from trinity.kernels import norm_triton
    torch.manual_seed(7 * t + h)
    x = (torch.randn(t, h, device=DEVICE) * 4).to(dtype)
    res = torch.randn(t, h, device=DEVICE).to(dtype)
    wp, wn = _weight(h), _weight(h)
    got, got_res = norm_triton.norm_add_rms_norm(x, res, wp, wn, 1e-5)
    want, want_res = norm_add_rms_norm_reference(x, res, wp, wn, 1e-5)
    _assert_close(got_res, want_res, dtype)
    _assert_close(got, want, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n", [(1, 96), (5, 1500)])
def test_triton_silu_mul(dtype, t, n):
    """The SwiGLU activation on the two halves of one GEMM output (strided views), against the module code."""
    from trinity.kernels import norm_triton
    torch.manual_seed(t + n)
    both = (torch.randn(t, 2 * n, device=DEVICE) * 3).to(dtype)
    gate, up = both.split(n, dim=-1)
    want = silu_mul_reference(gate, up)
    assert torch.equal(want, torch.nn.functional.silu(gate) * up)
    _assert_close(norm_triton.silu_mul(gate, up), want, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_norm_add_rms_norm_fp32_copy(dtype):
    """The extra fp32 output is exactly the normed output widened (what `.float()` would copy)."""
    from trinity.kernels import norm_triton
    torch.manual_seed(3)
    x, res = torch.randn(5, 96, device=DEVICE).to(dtype), torch.randn(5, 96, device=DEVICE).to(dtype)
    wp, wn = _weight(96), _weight(96)
    got, got_res, got32 = norm_triton.norm_add_rms_norm(x, res, wp, wn, 1e-5, fp32_copy=True)
    assert got32.dtype == torch.float32 and torch.equal(got32, got.float())
    want, want_res = norm_triton.norm_add_rms_norm(x, res, wp, wn, 1e-5)
    assert torch.equal(got, want) and torch.equal(got_res, want_res)
    ref = norm.norm_add_rms_norm(x.cpu(), res.cpu(), wp.cpu(), wn.cpu(), 1e-5, fp32_copy=True)  # the dispatcher's
    assert len(ref) == 3 and torch.equal(ref[2], ref[0].float())  # reference path gives the same three


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,k,h", [(1, 9, 96), (6, 3, 200)])
def test_triton_sum_norm_add_rms_norm(dtype, t, k, h):
    """A MoE layer's per-choice outputs summed inside the next norm, against the sum then the reference step."""
    from trinity.kernels import norm_triton
    torch.manual_seed(t * k + h)
    parts = torch.randn(t, k, h, device=DEVICE) * 2
    res = torch.randn(t, h, device=DEVICE).to(dtype)
    wp, wn = _weight(h), _weight(h)
    got, got_res = norm_triton.sum_norm_add_rms_norm(parts, res, wp, wn, 1e-5)
    want, want_res = sum_norm_add_rms_norm_reference(parts, res, wp, wn, 1e-5)
    _assert_close(got_res, want_res, dtype)
    _assert_close(got, want, dtype)
    # the reference is the combine (sum, rounded to the dtype) followed by the plain sandwich step
    combined = parts.sum(dim=1).to(dtype)
    plain, plain_res = norm_add_rms_norm_reference(combined, res, wp, wn, 1e-5)
    assert torch.equal(want, plain) and torch.equal(want_res, plain_res)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("apply_rope", [True, False])
@pytest.mark.parametrize("t,hq,hk,d", [(1, 4, 2, 128), (33, 3, 1, 24), (33, 8, 2, 64)])
def test_triton_qk_norm_rope(dtype, apply_rope, t, hq, hk, d):
    from trinity.kernels import norm_triton
    torch.manual_seed(t * hq + d)
    q = (torch.randn(t, hq, d, device=DEVICE) * 2).to(dtype)
    k = (torch.randn(t, hk, d, device=DEVICE) * 2).to(dtype)
    wq, wk = _weight(d), _weight(d)
    cos, sin = RotaryEmbedding(d, 10000.0).cos_sin(torch.randint(0, 100000, (t,), device=DEVICE), dtype)
    gq, gk = norm_triton.qk_norm_rope(q, k, wq, wk, 1e-5, cos, sin, apply_rope)
    rq, rk = qk_norm_rope_reference(q, k, wq, wk, 1e-5, cos, sin, apply_rope)
    _assert_close(gq, rq, dtype)
    _assert_close(gk, rk, dtype)


@needs_triton
def test_triton_qk_norm_rope_from_projection_views():
    """q/k as views of one fused qkv projection output (head stride = D, token stride = width)."""
    from trinity.kernels import norm_triton
    t, hq, hk, d = 5, 4, 2, 32
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEVICE)
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    wq, wk = _weight(d), _weight(d)
    cos, sin = RotaryEmbedding(d, 10000.0).cos_sin(torch.arange(t, device=DEVICE), torch.float32)
    gq, gk = norm_triton.qk_norm_rope(q, k, wq, wk, 1e-5, cos, sin, True)
    rq, rk = qk_norm_rope_reference(q, k, wq, wk, 1e-5, cos, sin, True)
    _assert_close(gq, rq, torch.float32)
    _assert_close(gk, rk, torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 96), (33, 96), (3, 1500)])
def test_triton_sigmoid_gate(dtype, shape):
    from trinity.kernels import norm_triton
    o = (torch.randn(*shape, device=DEVICE) * 2).to(dtype)
    g = (torch.randn(*shape, device=DEVICE) * 3).to(dtype)
    _assert_close(norm_triton.sigmoid_gate(o, g), sigmoid_gate_reference(o, g), dtype)


@needs_triton
def test_dispatch_reaches_triton_when_forced(monkeypatch):
    monkeypatch.setenv("TRINITY_KERNELS", "triton")
    calls = []
    from trinity.kernels import norm_triton
    real = norm_triton.rms_norm
    monkeypatch.setattr(norm_triton, "rms_norm", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(3, 96, device=DEVICE), _weight(96)
    with torch.no_grad():
        got = norm.rms_norm(x, w, 1e-5)
    assert calls and torch.allclose(got, rms_norm_reference(x, w, 1e-5), atol=1e-5, rtol=1e-4)


# ============================================================================== real shapes (GPU only)
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("h", [1024, 2048, 3072])
@pytest.mark.parametrize("t", [1, 64, 1000])
def test_gpu_norms_real_shapes(h, t):
    from trinity.kernels import norm_triton
    x = torch.randn(t, h, device="cuda").bfloat16()
    res = torch.randn(t, h, device="cuda").bfloat16()
    w, w2 = _weight(h, "cuda"), _weight(h, "cuda")
    _assert_close(norm_triton.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), torch.bfloat16)
    got, got_res = norm_triton.add_rms_norm(x, res, w, 1e-5)
    want, want_res = add_rms_norm_reference(x, res, w, 1e-5)
    assert torch.equal(got_res, want_res)
    _assert_close(got, want, torch.bfloat16)
    got, got_res = norm_triton.norm_add_rms_norm(x, res, w, w2, 1e-5)
    want, want_res = norm_add_rms_norm_reference(x, res, w, w2, 1e-5)
    _assert_close(got_res, want_res, torch.bfloat16)
    _assert_close(got, want, torch.bfloat16)
    _assert_close(norm_triton.sigmoid_gate(x, res), sigmoid_gate_reference(x, res), torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("hq,hk", [(8, 2), (32, 4), (48, 8)])
@pytest.mark.parametrize("t", [1, 64, 1000])
def test_gpu_qk_norm_rope_real_shapes(hq, hk, t):
    from trinity.kernels import norm_triton
    q = torch.randn(t, hq, 128, device="cuda").bfloat16()
    k = torch.randn(t, hk, 128, device="cuda").bfloat16()
    wq, wk = _weight(128, "cuda"), _weight(128, "cuda")
    cos, sin = RotaryEmbedding(128, 10000.0).cos_sin(torch.randint(0, 131072, (t,), device="cuda"), torch.bfloat16)
    for rope in (True, False):
        gq, gk = norm_triton.qk_norm_rope(q, k, wq, wk, 1e-5, cos, sin, rope)
        rq, rk = qk_norm_rope_reference(q, k, wq, wk, 1e-5, cos, sin, rope)
        _assert_close(gq, rq, torch.bfloat16)
        _assert_close(gk, rk, torch.bfloat16)


# ============================================================================== sm_90 compile check (opt-in)
def compile_sm90(kernel, args: dict, num_warps: int = 4, num_stages: int = 3) -> dict:
    """Compile a @triton.jit kernel for an H100 (sm_90) without a device, with the specialisations a real
    launch would get. args: name -> "*bf16"-style pointer (16-byte aligned), "i32", "i32:16" (a multiple
    of 16), "one" (an int equal to 1, which Triton turns into a constant) or ("c", value) for a constexpr.
    Returns the resource usage reported by cuobjdump (registers, stack bytes), the dynamic shared memory, how
    many Hopper tensor-core instructions (wgmma) the PTX holds and how many stack accesses sit inside loops."""
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        v = args.get(name, ("c", False)) if name == "PDL" else args[name]  # the variant launched without PDL
        if isinstance(v, tuple):
            sig[name], consts[name] = "constexpr", v[1]
        elif v == "one":
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = v.split(":")[0]
            if v.startswith("*") or v.endswith(":16"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "shared": compiled.metadata.shared,
            "wgmma": compiled.asm["ptx"].count("wgmma.mma_async"), "loop_spills": _local_accesses_in_loops(sass)}


def ptx_sm90(kernel, types: dict, constants: dict, num_warps: int = 4) -> str:
    """The sm_90 PTX of a @triton.jit kernel: `constants` its constexprs, `types` the other arguments' types
    where they are not the default ("*fp32" for a name ending in _ptr, else "i32")."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: "constexpr" if n in constants else types.get(n, "*fp32" if n.endswith("_ptr") else "i32")
           for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, sig, constexprs=constants), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    return compiled.asm["ptx"]


def ptx_instructions(ptx: str) -> list[str]:
    """The PTX's instructions alone (no directives, labels, comments or blank lines)."""
    lines = [line.strip() for line in ptx.splitlines()]
    return [line for line in lines if line and not line.startswith((".", "//", "$"))]


def _local_accesses_in_loops(sass: str) -> int:
    """Stack loads/stores (LDL/STL) that sit inside a loop of the SASS: between a backward branch's target and
    the branch. ptxas may park a register or two on the stack across a loop (stored before, loaded after), which
    costs nothing per iteration; a spill inside the loop costs every iteration."""
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    loops = [(int(t, 16), a) for a, op in code for t in re.findall(r"\bBRA\b.*?0x([0-9a-f]+)", op) if int(t, 16) < a]
    local = [a for a, op in code if re.search(r"\b(LDL|STL)\b", op)]
    return sum(any(lo <= a <= hi for lo, hi in loops) for a in local)


def spill_free(use: dict, parked_bytes: int = 16) -> bool:
    """No register spills, or (some ptxas versions, e.g. Triton 3.6's) at most `parked_bytes` of registers parked
    on the stack outside every loop."""
    return use["stack"] == 0 or (use["stack"] <= parked_bytes and use["loop_spills"] == 0)


@needs_compile_check
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_norm_kernels_compile_for_sm90(dtype):
    from trinity.kernels import norm_triton as nt
    p = "*" + dtype
    for has_res, pre, parts, fp32_out in [(False, False, 0, False), (True, False, 0, False), (True, True, 0, False),
                                          (True, True, 0, True), (True, True, 9, False)]:
        use = compile_sm90(nt._rms_norm_kernel, {
            "x_ptr": "*fp32" if parts else p, "res_ptr": p, "out_ptr": p, "res_out_ptr": p, "out32_ptr": "*fp32",
            "pre_w_ptr": "*fp32", "w_ptr": "*fp32",
            **{n: "i32:16" for n in ["N", "stride_x", "stride_part", "stride_r", "stride_o", "stride_ro",
                                     "stride_o32"]}, "eps": "fp32",
            "BLOCK": ("c", 4096), "HAS_RES": ("c", has_res), "PRE_NORM": ("c", pre), "FIX_BF16": ("c", False),
            "PARTS": ("c", parts), "FP32_OUT": ("c", fp32_out)},
            num_warps=8)
        assert use["stack"] == 0, use  # no register spills
    for rope in (True, False):
        use = compile_sm90(nt._qk_norm_rope_kernel, {
            **{n: p for n in ["q_ptr", "k_ptr", "qo_ptr", "ko_ptr", "cos_ptr", "sin_ptr"]},
            "qw_ptr": "*fp32", "kw_ptr": "*fp32", "HQ": "i32", "HK": "i32", "q_blocks": "i32",
            **{n: "i32:16" for n in ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_qot",
                                     "stride_qoh", "stride_kot", "stride_koh", "stride_ct", "stride_st"]},
            "eps": "fp32", "HEAD_DIM": ("c", 128), "BLOCK_H": ("c", 16), "BLOCK_D": ("c", 128), "ROPE": ("c", rope),
            "FIX_BF16": ("c", False)})
        assert use["stack"] == 0, use
    use = compile_sm90(nt._silu_mul_kernel, {"g_ptr": p, "u_ptr": p, "out_ptr": p, "N": "i32:16",
                                             **{n: "i32:16" for n in ["stride_g", "stride_u", "stride_o"]},
                                             "BLOCK": ("c", 1024), "FIX_BF16": ("c", False)})
    assert use["stack"] == 0, use
    use = compile_sm90(nt._sigmoid_gate_kernel, {"o_ptr": p, "g_ptr": p, "out_ptr": p, "numel": "i32",
                                                 "BLOCK": ("c", 1024), "FIX_BF16": ("c", False)})
    assert use["stack"] == 0, use


@needs_triton
def test_model_with_chained_norm_kernels_matches_reference(monkeypatch):
    """The whole tiny model after fuse_projections() (the layers chain `norm_add_rms_norm`) through the Triton
    norm kernels, against the pure-torch references."""
    from trinity import TrinityForCausalLM, preset
    model = TrinityForCausalLM.random(preset("tiny"), seed=4).to(DEVICE).eval().fuse_projections()
    ids = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.inference_mode():
        monkeypatch.setenv("TRINITY_KERNELS", "reference")
        want = model(ids)
        monkeypatch.setenv("TRINITY_KERNELS", "triton")
        got = model(ids)
    _assert_close(got, want, torch.float32)
