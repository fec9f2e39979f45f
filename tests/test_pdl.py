"""Programmatic dependent launch for the decode chain (`kernels/pdl.py`).

What can be checked without a GPU: the switch (off by default, never on the CPU), and the sm_90 PTX of every
PDL-aware kernel: with PDL the grid-dependency wait comes before every global memory access and the release after
it, and without PDL neither is emitted. On a GPU: the engine's greedy tokens and log-probabilities under CUDA
graphs are the same with PDL as without (a kernel reading its predecessor's output too early would change them).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from trinity.kernels import interpreting, pdl

INTERPRET = interpreting()
needs_compile_check = pytest.mark.skipif(
    INTERPRET or os.environ.get("TRINITY_COMPILE_CHECK") != "1",
    reason="set TRINITY_COMPILE_CHECK=1 (without TRITON_INTERPRET) to compile the kernels for sm_90")


@pytest.fixture
def pdl_setting():
    yield pdl
    pdl.enable(None)


def test_off_by_default_and_never_on_the_cpu(monkeypatch, pdl_setting):
    monkeypatch.delenv("TRINITY_PDL", raising=False)
    assert not pdl.requested()
    monkeypatch.setenv("TRINITY_PDL", "1")
    assert pdl.requested()
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    pdl.enable(False)  # the explicit setting wins over the variable
    assert not pdl.requested()
    pdl.enable(True)
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}


def decode_chain(pdl: bool) -> dict:
    """kernel name -> (kernel, argument types, constexprs) for the five kernels of a batch-1 decode layer, at Mini's
    shapes (as the launches give them)."""
    from trinity.kernels import attention_triton, linear_triton, moe_triton

    scalars = {"qk_scale": "fp32", "norm_eps": "fp32", "eps": "fp32", "route_scale": "fp32", "counter_ptr": "*i32"}
    chain = {
        attention_triton._decode_kernel: (
            {**scalars, "slots_ptr": "*i32", "lens_ptr": "*i32", "new_slots_ptr": "*i32", "lo_ptr": "*i32",
             "rows_ptr": "*i32"},
            dict(GROUP=8, HEAD_DIM=128, BLOCK_H=16, BLOCK_D=128, BLOCK_N=32, SPLIT=True, DOT_PRECISION="ieee",
                 UPCAST=False, HAS_GATE=True, FIX_BF16=False, HAS_NEW=False, TABLE=False, BLOCK_SIZE=1, ROWS=False,
                 QK_NORM=False, ROPE=False, MERGE_LAST=True, BLOCK_S=8)),
        linear_triton._linear_norm_kernel: (
            scalars,
            dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, BLOCK_ROW=1024, SPLITS=4, UPCAST=False, PRECISION="ieee",
                 FIX_BF16=False, FP32_OUT=False)),
        moe_triton._router_route_align_kernel: (
            {**scalars, "ids_ptr": "*i64", "counts_ptr": "*i64", "count_mask_ptr": "*i64", "slots_ptr": "*i32",
             "block_expert_ptr": "*i32", "cursor_ptr": "*i32"},
            dict(BLOCK_GT=16, BLOCK_GE=16, BLOCK_GK=64, SPLITS=8, UPCAST=False, PRECISION="ieee", BLOCK_T=1,
                 BLOCK_E=128, BLOCK_K=16, NORM=True, SHARED=1, COUNT=False, MASKED=False, BLOCK_M=16, BLOCK_S=16,
                 BLOCK_AE=256, BLOCK_B=32, BLOCK_P=1024)),
        moe_triton._gate_up_swiglu_kernel: (
            {"slots_ptr": "*i32", "block_expert_ptr": "*i32"},
            dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, UPCAST=False, DOT_PREC="ieee", FIX_BF16=False)),
        moe_triton._down_kernel: (
            {**scalars, "slots_ptr": "*i32", "block_expert_ptr": "*i32"},
            dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, UPCAST=False, DOT_PREC="ieee", NORM=True, TOP_K=9,
                 BLOCK_ROW=1024, FIX_BF16=False)),
    }
    return {k.__name__: (k, types, {**constants, "PDL": pdl}) for k, (types, constants) in chain.items()}


MEMORY_ACCESS = re.compile(r"^(@!?%p\d+\s+)?(ld\.global|st\.global|atom\.global|red\.global|cp\.async)")


@needs_compile_check
@pytest.mark.parametrize("kernel_name", ["_decode_kernel", "_linear_norm_kernel", "_router_route_align_kernel",
                                         "_gate_up_swiglu_kernel", "_down_kernel"])
def test_wait_comes_before_every_memory_access(kernel_name):
    from test_kernels_norm import ptx_instructions, ptx_sm90

    kernel, types, constants = decode_chain(pdl=True)[kernel_name]
    lines = ptx_instructions(ptx_sm90(kernel, types, constants))
    waits = [i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait")]
    releases = [i for i, line in enumerate(lines) if line.startswith("griddepcontrol.launch_dependents")]
    accesses = [i for i, line in enumerate(lines) if MEMORY_ACCESS.match(line)]
    assert len(waits) == 1 and len(releases) == 1, (waits, releases)
    assert accesses and waits[0] < releases[0] < accesses[0], (lines[:accesses[0] + 1] if accesses else lines)
    # no branch before the wait either: every program reaches it (an early return may not skip it)
    assert not any(re.match(r"^(@!?%p\d+\s+)?(bra|ret|exit)\b", line) for line in lines[:waits[0]])
    kernel, types, constants = decode_chain(pdl=False)[kernel_name]
    assert "griddepcontrol" not in ptx_sm90(kernel, types, constants)


gpu_only = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device")


@pytest.mark.gpu
@gpu_only
def test_graph_decode_with_pdl_equals_without(pdl_setting):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0")
    from test_gpu_engine import _model, _run

    from engine_helpers import random_prompts

    model = _model(torch.bfloat16)
    prompts = random_prompts([7, 40, 3], seed=5)
    results = {}
    for on in (False, True):
        pdl.enable(on)
        for batch in ([prompts[0]], prompts):  # batch 1 (the fused epilogues) and a padded bucket
            outs, engine = _run(model, batch, 48, enforce_eager=False, logprobs=1)
            assert engine.runner.graphs is not None and engine.runner.graphs.replays >= 40
            results[on, len(batch)] = [(o.token_ids, [pos[t].logprob for pos, t in zip(o.logprobs, o.token_ids)])
                                       for o in outs]
    assert results[True, 1] == results[False, 1]
    assert results[True, 3] == results[False, 3]
