"""The W4A16 Triton kernels (`kernels.int4_triton`) against their pure-torch references: the GEMM against
`linear_int4_reference`, the fused MoE against `experts_int4_reference`. Run under TRITON_INTERPRET=1 on the CPU (or
on a CUDA device):

    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_int4_triton.py

and the sm_90 compile checks (registers, spills, shared memory) with TRINITY_COMPILE_CHECK=1, no interpreter.

The kernels dequantize each weight exactly as the reference does ((code - zero) * scale in fp32, one rounding to x's
dtype), so the GEMM differs from the reference only in the order of its fp32 sums and its one final rounding:
test_kernels_fp8_triton's elementwise bound. Shapes are small (the interpreter is slow) with partial edge tiles and a
partial last group: N = 96, K = 200 (groups of 64: three and an eighth), and an odd K (199) whose last byte has an
empty high nibble.
"""

from __future__ import annotations

import pytest
import torch

from trinity import kernels
from trinity.kernels.int4 import experts_int4_reference, linear_int4_reference
from trinity.quant import int4
from test_kernels_fp8_triton import assert_within
from test_kernels_norm import DEVICE, HAS_TRITON, TOL, compile_sm90, needs_compile_check, needs_triton, spill_free

needs_triton_module = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

N, K = 96, 200
H, I = 160, 96  # the experts' hidden and intermediate sizes
H100_SMEM = 227 * 1024
# (K, group, symmetric, act order): groups of 32 / 64 / 128 (one tile per group), per channel (odd K), a group no
# power-of-two tile divides (per-element scales), act order (g_idx)
SCHEMES = [(K, 32, True, False), (K, 64, False, False), (K, 128, True, False), (199, None, False, False),
           (K, 50, True, False), (K, 64, False, True)]


@pytest.fixture
def it():
    from trinity.kernels import int4_triton
    return int4_triton


@pytest.fixture
def reference_kernels():
    kernels.use_reference(True)
    yield
    kernels.use_reference(None)


def _quantize(w: torch.Tensor, group: int | None, symmetric: bool, act_order: bool, seed: int = 0) -> int4.Int4Weight:
    """w [out, in] quantized; act order: the columns' groups a random permutation of the contiguous ones."""
    g_idx = None
    if act_order:
        gen = torch.Generator().manual_seed(seed)
        g_idx = torch.randperm(w.shape[1], generator=gen) // group
    return int4.quantize(w, group, symmetric, g_idx)


def _to(w: int4.Int4Weight, device) -> int4.Int4Weight:
    return w._replace(**{f: getattr(w, f).to(device) for f in ("codes", "scale", "zero_point", "g_idx")
                         if getattr(w, f) is not None})


def _weight(n: int, k: int, group, symmetric: bool, act_order: bool, seed: int = 0) -> int4.Int4Weight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[: min(n, 3), : min(k, 40)] *= 30  # groups of different magnitudes: the scales matter
    return _to(_quantize(w, group, symmetric, act_order, seed), DEVICE)


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, :64] *= 8
    return x.to(device=DEVICE, dtype=dtype)


# ============================================================================== GEMM
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"k{s[0]}-g{s[1]}-{'sym' if s[2] else 'asym'}"
                         + ("-act" if s[3] else ""))
def test_w4a16_gemm_matches_reference(it, dtype, m, scheme):
    k, group, symmetric, act_order = scheme
    w = _weight(N, k, group, symmetric, act_order)
    x = _x(m, k, dtype)
    y = it.linear_int4_gpu(x, w)
    ref = linear_int4_reference(x, w)
    assert_within(y, ref, x.float(), int4.dequantize(w, dtype).float())


@needs_triton
def test_w4a16_gemm_config_variants(it):
    """Larger tiles than the problem, more K splits than tiles, and a g_idx with two row blocks (an expert's
    gate_up: each tile within one block)."""
    x = _x(3, K, torch.bfloat16)
    w = _weight(N, K, 64, False, False)
    ref = linear_int4_reference(x, w)
    for cfg in (it.GemmConfig(16, 128, 128), it.GemmConfig(16, 16, 32), it.GemmConfig(64, 64, 64)):
        assert_within(it.linear_int4_gpu(x, w, cfg), ref, x.float(), int4.dequantize(w, x.dtype).float())
    halves = [_quantize(torch.randn(48, K) * 0.05, 64, True, True, seed) for seed in (0, 1)]
    two = _to(halves[0]._replace(codes=torch.cat([h.codes for h in halves]), scale=torch.cat([h.scale for h in halves]),
                                 g_idx=torch.cat([h.g_idx for h in halves])), DEVICE)
    assert two.g_idx.shape == (2, K)
    assert_within(it.linear_int4_gpu(x, two), linear_int4_reference(x, two), x.float(),
                  int4.dequantize(two, x.dtype).float())


@needs_triton
def test_linear_keeps_leading_dims_and_reads_strided_rows(it):
    w = _weight(N, K, 64, True, False)
    x = _x(6, 2 * K, torch.bfloat16)[:, :K].reshape(2, 3, K)  # rows 2K apart
    y = it.linear_int4_gpu(x, w)
    assert y.shape == (2, 3, N)
    assert torch.equal(y, it.linear_int4_gpu(x.contiguous(), w))
    assert it.linear_int4_gpu(x[:0], w).shape == (0, 3, N)


@needs_triton
def test_linear_int4_dispatches_to_the_kernel(it, monkeypatch):
    """`kernels.int4.linear_int4` and `Int4Linear` take the kernel where `use_triton` says so."""
    from trinity.kernels import int4 as int4_kernels

    monkeypatch.setattr(int4_kernels, "use_triton", lambda *t: True)
    calls = []
    gemm = it.linear_int4_gpu
    monkeypatch.setattr(it, "linear_int4_gpu", lambda *a, **kw: calls.append(1) or gemm(*a, **kw))
    w = _weight(N, K, 64, False, False)
    x = _x(2, K, torch.float32)
    assert torch.equal(int4_kernels.linear_int4(x, w), gemm(x, w)) and calls == [1]


@needs_triton_module
def test_linear_declines_what_it_cannot_take(it):
    from test_kernels_norm import INTERPRET

    w = _weight(N, K, 64, False, False)
    x = _x(2, K, torch.bfloat16)
    assert it.linear_int4_gpu(x.to(torch.float64), w) is None
    assert it.linear_int4_gpu(x[:, :-1], w) is None
    assert it.linear_int4_gpu(x, w._replace(codes=w.codes.float())) is None
    assert it.linear_int4_gpu(x, w._replace(scale=w.scale[:, :1])) is None
    assert it.linear_int4_gpu(x, w._replace(zero_point=w.zero_point[:, :1])) is None
    assert it.linear_int4_gpu(x, w._replace(codes=w.codes.t().contiguous().t())) is None  # bytes not unit stride
    odd = _weight(50, K, 64, True, True)._replace(g_idx=torch.zeros(2, K, dtype=torch.int32, device=DEVICE))
    assert it.linear_int4_gpu(x, odd) is None  # row blocks of 25: no 16-row tile lies within one
    if not INTERPRET:  # CPU tensors go to the references
        assert it.linear_int4_gpu(x.cpu(), _to(w, "cpu")) is None


# ============================================================================== fused MoE
def _experts(e: int, h: int, inter: int, group, symmetric: bool, act_order: bool, seed: int = 0):
    """An `Int4Experts` module: each expert's gate and up quantized as separate matrices (each its own g_idx)."""
    from trinity.quant.int4_modules import Int4Experts
    from trinity.quant.int4_scheme import Int4Scheme

    g = torch.Generator().manual_seed(seed)
    mod = Int4Experts(e, h, inter, Int4Scheme("gptq", group, symmetric, act_order))
    gate_up = torch.randn(e, 2 * inter, h, generator=g) / h ** 0.5
    down = torch.randn(e, h, inter, generator=g) / inter ** 0.5
    parts = {"gate_up_proj": [], "down_proj": []}
    for i in range(e):
        halves = [_quantize(gate_up[i, j * inter:(j + 1) * inter], group, symmetric, act_order, seed + 2 * i + j)
                  for j in (0, 1)]
        fields = [None if halves[0][f] is None else torch.cat([hh[f] for hh in halves]) for f in range(4)]
        parts["gate_up_proj"].append(int4.Int4Weight(*fields, halves[0].group, h))
        parts["down_proj"].append(_quantize(down[i], group, symmetric, act_order, seed + 100 + i))
    for base, ws in parts.items():
        for suffix, f in (("", 0), ("_scale", 1), ("_zero_point", 2), ("_g_idx", 3)):
            if ws[0][f] is not None:
                getattr(mod, base + suffix).data = torch.stack([w[f] for w in ws])
    return mod.to(DEVICE)


def _routing(t: int, e: int, k: int, h: int, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(device=DEVICE, dtype=dtype)
    w, ids = torch.topk(torch.rand(t, e, generator=g), k)
    return x, (w / w.sum(-1, keepdim=True)).to(DEVICE), ids.to(DEVICE)


def _max_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert y.shape == ref.shape and y.dtype == ref.dtype and torch.isfinite(y).all()
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 5, 40])
@pytest.mark.parametrize("scheme", [(64, True, False), (32, False, False), (None, False, False), (32, False, True)],
                         ids=["g64-sym", "g32-asym", "channel-asym", "g32-asym-act"])
def test_fused_moe_int4_matches_the_reference(it, reference_kernels, dtype, t, scheme):
    """Against `experts_int4_reference`: 8 experts, top-2, H 160 (groups of 64: two and a half), I 96. Tolerance:
    the project's MoE one (`TOL`); the reference rounds gate, up, silu and their product to x's dtype where the kernel
    rounds the intermediate once."""
    mod = _experts(8, H, I, *scheme)
    x, w, ids = _routing(t, 8, 2, H, dtype)
    gate_up, down = mod.packed()
    with torch.no_grad():
        y = it.fused_moe_int4(x, w, ids, gate_up, down)
        assert _max_rel(y, experts_int4_reference(x, w, ids, gate_up, down)) <= TOL[dtype]


@needs_triton
def test_int4_experts_forward_takes_the_fused_kernel(it, monkeypatch):
    """`Int4Experts.forward` runs `fused_moe_int4` where `use_triton` says so, the reference loop elsewhere."""
    from trinity.quant import int4_modules

    mod = _experts(4, H, I, 64, False, False)
    x, w, ids = _routing(3, 4, 2, H, torch.float32)
    with torch.no_grad():
        monkeypatch.setattr(int4_modules, "use_triton", lambda *t: False, raising=False)
        ref = mod(x, w, ids)
        calls = []
        fused = it.fused_moe_int4
        monkeypatch.setattr(int4_modules, "use_triton", lambda *t: True, raising=False)
        monkeypatch.setattr(it, "fused_moe_int4", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
        y = mod(x, w, ids)
    assert calls == [1] and _max_rel(y, ref) <= TOL[torch.float32]


@needs_triton_module
def test_fused_moe_int4_declines_what_it_cannot_take(it):
    mod = _experts(4, H, I, 64, False, True)
    x, w, ids = _routing(3, 4, 2, H, torch.bfloat16)
    gate_up, down = mod.packed()
    assert it.fused_moe_int4(x[:, :-1], w, ids, gate_up, down) is None
    assert it.fused_moe_int4(x.double(), w, ids, gate_up, down) is None
    assert it.fused_moe_int4(x, w, ids, gate_up._replace(codes=gate_up.codes.float()), down) is None
    assert it.fused_moe_int4(x, w, ids, gate_up._replace(scale=gate_up.scale[..., :1]), down) is None
    assert it.fused_moe_int4(x, w, ids, gate_up, down._replace(g_idx=None)) is None  # one scheme for both
    assert it.fused_moe_int4(x, w, ids, gate_up, down._replace(zero_point=None)) is None


# ============================================================================== sm_90 compile check (opt-in)
TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = [(0, False), (0, True), (1, True), (2, True)]  # (MODE, HAS_ZERO): one group per tile sym/asym, gathered


@needs_compile_check
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("m", [1, 130])  # the configs: decode (M <= 16, fp32 split partials), prefill
def test_w4a16_gemm_compiles_for_sm90(it, dtype, m):
    """Every config the launch picks, every scale mode (gathered ones with their K tile): no spills, within shared
    memory; prefill in 16-bit dtypes on wgmma."""
    base = it.gemm_config(m, TORCH[dtype])
    p = "*" + dtype
    for mode, zero in MODES:
        block_k = base.block_k if mode == 0 else it._gathered_k(base.block_k, 4096)
        use = compile_sm90(it._w4a16_gemm_kernel, {
            "x_ptr": p, "c_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*u8" if zero else "*fp32",
            "gi_ptr": "*i32" if mode == 2 else "*fp32", "out_ptr": "*fp32" if m <= 16 else p,
            **{n: "i32" for n in ["M", "N", "group", "rows_per_block"]},
            **{n: "i32:16" for n in ["K", "k_per_split", "stride_xm", "stride_cn", "stride_sn", "stride_gp",
                                     "stride_os", "stride_om"]},
            "stride_sk": "one",
            "BLOCK_M": ("c", base.block_m), "BLOCK_N": ("c", base.block_n), "BLOCK_K": ("c", block_k),
            "MODE": ("c", mode), "HAS_ZERO": ("c", zero), "UPCAST": ("c", False),
            "PRECISION": ("c", "ieee" if dtype == "fp32" else "tf32"), "FIX_BF16": ("c", False),
            "SPLIT": ("c", m <= 16)}, base.num_warps, base.num_stages)
        assert spill_free(use) and use["shared"] <= H100_SMEM, (mode, zero, base, use)
        if m > 16 and dtype != "fp32":
            assert use["wgmma"] > 0, (mode, base, use)


@needs_compile_check
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_int4_moe_kernels_compile_for_sm90(it, dtype):
    """The expert GEMMs at every `moe_triton` table config (and the defaults, and a prefill one) with the K tiles
    `fused_moe_int4` picks for Mini's shapes (H 2048, I 1024) in groups of 128, and the gathered modes: no spills,
    within shared memory."""
    from trinity.kernels import moe_triton as mt

    p = "*" + dtype
    configs = {c for table in mt.CONFIGS.values() for c in table.values()}
    configs |= {mt.MoEConfig(), mt.get_config(4096, 2048, 1024, 128, 8)}
    common = {"UPCAST": ("c", False), "PRECISION": ("c", "ieee" if dtype == "fp32" else "tf32"),
              "FIX_BF16": ("c", False), "stride_sk": "one", "group": "i32"}
    for cfg in sorted(configs, key=repr):
        cfg = it.moe_config(cfg, TORCH[dtype])
        for mode, zero in MODES:
            w = int4.Int4Weight(torch.empty(0), torch.empty(0), None, torch.empty(0) if mode == 2 else None,
                                128 if mode == 0 else 50, 0)
            ptrs = {"c_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*u8" if zero else "*fp32",
                    "gi_ptr": "*i32" if mode == 2 else "*fp32"}
            up_k, up_mode = it.moe_k_tile(cfg.up_k, 2048, w, TORCH[dtype])
            assert up_mode == mode
            use = compile_sm90(it._int4_gate_up_swiglu_kernel, {
                "x_ptr": p, **ptrs, "act_ptr": p, "slots_ptr": "*i32", "block_expert_ptr": "*i32",
                "num_slots": "i32", "top_k": "i32", "up_gi": "i32",
                **{n: "i32:16" for n in ["N", "K", "num_experts", "stride_xt", "stride_ce", "stride_cn", "stride_se",
                                         "stride_sn", "stride_ge", "stride_as"]},
                "BLOCK_M": ("c", cfg.block_m), "BLOCK_N": ("c", cfg.up_n), "BLOCK_K": ("c", up_k),
                "MODE": ("c", mode), "HAS_ZERO": ("c", zero), **common},
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            assert spill_free(use) and use["shared"] <= H100_SMEM, ("gate_up", mode, zero, cfg, use)
            down_k, _ = it.moe_k_tile(cfg.down_k, 1024, w, TORCH[dtype])
            use = compile_sm90(it._int4_down_kernel, {
                "act_ptr": p, **ptrs, "rw_ptr": "*fp32", "y_ptr": "*fp32", "slots_ptr": "*i32",
                "block_expert_ptr": "*i32", "num_slots": "i32",
                **{n: "i32:16" for n in ["N", "K", "num_experts", "stride_as", "stride_ce", "stride_cn", "stride_se",
                                         "stride_sn", "stride_ge", "stride_ys"]},
                "BLOCK_M": ("c", cfg.block_m), "BLOCK_N": ("c", cfg.down_n), "BLOCK_K": ("c", down_k),
                "MODE": ("c", mode), "HAS_ZERO": ("c", zero), **common},
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            assert spill_free(use) and use["shared"] <= H100_SMEM, ("down", mode, zero, cfg, use)


# ============================================================================== the GPU benchmark
@pytest.mark.script_smoke
@pytest.mark.slow  # about 20 s of interpreter
@needs_triton_module
def test_w4a16_benchmark_smoke():
    """benchmarks/w4a16_gpu.py (the kernels against what they replace, on a GPU) runs end to end in its CPU smoke
    mode, every variant timed and checked, and ends with its JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "w4a16_gpu.py"
    done = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows = result["results"]
    assert [r["rows"] for r in rows] == [1, 130, 1, 20]
    assert all(r["w4a16_us"] > 0 and r["w4a16_err"] < 1e-2 for r in rows[:2])
    assert all(r["int4_fused_us"] > 0 and r["int4_fused_err"] < 2e-2 for r in rows[2:])
