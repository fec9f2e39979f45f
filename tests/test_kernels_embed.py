"""The start of the forward: the embedding + muP scale + first input norm kernel against its reference (run under
TRITON_INTERPRET=1 on the CPU, or on a CUDA device), the reference against the model's module code (always), and
the precomputed RoPE table against the computed cos/sin (always): the same bits, so the same logits."""

import pytest
import torch

from trinity import TrinityForCausalLM, preset
from trinity.kernels import embed
from trinity.kernels.embed import embed_reference, embed_rms_norm_reference
from trinity.model.layers import Embedding, RMSNorm, RotaryEmbedding

from test_kernels_norm import (DEVICE, HAS_CUDA, INTERPRET, _weight, compile_sm90,  # noqa: F401
                               _module_code_without_native_kernels, needs_compile_check, needs_triton)

MUP_SCALE = 96 ** 0.5  # hidden_size ** 0.5, as TrinityModel sets it


def _ids(t: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (t,), generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _table(vocab: int, h: int, dtype: torch.dtype, device=DEVICE) -> torch.Tensor:
    return (torch.randn(vocab, h, generator=torch.Generator().manual_seed(vocab + h)) * 0.5).to(dtype).to(device)


# ============================================================================== reference == model ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [None, MUP_SCALE])
def test_reference_equals_module_code(dtype, scale):
    emb, norm = Embedding(50, 96), RMSNorm(96, 1e-5)
    with torch.no_grad():
        emb.weight.copy_(_table(50, 96, torch.float32, "cpu"))
        norm.weight.copy_(_weight(96, "cpu"))
        emb = emb.to(dtype)
        ids = torch.randint(0, 50, (9,))
        # TrinityModel.forward: x = embed_tokens(ids); x = x * embed_scale; h = layers[0].input_layernorm(x)
        want_x = emb(ids) if scale is None else emb(ids) * scale
        got_h, got_x = embed_rms_norm_reference(ids, emb.weight, scale, norm.weight, 1e-5)
        assert torch.equal(got_x, want_x) and torch.equal(got_h, norm(want_x))


def test_dispatch_uses_module_ops_on_cpu_by_default(monkeypatch):
    monkeypatch.delenv("TRINITY_KERNELS", raising=False)
    table, w = _table(40, 64, torch.float32, "cpu"), _weight(64, "cpu")
    ids = torch.randint(0, 40, (5,), dtype=torch.int32)
    with torch.no_grad():
        got = embed.embed_rms_norm(ids, table, 8.0, w, 1e-5)
    want = embed_rms_norm_reference(ids, table, 8.0, w, 1e-5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ============================================================================== Triton vs reference
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [None, MUP_SCALE])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("t,h", [(1, 96), (33, 96), (5, 1000)])
def test_triton_embed_rms_norm(dtype, scale, id_dtype, t, h):
    from trinity.kernels import embed_triton, norm_triton
    table, w = _table(300, h, dtype) * 3, _weight(h)
    ids = _ids(t, 300, id_dtype, seed=t)
    got_h, got_x = embed_triton.embed_rms_norm(ids, table, scale, w, 1e-5)
    want_h, want_x = embed_rms_norm_reference(ids, table, scale, w, 1e-5)
    assert got_x.dtype == got_h.dtype == dtype and got_x.shape == got_h.shape == (t, h)
    assert torch.equal(got_x, want_x)  # the gather and the scale round exactly as torch does
    if dtype == torch.float32:
        torch.testing.assert_close(got_h, want_h, atol=1e-5, rtol=1e-5)
    else:  # the norm's fp32 sum may round one bf16 ulp apart from torch's order; the RMSNorm kernel's: identical
        torch.testing.assert_close(got_h.float(), want_h.float(), atol=0, rtol=1e-2)
    assert torch.equal(got_h, norm_triton.rms_norm(want_x, w, 1e-5))


@needs_triton
def test_triton_embed_rms_norm_strided_ids():
    """The decode table hands its token column over as it is: int32 with a row stride."""
    from trinity.kernels import embed_triton
    table, w = _table(100, 64, torch.bfloat16), _weight(64)
    meta = torch.randint(0, 100, (6, 5), dtype=torch.int32, device=DEVICE)
    ids = meta[:, 2]
    got_h, got_x = embed_triton.embed_rms_norm(ids, table, MUP_SCALE, w, 1e-6)
    want_h, want_x = embed_rms_norm_reference(ids.long(), table, MUP_SCALE, w, 1e-6)
    assert torch.equal(got_x, want_x)
    torch.testing.assert_close(got_h.float(), want_h.float(), atol=0, rtol=1e-2)
    assert embed_triton.embed_rms_norm(ids[:0], table, MUP_SCALE, w, 1e-6)[1].shape == (0, 64)


@needs_triton
def test_dispatch_reaches_triton_when_forced(monkeypatch):
    monkeypatch.setenv("TRINITY_KERNELS", "triton")
    from trinity.kernels import embed_triton
    calls = []
    real = embed_triton.embed_rms_norm
    monkeypatch.setattr(embed_triton, "embed_rms_norm", lambda *a: calls.append(1) or real(*a))
    table, w = _table(40, 64, torch.float32), _weight(64)
    with torch.no_grad():
        got_h, got_x = embed.embed_rms_norm(_ids(3, 40, torch.int64), table, None, w, 1e-5)
    assert calls and torch.equal(got_x, embed_reference(_ids(3, 40, torch.int64), table, None))


# ============================================================================== RoPE table
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_rope_table_gathers_the_computed_values(dtype, pos_dtype):
    computed, reserved = RotaryEmbedding(64, 10000.0), RotaryEmbedding(64, 10000.0)
    reserved.reserve(5000, DEVICE, dtype)
    positions = torch.randint(0, 5000, (37,), generator=torch.Generator().manual_seed(1)).to(pos_dtype).to(DEVICE)
    positions[:2] = torch.tensor([0, 4999])  # the table's first and last rows
    want_cos, want_sin = computed.cos_sin(positions, dtype)
    cos, sin = reserved.cos_sin(positions, dtype)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)  # bitwise
    # views of one gathered [T, 2 * head_dim] block: what the q/k norm and decode attention kernels take
    assert cos.shape == sin.shape == (37, 64) and cos.stride() == sin.stride() == (128, 1)
    # another dtype has no table: computed as before
    other = torch.float16
    assert torch.equal(reserved.cos_sin(positions, other)[0], computed.cos_sin(positions, other)[0])


@pytest.mark.parametrize("native", ["0", "1"])
def test_rope_table_feeds_the_qk_norm_paths(monkeypatch, native):
    """The strided cos/sin views through `kernels.norm.qk_norm_rope` (reference, or the C kernel on the CPU; the
    Triton kernel where it runs) give what contiguous tables give."""
    from trinity.kernels import norm
    monkeypatch.setenv("TRINITY_CPU_NATIVE", native)
    rope = RotaryEmbedding(32, 10000.0)
    positions = torch.randint(0, 200, (6,), device=DEVICE)
    want = rope.cos_sin(positions, torch.bfloat16)
    rope.reserve(200, DEVICE, torch.bfloat16)
    cos, sin = rope.cos_sin(positions, torch.bfloat16)
    q, k = torch.randn(6, 4, 32, device=DEVICE).bfloat16(), torch.randn(6, 2, 32, device=DEVICE).bfloat16()
    wq, wk = _weight(32), _weight(32)
    with torch.no_grad():
        got = norm.qk_norm_rope(q, k, wq, wk, 1e-5, cos, sin, True)
        ref = norm.qk_norm_rope(q, k, wq, wk, 1e-5, *want, True)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def _tiny(mup: bool) -> TrinityForCausalLM:
    return TrinityForCausalLM.random(preset("tiny", mup_enabled=mup), seed=3).to(DEVICE).eval()


@pytest.mark.parametrize("mup", [True, False])
@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_model_logits_identical_with_a_reserved_rope_table(monkeypatch, mup, kernels):
    if kernels == "triton" and not (INTERPRET or HAS_CUDA):
        pytest.skip("the Triton path needs a CUDA device or the interpreter")
    monkeypatch.setenv("TRINITY_KERNELS", kernels)
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    plain, reserved = _tiny(mup).fuse_projections(), _tiny(mup).fuse_projections()
    reserved.model.rotary.reserve(64, DEVICE, reserved.dtype)
    with torch.inference_mode():
        assert torch.equal(reserved(ids), plain(ids))


@needs_triton
@pytest.mark.parametrize("mup", [True, False])
def test_model_with_embed_kernel_matches_module_code(monkeypatch, mup):
    """The fused-norms forward (embedding kernel first) against the unfused module code, on the Triton path."""
    monkeypatch.setenv("TRINITY_KERNELS", "triton")
    model = _tiny(mup)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.inference_mode():
        want = model(ids)
    model.fuse_projections()
    with torch.inference_mode():
        got = model(ids)
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)


# ============================================================================== sm_90 compile check (opt-in)
@needs_compile_check
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("ids", ["*i32", "*i64"])
def test_embed_kernel_compiles_for_sm90(dtype, ids):
    from trinity.kernels import embed_triton as et
    from trinity.kernels.norm_triton import _row_warps
    p = "*" + dtype
    for block in (1024, 4096):
        for has_scale in (True, False):
            use = compile_sm90(et._embed_rms_norm_kernel, {
                "ids_ptr": ids, "table_ptr": p, "w_ptr": "*fp32", "x_ptr": p, "h_ptr": p,
                **{n: "i32:16" for n in ["N", "stride_table", "stride_x", "stride_h"]}, "stride_ids": "i32",
                "scale": "fp32", "eps": "fp32",
                "BLOCK": ("c", block), "HAS_SCALE": ("c", has_scale), "FIX_BF16": ("c", False)},
                num_warps=_row_warps(block))
            assert use["stack"] == 0, use  # no register spills
