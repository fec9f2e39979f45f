"""The fused projection + sandwich-norm step (`kernels.linear_norm`, `kernels.linear_triton`) against its reference.

Runs the Triton kernel on a GPU, and on the CPU under TRITON_INTERPRET=1 (`make test`'s interpreter step)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from trinity import kernels
from trinity.kernels import linear_norm
from trinity.kernels.norm import norm_add_rms_norm_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET),
                                  reason="Triton needs a GPU or TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture
def triton_kernels(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRINITY_KERNELS", "triton")
    from trinity.kernels import linear_triton
    return linear_triton


def reference(x, w, res, post, nxt, eps):
    """Pure torch: the projection rounded to the dtype, then the norm step."""
    return norm_add_rms_norm_reference(F.linear(x.float(), w.float()).to(x.dtype), res, post, nxt, eps)


def case(m: int, n: int, k: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    res = torch.randn(m, n, generator=g).to(dtype)
    post, nxt = 1 + 0.1 * torch.randn(n, generator=g), 1 + 0.1 * torch.randn(n, generator=g)
    return [t.to(DEVICE) for t in (x, w, res, post, nxt)]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 96, 200), (3, 64, 512), (16, 40, 136), (5, 256, 64)])
def test_fused_equals_projection_then_norm(triton_kernels, dtype, m, n, k):
    """Split K or not, ragged N and K, one row to a full tile: the three outputs match the two separate ops."""
    from trinity.kernels.last_program import arrival_counters
    x, w, res, post, nxt = case(m, n, k, dtype, seed=m + n + k)
    normed, new_res, normed32 = triton_kernels.linear_norm_add_rms_norm(x, w, res, post, nxt, 1e-5, fp32_copy=True)
    want_normed, want_res = reference(x, w, res, post, nxt, 1e-5)
    assert normed.dtype == dtype and new_res.dtype == dtype and normed32.dtype == torch.float32
    assert rel_err(new_res, want_res) < TOL[dtype]
    assert rel_err(normed, want_normed) < TOL[dtype]
    assert torch.equal(normed32, normed.float())
    assert arrival_counters(x.device, 1).abs().sum() == 0  # the last program reset its counter


@needs_triton
def test_fused_output_is_deterministic(triton_kernels):
    """Each row's splits are added in order by whichever program arrives last: repeated runs agree exactly."""
    x, w, res, post, nxt = case(2, 64, 1024, torch.bfloat16, seed=4)
    first = triton_kernels.linear_norm_add_rms_norm(x, w, res, post, nxt, 1e-5)
    again = triton_kernels.linear_norm_add_rms_norm(x, w, res, post, nxt, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@needs_triton
def test_dispatch_takes_the_kernel_only_for_few_rows(triton_kernels):
    """Rows past MAX_ROWS (a prefill, a big decode batch) go through the two separate ops."""
    for m in (triton_kernels.MAX_ROWS, triton_kernels.MAX_ROWS + 1):
        x, w, res, post, nxt = case(m, 48, 64, torch.float32, seed=m)
        assert triton_kernels.usable(x, w) == (m <= triton_kernels.MAX_ROWS)
        got = linear_norm.linear_norm_add_rms_norm(x, w, res, post, nxt, 1e-5)
        want = reference(x, w, res, post, nxt, 1e-5)
        assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, want))


def test_reference_path_is_the_two_ops():
    """Without Triton (the CPU default) the op is exactly linear then norm_add_rms_norm, bit for bit."""
    kernels.use_reference(None)
    x, w, res, post, nxt = [t.cpu() for t in case(3, 32, 48, torch.float32)]
    from trinity.kernels.linear import linear
    from trinity.kernels.norm import norm_add_rms_norm
    got = linear_norm.linear_norm_add_rms_norm_reference(x, w, res, post, nxt, 1e-5, fp32_copy=True)
    want = norm_add_rms_norm(linear(x, w), res, post, nxt, 1e-5, fp32_copy=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.skipif(INTERPRET or os.environ.get("TRINITY_COMPILE_CHECK") != "1",
                    reason="set TRINITY_COMPILE_CHECK=1 (without TRITON_INTERPRET) to compile the kernels for sm_90")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernel_compiles_for_sm90_without_spills(dtype):
    """At the launch settings `linear_norm_add_rms_norm` picks, for rows of 1024 to 3072 (Nano to Large)."""
    from test_kernels_norm import compile_sm90

    import triton

    from trinity.kernels import linear_triton as lt
    for n in (1024, 2048, 3072):
        args = {name: "i32" for name in lt._linear_norm_kernel.arg_names}
        args.update({name: f"*{dtype}" for name in ("x_ptr", "w_ptr", "res_ptr", "out_ptr", "res_out_ptr")})
        args.update({"ws_ptr": "*fp32", "post_w_ptr": "*fp32", "next_w_ptr": "*fp32", "out32_ptr": "*fp32",
                     "counter_ptr": "*i32", "eps": "fp32"})
        constants = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128 if dtype == "bf16" else 64,
                         BLOCK_ROW=triton.next_power_of_2(n), UPCAST=False,
                         PRECISION="ieee" if dtype == "fp32" else "tf32", FIX_BF16=False, FP32_OUT=True,
                         SPLITS=8, PDL=False)  # the most splits the launch picks
        args.update({k: ("c", v) for k, v in constants.items()})
        use = compile_sm90(lt._linear_norm_kernel, args, num_warps=4 if n <= 2048 else 8)
        assert use["stack"] == 0, (n, use)
