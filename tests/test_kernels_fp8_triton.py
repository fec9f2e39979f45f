"""The FP8 Triton kernels (`kernels.fp8_triton`) against their pure-torch references: the activation quantizer,
the block-scaled GEMM in its w8a16 and w8a8 modes, and the fused MoE over FP8 experts. Run under TRITON_INTERPRET=1
on the CPU (or on a CUDA device):

    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_fp8_triton.py

and the sm_90 compile checks (registers, spills, shared memory) with TRINITY_COMPILE_CHECK=1, no interpreter.

Tolerances come from the rounding each side does. w8a16 dequantizes the weight exactly as the reference does
(fp32 product, one rounding to x's dtype), so kernel and reference differ only in the order of their fp32 sums and
in their one final rounding: elementwise |y - ref| <= 2u |ref| + 2K 2^-24 sum|x w| (u: the output dtype's unit
roundoff). w8a8 computes exact fp8 x fp8 products scaled in fp32, which is the reference's arithmetic done in fp32
(`fake_quantize_activations` on fp32 x): the same bound; against the reference in bf16/fp16, which also rounds
each dequantized operand to that dtype before multiplying, 2u sum|x w| more. Shapes are small (the interpreter is
slow) with partial edge blocks: N = 192 (one and a half 128-row blocks), K = 320 (two and a half).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from trinity import kernels
from trinity.kernels.fp8 import linear_fp8_reference
from trinity.quant import fp8
from test_kernels_norm import DEVICE, HAS_TRITON, INTERPRET, TOL, compile_sm90, needs_compile_check, needs_triton, \
    spill_free

needs_triton_module = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

UNIT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
N, K = 192, 320
H, I = 160, 192  # the experts' hidden and intermediate sizes
H100_SMEM = 227 * 1024


@pytest.fixture
def ft():
    from trinity.kernels import fp8_triton
    return fp8_triton


@pytest.fixture
def reference_kernels():
    """The module references run as written (no native CPU kernel in `linear_fp8`)."""
    kernels.use_reference(True)
    yield
    kernels.use_reference(None)


def _weight(n: int, k: int, block: tuple[int, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[: min(n, 3), : min(k, 40)] *= 30  # blocks of different magnitudes: the scales matter
    q, s = fp8.quantize(w, block)
    return q.to(DEVICE), s.to(DEVICE)


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, :64] *= 8  # groups of different magnitudes
    return x.to(device=DEVICE, dtype=dtype)


def assert_within(y: torch.Tensor, ref: torch.Tensor, x_op: torch.Tensor, w_op: torch.Tensor,
                  rounded_operands: bool = False, fp8_dot: bool = False) -> None:
    """Elementwise |y - ref| <= 2u |ref| + (2K 2^-24 [+ 2u]) sum_k |x w| (module docstring), u of y's dtype;
    x_op / w_op: the operands in fp32 as the exact arithmetic sees them. fp8_dot on a GPU: plus 2^-12 sum_k |x w|,
    Hopper's fp8 tensor cores keeping about 14 bits of each K tile's sum (the interpreter sums in fp32)."""
    assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, y.dtype, ref.shape, ref.dtype)
    assert torch.isfinite(y).all()
    u = UNIT[y.dtype]
    mag = x_op.double().abs() @ w_op.double().abs().T
    coeff = 2 * x_op.shape[-1] * 2.0 ** -24 + (2 * u if rounded_operands else 0)
    coeff += 2.0 ** -12 if fp8_dot and y.is_cuda else 0
    bound = 2 * u * ref.double().abs() + coeff * mag
    err = (y.double() - ref.double()).abs()
    worst = (err / bound.clamp_min(1e-30)).max().item()
    assert worst <= 1.0, f"error {worst:.2f} x the bound (max err {err.max().item():.3g})"


# ============================================================================== activations
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [128, 32, 0])
@pytest.mark.parametrize("k", [K, 96])
def test_quantize_activations_is_the_reference(ft, dtype, group, k):
    """Bit for bit `fake_quantize_activations` (group 0 = PER_TOKEN: its None), and q * scale reads it back; an
    all-zero group gets scale 1."""
    x = _x(7, k, dtype)
    x[2] = 0
    ref = fp8.fake_quantize_activations(x, group or None)
    assert torch.equal(ft.quantize_activations(x, group, fake=True), ref)
    q, s = ft.quantize_activations(x, group)
    width = group or k
    assert q.dtype == fp8.FP8 and s.shape == (7, -(-k // width))
    assert torch.equal((q.float() * s.repeat_interleave(width, 1)[:, :k]).to(dtype), ref)
    assert (s[2] == 1).all()


@needs_triton
def test_round_e4m3_is_torchs_cast(ft):
    """Every e4m3 value, every midpoint between neighbours (ties to even) and points just either side of them,
    with the row's maximum 448 so the scale is exactly 1: the kernel's rounding by hand is torch's cast."""
    values = torch.arange(256, dtype=torch.uint8).view(fp8.FP8).float()
    values = values[torch.isfinite(values)].unique()
    mids = (values[1:] + values[:-1]) / 2
    probes = torch.cat([values, mids, mids * (1 + 2 ** -20), mids * (1 - 2 ** -20), torch.tensor([1e-30, -1e-30])])
    x = torch.cat([torch.tensor([448.0]), probes])
    q, s = ft.quantize_activations(x[None].to(DEVICE), 0)
    assert s.item() == 1.0
    assert torch.equal(q[0].float().cpu(), x.to(fp8.FP8).float())


# ============================================================================== GEMM
BLOCKS = [(128, 128), (64, 32), (1, K), (100, 50)]  # DeepSeek/Trinity, smaller, per channel, gathered scales


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 130])
@pytest.mark.parametrize("block", BLOCKS)
def test_w8a16_gemm_matches_reference(ft, dtype, m, block):
    q, s = _weight(N, K, block)
    x = _x(m, K, dtype)
    y = ft.linear_fp8_gpu(x, q, s, block)
    ref = linear_fp8_reference(x, q, s, block)
    assert_within(y, ref, x.float(), fp8.dequantize(q, s, block, dtype).float())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 130])
def test_w8a16_gemm_reading_fp8_as_bytes(ft, dtype, m):
    """The portable path (Ampere, AMD): the weight's bytes widened by bit manipulation give the same result as the
    native fp8 loads, bit for bit."""
    block = (128, 128)
    q, s = _weight(N, K, block)
    x = _x(m, K, dtype)
    native = ft._linear(x, q, s, block, None, bits=False)
    assert torch.equal(ft._linear(x, q, s, block, None, bits=True), native)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 130])
@pytest.mark.parametrize("block,group", [((128, 128), 128), ((64, 32), 32), ((128, 128), 0), ((100, 50), 128)])
def test_w8a8_gemm_matches_reference(ft, monkeypatch, dtype, m, block, group):
    """Dynamic activations per token and group (group 0: per token): the fp8 x fp8 GEMM where the tiles fit the
    groups and blocks, which is its arithmetic done in fp32 (within the reference in x's dtype's operand
    roundings); else (100 x 50 blocks) the activations fake-quantized then w8a16, which is the reference in x's
    dtype (within the fp32 arithmetic's)."""
    modes = []
    gemm = ft._gemm
    monkeypatch.setattr(ft, "_gemm", lambda *a, **kw: modes.append(a[7]) or gemm(*a, **kw))
    q, s = _weight(N, K, block)
    x = _x(m, K, dtype)
    y = ft.linear_fp8_gpu(x, q, s, block, act_group=group)
    a8 = block != (100, 50)
    assert modes == [a8]
    x_op = fp8.fake_quantize_activations(x.float(), group or None)
    w_op = fp8.dequantize(q, s, block, torch.float32)
    in_fp32 = linear_fp8_reference(x_op, q, s, block).to(dtype)
    x_dt = fp8.fake_quantize_activations(x, group or None)
    in_dtype = linear_fp8_reference(x_dt, q, s, block)
    rounded = dtype != torch.float32
    if a8:
        assert_within(y, in_fp32, x_op, w_op, fp8_dot=True)
        assert_within(y, in_dtype, x_op, w_op, rounded_operands=rounded, fp8_dot=True)
    else:
        assert_within(y, in_dtype, x_dt.float(), fp8.dequantize(q, s, block, dtype).float())
        assert_within(y, in_fp32, x_op, w_op, rounded_operands=rounded)


@needs_triton
def test_linear_keeps_leading_dims_and_reads_strided_rows(ft):
    block = (128, 128)
    q, s = _weight(N, K, block)
    x = _x(6, 2 * K, torch.bfloat16)[:, :K].reshape(2, 3, K)  # rows 2K apart
    y = ft.linear_fp8_gpu(x, q, s, block)
    assert y.shape == (2, 3, N)
    assert torch.equal(y, ft.linear_fp8_gpu(x.contiguous(), q, s, block))
    for group in (None, 128):  # no rows
        assert ft.linear_fp8_gpu(x[:0], q, s, block, act_group=group).shape == (0, 3, N)


@needs_triton_module
def test_linear_declines_what_it_cannot_take(ft):
    block = (128, 128)
    q, s = _weight(N, K, block)
    x = _x(2, K, torch.bfloat16)
    assert ft.linear_fp8_gpu(x.to(torch.float64), q, s, block) is None
    assert ft.linear_fp8_gpu(x, q.float(), s, block) is None
    assert ft.linear_fp8_gpu(x[:, :-1], q, s, block) is None
    assert ft.linear_fp8_gpu(x, q, s[:, :1], block) is None
    assert ft.linear_fp8_gpu(x, q.t().contiguous().t(), s, block) is None  # K not unit stride
    if not INTERPRET:  # CPU tensors go to the references / C kernels
        assert ft.linear_fp8_gpu(x.cpu(), q.cpu(), s.cpu(), block) is None


# ============================================================================== fused MoE
def _experts(e: int, h: int, inter: int, block: tuple[int, int], acts=None, seed: int = 0):
    from trinity.quant.modules import Fp8Experts
    from trinity.quant.scheme import QuantConfig, WeightScheme

    g = torch.Generator().manual_seed(seed)
    mod = Fp8Experts(e, h, inter, QuantConfig(WeightScheme("block", block), acts))
    gate_up = torch.randn(e, 2 * inter, h, generator=g) / h ** 0.5
    down = torch.randn(e, h, inter, generator=g) / inter ** 0.5
    (qg, sg), (qu, su) = fp8.quantize(gate_up[:, :inter], block), fp8.quantize(gate_up[:, inter:], block)
    mod.gate_up_proj.data, mod.gate_up_proj_scale.data = torch.cat([qg, qu], 1), torch.cat([sg, su], 1)
    mod.down_proj.data, mod.down_proj_scale.data = fp8.quantize(down, block)
    return mod.to(DEVICE)


def _routing(t: int, e: int, k: int, h: int, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(device=DEVICE, dtype=dtype)
    w, ids = torch.topk(torch.rand(t, e, generator=g), k)
    return x, (w / w.sum(-1, keepdim=True)).to(DEVICE), ids.to(DEVICE)


def _fused(ft, mod, x, w, ids, group=None, bits=None):
    return ft.fused_moe_fp8(x, w, ids, mod.gate_up_proj, mod.gate_up_proj_scale, mod.gate_block, mod.down_proj,
                            mod.down_proj_scale, mod.down_block, act_group=group, bits=bits)


def _max_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert y.shape == ref.shape and y.dtype == ref.dtype and torch.isfinite(y).all()
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 5, 130])
@pytest.mark.parametrize("block", [(128, 128), (100, 50)])
def test_fused_moe_fp8_matches_the_module(ft, reference_kernels, dtype, t, block):
    """Against `Fp8Experts.forward`: 8 experts, top-2, H 160, I 192 (partial blocks both ways in both weights; the
    up half's scales start after the gate half's partial block row). Tolerance: the project's MoE one (`TOL`); the
    module rounds gate, up, silu and their product to x's dtype where the kernel rounds the intermediate once."""
    mod = _experts(8, H, I, block)
    x, w, ids = _routing(t, 8, 2, H, dtype)
    with torch.no_grad():
        assert _max_rel(_fused(ft, mod, x, w, ids), mod(x, w, ids)) <= TOL[dtype]


@needs_triton
def test_fused_moe_fp8_reading_fp8_as_bytes(ft):
    mod = _experts(8, H, I, (128, 128))
    x, w, ids = _routing(5, 8, 2, H, torch.bfloat16)
    assert torch.equal(_fused(ft, mod, x, w, ids, bits=True), _fused(ft, mod, x, w, ids, bits=False))


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("t", [1, 130])
def test_fused_moe_fp8_with_dynamic_activations(ft, reference_kernels, dtype, tol, t):
    """Group-128 dynamic activations (x and the SwiGLU output fake-quantized, as the module's `_activations_in`).
    Looser: the intermediate's e4m3 rounding turns the one-ulp differences between the kernel's and the module's
    intermediate into whole e4m3 steps (1/16 to 1/8 of the element) wherever a value sits near a rounding
    boundary: a few percent of the elements in bf16 (about 2% of the output's maximum), a handful in fp32."""
    from trinity.quant.scheme import ActivationScheme

    mod = _experts(8, H, I, (128, 128), ActivationScheme("group", True, 128))
    x, w, ids = _routing(t, 8, 2, H, dtype)
    with torch.no_grad():
        assert _max_rel(_fused(ft, mod, x, w, ids, group=128), mod(x, w, ids)) <= tol


@needs_triton_module
def test_fused_moe_fp8_declines_what_it_cannot_take(ft):
    mod = _experts(4, H, I, (128, 128))
    x, w, ids = _routing(3, 4, 2, H, torch.bfloat16)
    args = (mod.gate_up_proj, mod.gate_up_proj_scale, mod.gate_block, mod.down_proj, mod.down_proj_scale,
            mod.down_block)
    assert ft.fused_moe_fp8(x[:, :-1], w, ids, *args) is None
    assert ft.fused_moe_fp8(x.double(), w, ids, *args) is None
    assert ft.fused_moe_fp8(x, w, ids, mod.gate_up_proj.float(), *args[1:]) is None
    assert ft.fused_moe_fp8(x, w, ids, args[0], args[1][:, :-1], *args[2:]) is None


# ============================================================================== sm_90 compile check (opt-in)
def _gemm_args(dtype: str, a8: bool, bits: bool, split: bool, cfg, scale_2d: bool = False) -> dict:
    p = "*" + dtype
    return {"x_ptr": "*fp8e4nv" if a8 else p, "xs_ptr": "*fp32", "w_ptr": "*u8" if bits else "*fp8e4nv",
            "s_ptr": "*fp32", "out_ptr": "*fp32" if split else p,
            **{n: "i32" for n in ["M", "N", "bn", "bk", "group"]},
            **{n: "i32:16" for n in ["K", "k_per_split", "stride_xm", "stride_xsm", "stride_wn", "stride_sn",
                                     "stride_os", "stride_om"]},
            "stride_sk": "one",
            "BLOCK_M": ("c", cfg.block_m), "BLOCK_N": ("c", cfg.block_n), "BLOCK_K": ("c", cfg.block_k),
            "A8": ("c", a8), "SCALE_2D": ("c", scale_2d), "BITS": ("c", bits), "UPCAST": ("c", False),
            "PRECISION": ("c", "ieee" if dtype == "fp32" else "tf32"), "FIX_BF16": ("c", False),
            "SPLIT": ("c", split)}


TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@needs_compile_check
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("m", [1, 130])  # the configs: decode (M <= 16), prefill
def test_gemm_kernel_compiles_for_sm90(ft, dtype, m):
    """Every config the launch picks (decode with its fp32 split partials, prefill), both weight loads, the w8a8
    mode (fp8 operands: a tensor-core dot, wgmma at prefill), and the gathered-scale variant: no spills, within
    shared memory."""
    for a8 in (False, True):
        cfg = ft.gemm_config(m, a8, TORCH[dtype])
        for bits in (False,) if a8 else (False, True):
            for scale_2d in (False,) if a8 else (False, True):
                if scale_2d:  # as `_linear` launches it
                    cfg = replace(cfg, block_k=min(cfg.block_k, 64))
                use = compile_sm90(ft._fp8_gemm_kernel, _gemm_args(dtype, a8, bits, m <= 16, cfg, scale_2d),
                                   cfg.num_warps, cfg.num_stages)
                assert spill_free(use) and use["shared"] <= H100_SMEM, (a8, bits, scale_2d, cfg, use)
                if m > 16 and dtype != "fp32":
                    assert use["wgmma"] > 0, (a8, cfg, use)


@needs_compile_check
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_quantize_acts_kernel_compiles_for_sm90(ft, dtype):
    for group, k in [(128, 4096), (0, 4096), (0, 8192)]:
        g = ft._group_width(group, k)
        block_g = max(16, 1 << (g - 1).bit_length())
        block_r = max(1, min(16, 4096 // block_g))
        for fake in (False, True):
            use = compile_sm90(ft._quantize_acts_kernel, {
                "x_ptr": "*" + dtype, "q_ptr": "*" + dtype if fake else "*fp8e4nv", "s_ptr": "*fp32", "M": "i32",
                **{n: "i32:16" for n in ["K", "stride_xm", "stride_qm", "stride_sm"]},
                "GROUP": ("c", g), "BLOCK_R": ("c", block_r), "BLOCK_G": ("c", block_g), "FAKE": ("c", fake),
                "FIX_BF16": ("c", False)}, num_warps=4)
            assert use["stack"] == 0, (group, k, fake, use)


@needs_compile_check
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_fp8_moe_kernels_compile_for_sm90(ft, dtype):
    """The expert GEMMs at every `moe_triton` table config (and the defaults, and a prefill one) with the K tiles
    `fused_moe_fp8` picks for 128 x 128 blocks, both weight loads: no spills, within shared memory."""
    from trinity.kernels import moe_triton as mt

    p = "*" + dtype
    configs = {c for table in mt.CONFIGS.values() for c in table.values()}
    configs |= {mt.MoEConfig(), mt.get_config(4096, 2048, 1024, 128, 8)}
    common = {"UPCAST": ("c", False), "PRECISION": ("c", "ieee" if dtype == "fp32" else "tf32"),
              "FIX_BF16": ("c", False), "stride_sk": "one", "bn": "i32", "bk": "i32"}
    for cfg in sorted(configs, key=repr):
        cfg = ft.moe_config(cfg, TORCH[dtype])
        for bits in (False, True):
            w = "*u8" if bits else "*fp8e4nv"
            up_k, up_2d = ft._moe_k_tile(cfg.up_k, 2048, 128)
            use = compile_sm90(ft._fp8_gate_up_swiglu_kernel, {
                "x_ptr": p, "w_ptr": w, "s_ptr": "*fp32", "act_ptr": p, "slots_ptr": "*i32", "block_expert_ptr": "*i32",
                "num_slots": "i32", "top_k": "i32", "up_rows": "i32",
                **{n: "i32:16" for n in ["N", "K", "num_experts", "stride_xt", "stride_we", "stride_wn", "stride_se",
                                         "stride_sn", "stride_as"]},
                "BLOCK_M": ("c", cfg.block_m), "BLOCK_N": ("c", cfg.up_n), "BLOCK_K": ("c", up_k),
                "SCALE_2D": ("c", up_2d), "BITS": ("c", bits), **common},
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            assert spill_free(use) and use["shared"] <= H100_SMEM, ("gate_up", bits, cfg, use)
            down_k, down_2d = ft._moe_k_tile(cfg.down_k, 1024, 128)
            use = compile_sm90(ft._fp8_down_kernel, {
                "act_ptr": p, "w_ptr": w, "s_ptr": "*fp32", "rw_ptr": "*fp32", "y_ptr": "*fp32", "slots_ptr": "*i32",
                "block_expert_ptr": "*i32", "num_slots": "i32",
                **{n: "i32:16" for n in ["N", "K", "num_experts", "stride_as", "stride_we", "stride_wn", "stride_se",
                                         "stride_sn", "stride_ys"]},
                "BLOCK_M": ("c", cfg.block_m), "BLOCK_N": ("c", cfg.down_n), "BLOCK_K": ("c", down_k),
                "SCALE_2D": ("c", down_2d), "BITS": ("c", bits), **common},
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            assert spill_free(use) and use["shared"] <= H100_SMEM, ("down", bits, cfg, use)


# ============================================================================== the GPU benchmark
@pytest.mark.script_smoke
@pytest.mark.slow  # about 20 s of interpreter
@needs_triton_module
def test_fp8_benchmark_smoke():
    """benchmarks/fp8_gpu.py (the kernels against what they replace, on a GPU) runs end to end in its CPU smoke mode,
    every variant timed and checked, and ends with its JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "fp8_gpu.py"
    done = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows = result["results"]
    assert [r["rows"] for r in rows] == [1, 130, 1, 20]
    assert all(r["w8a16_us"] > 0 and r["w8a8_us"] > 0 and r["w8a8_err"] < 1e-2 for r in rows[:2])
    assert all(r["fp8_fused_us"] > 0 and r["fp8_fused_err"] < 1e-2 for r in rows[2:])
