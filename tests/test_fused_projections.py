"""Inference-time fused projections (q/k/v/gate and SwiGLU gate/up as one GEMM): same outputs, same parameters,
same checkpoints, and a safe fall-back once the parameters are replaced."""

import copy

import torch

from trinity import TrinityForCausalLM, preset
from trinity.model.layers import GatedAttention, SwiGLU
from trinity.model.moe import MoEBlock


def _model():
    return TrinityForCausalLM.random(preset("tiny"), seed=5).eval()


def _fused_modules(model):
    return [m for m in model.modules() if isinstance(m, (GatedAttention, SwiGLU))]


def test_fused_forward_equals_separate_and_state_dict_is_unchanged():
    model = _model()
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        want = model(ids)
    model.fuse_projections()
    assert all(m.fused is not None and m.fused.valid() for m in _fused_modules(model))
    with torch.inference_mode():
        got = model(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    # the parameters are views of the fused weight: no second copy of the weights
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.fused.weight.data_ptr()
    # each MoE block's shared expert sits after its routed experts, in the same stacked tensors
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    assert blocks and all(b.stacked_valid() for b in blocks)
    b = blocks[0]
    gate_up, down = b.stacked
    assert gate_up.shape[0] == b.experts.gate_up_proj.shape[0] + 1
    assert b.shared_experts.gate_proj.weight.data_ptr() == gate_up[-1].data_ptr()
    assert b.shared_experts.down_proj.weight.data_ptr() == down[-1].data_ptr()


def test_fused_model_saves_and_loads(tmp_path):
    model = _model().fuse_projections()
    model.save_pretrained(tmp_path)
    loaded = TrinityForCausalLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_replaced_parameters_fall_back_to_separate_projections():
    model = _model().fuse_projections()
    ids = torch.randint(0, 512, (1, 11), generator=torch.Generator().manual_seed(1))
    moved = copy.deepcopy(model)  # assign=True gives every parameter new storage (as .to() does)
    moved.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert not any(m.fused.valid() for m in _fused_modules(moved))
    assert not any(m.stacked_valid() for m in moved.modules() if isinstance(m, MoEBlock))
    with torch.no_grad():
        moved.model.layers[0].self_attn.q_proj.weight.mul_(0)  # the stale fused weight must not be used
        ref = copy.deepcopy(moved)
        for m in _fused_modules(ref):
            m.fused = None
        torch.testing.assert_close(moved(ids), ref(ids))
    # re-fusing picks up the new parameters
    moved.fuse_projections()
    assert all(m.fused.valid() for m in _fused_modules(moved))
    assert all(m.stacked_valid() for m in moved.modules() if isinstance(m, MoEBlock))


def test_training_uses_the_separate_parameters():
    model = _model().fuse_projections().train()
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    model(ids).float().sum().backward()
    attn = model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.gate_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_chained_sandwich_norms_are_exactly_the_layer_code():
    """After fuse_projections() the layers chain post-norm + residual add + next pre-norm (one pass each on the
    GPU); on the CPU the same reference ops run, so the logits are bit-identical to the layer-by-layer code."""
    model = _model().fuse_projections()
    assert model.model.fused_norms
    ids = torch.randint(0, 512, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        chained = model(ids)
        model.model.fused_norms = False
        layered = model(ids)
    assert torch.equal(chained, layered)
