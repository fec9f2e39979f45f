"""4-bit weights (W4A16): AWQ GEMM, GPTQ (v1 / v2, sym / asym, act-order g_idx) and compressed-tensors
pack-quantized (group / channel, sym / asym) checkpoints, written in each format's real layout
(tests/int4_helpers.py), load with the weights packed (half a byte each), dequantize to exactly what the format's
own reading gives, and compute the logits of the float model holding those weights; compressed-tensors checkpoints
also as HF transformers runs them. What cannot run is refused by name."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from trinity import TrinityForCausalLM, kernels, preset
from trinity.quant import int4, int4_formats
from trinity.quant.int4_modules import Int4Experts, Int4Linear
from trinity.quant.scheme import QuantizationError, from_hf

pytest.importorskip("compressed_tensors")
from int4_helpers import (AWQ_ORDER, awq_dequantized, ct_dequantized, gptq_weight, int4_module_bytes,  # noqa: E402
                          pack_columns, pack_rows, stack_experts, write_awq_checkpoint, write_ct_checkpoint,
                          write_gptq_checkpoint)
from quant_helpers import IDS, loaded_weight, logits, rel  # noqa: E402

CFG = preset("tiny", vocab_size=301)


@pytest.fixture(scope="module")
def model():
    return TrinityForCausalLM.random(CFG, seed=0).eval()


def with_weights(model, weights: dict[str, torch.Tensor]):
    """A float copy of `model` with some weights replaced (HF module names, per expert for experts)."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for module, w in weights.items():
            if ".mlp.experts." in module:
                prefix, e, proj = module.rsplit(".", 2)
                if proj == "down_proj":
                    params[f"{prefix}.down_proj"][int(e)].copy_(w)
                else:
                    i = params[f"{prefix}.gate_up_proj"].shape[1] // 2
                    half = slice(0, i) if proj == "gate_proj" else slice(i, 2 * i)
                    params[f"{prefix}.gate_up_proj"][int(e), half].copy_(w)
            else:
                params[f"{module}.weight"].copy_(w)
    return ref


def modules_of(tensors: dict, part: str) -> list[str]:
    return sorted(n.removesuffix("." + part) for n in tensors if n.endswith("." + part))


def check_loaded(ours, model, reference: dict[str, torch.Tensor]) -> float:
    """The loaded weights are exactly the reference readings, the logits those of the float model holding them,
    and the 4-bit modules hold half a byte per weight plus their scales, zeros and g_idx: returns their bytes per
    weight."""
    assert isinstance(ours.model.layers[0].self_attn.q_proj, Int4Linear)
    assert isinstance(ours.model.layers[1].mlp.experts, Int4Experts)
    assert not isinstance(ours.lm_head, Int4Linear) and not isinstance(ours.model.layers[1].mlp.router.gate,
                                                                        Int4Linear)
    for module, w in reference.items():
        assert torch.equal(loaded_weight(ours, module), w), module
    assert rel(logits(ours), logits(with_weights(model, reference))) < 1e-4
    codes, total, weights = int4_module_bytes(ours)
    assert weights > 0 and codes * 2 == weights  # packed: half a byte per weight
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(p.numel() * p.element_size() for p in ours.parameters()) < float_bytes
    return total / weights


# ------------------------------------------------------------------------------------------------ layouts by hand
def test_nibble_orders_hand_checked():
    """Eight codes 1..8 for columns (or rows) 0..7 in one int32 word, as each format packs them."""
    codes = torch.arange(1, 9, dtype=torch.uint8)
    # AWQ: nibble k holds column [0, 2, 4, 6, 1, 3, 5, 7][k], so the nibbles (low first) read 1 3 5 7 2 4 6 8
    awq_word = 0x86427531 - 2 ** 32
    assert pack_columns(codes[None], AWQ_ORDER).item() == awq_word
    assert int4_formats._unpack_awq(torch.tensor([[awq_word]], dtype=torch.int32), 8).tolist() == [codes.tolist()]
    # GPTQ qweight: rows 0..7 of one column in order, row k in bits 4k
    gptq_word = 0x87654321 - 2 ** 32
    assert pack_rows(codes[:, None]).item() == gptq_word
    codes_out, *_ = int4_formats.from_gptq(torch.tensor([[gptq_word]], dtype=torch.int32),
                                           torch.tensor([[0x77777777]], dtype=torch.int32),
                                           torch.ones(1, 1, dtype=torch.float16), None, 8, v1=True, symmetric=True)
    assert int4.unpack(codes_out, 8).tolist() == [codes.tolist()]  # [out 1, in 8]
    # compressed-tensors: columns 0..7 in order; the canonical bytes are the word's bytes (little-endian)
    assert pack_columns(codes[None]).item() == gptq_word
    assert int4.pack(codes).tolist() == [0x21, 0x43, 0x65, 0x87]
    assert torch.equal(torch.tensor([gptq_word], dtype=torch.int32).view(torch.uint8), int4.pack(codes))


def test_gptq_v1_zero_points_carry_as_gptqmodel_converts_them():
    """v1 stores zero - 1 as a word subtraction: a zero of 0 borrows from the next nibble, and the word addition
    undoes it exactly (a nibble-wise +1 would read 16 there and shift its neighbour)."""
    zeros = torch.tensor([[0, 8, 15, 0, 1, 2, 3, 0]], dtype=torch.uint8)
    stored = (pack_columns(zeros).long() - 0x11111111) & 0xFFFFFFFF
    stored = torch.where(stored >= 2 ** 31, stored - 2 ** 32, stored).to(torch.int32)
    assert int4_formats.gptq_zeros(stored, 8, v1=True).T.tolist() == zeros.tolist()
    assert int4_formats.gptq_zeros(pack_columns(zeros), 8, v1=False).T.tolist() == zeros.tolist()
    assert int4_formats.gptq_zeros(torch.tensor([[0x77777777]], dtype=torch.int32), 8, v1=True).unique().item() == 8


@pytest.mark.parametrize("n", [1, 7, 8, 33, 100])
def test_pack_unpack_round_trips(n):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 16, (5, n), generator=g, dtype=torch.uint8)
    assert torch.equal(int4.unpack(int4.pack(codes), n), codes)
    assert torch.equal(int4.unpack_int32(pack_columns(codes))[:, :n], codes)
    assert torch.equal(int4.unpack_int32(pack_rows(codes.T), dim=0)[:n].T, codes)
    if n % 8 == 0:
        assert torch.equal(int4_formats._unpack_awq(pack_columns(codes, AWQ_ORDER), n), codes)


def test_quantize_round_trip_is_within_half_a_step():
    """Round-to-nearest: every weight within half its group's step, partial last groups and g_idx groups too."""
    w = torch.randn(40, 100) * torch.logspace(-2, 1, 100)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    g_idx = torch.empty(100, dtype=torch.long)
    g_idx[order] = torch.arange(100) // 32
    for group, symmetric, gi in ((32, True, None), (32, False, None), (None, True, None), (32, False, g_idx)):
        q = int4.quantize(w, group, symmetric, g_idx=gi)
        assert q.codes.shape == (40, 50) and q.scale.shape == (40, 4 if group else 1)
        back = int4.dequantize(q, torch.float32)
        step = int4._per_column(q.scale, int4.column_groups(q))
        assert ((back - w).abs() <= step / 2 * 1.0001).all()


# ------------------------------------------------------------------------------------------------ checkpoints
CT_CASES = [("group", 32, True, torch.bfloat16), ("group", 32, False, torch.float32),
            ("channel", None, True, torch.float16), ("channel", None, False, torch.float32)]


@pytest.mark.parametrize("strategy,group,symmetric,scale_dtype", CT_CASES,
                         ids=[f"{c[0]}-{'sym' if c[2] else 'asym'}" for c in CT_CASES])
def test_compressed_tensors_pack_quantized(tmp_path, model, strategy, group, symmetric, scale_dtype):
    tensors = write_ct_checkpoint(model, str(tmp_path), strategy, group, symmetric, scale_dtype)
    ours = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    reference = {m: ct_dequantized(tensors, m, strategy, group, symmetric) for m in modules_of(tensors,
                                                                                               "weight_packed")}
    per_weight = check_loaded(ours, model, reference)
    # group 32: fp32 scale + uint8 zero per 32 weights; channel: per row (g_idx none)
    assert per_weight <= 0.5 + ((4 + (not symmetric)) / (group or 32)) + 1e-9


def test_awq_gemm(tmp_path, model):
    tensors = write_awq_checkpoint(model, str(tmp_path), group=32)
    ours = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    reference = {m: awq_dequantized(tensors, m, 32) for m in modules_of(tensors, "qweight")}
    assert check_loaded(ours, model, reference) == pytest.approx(0.5 + 5 / 32)


GPTQ_CASES = [(64, True, False, True), (32, False, True, True), (32, False, True, False), (None, True, True, False)]


@pytest.mark.parametrize("group,symmetric,act_order,v1", GPTQ_CASES,
                         ids=[f"g{c[0]}-{'sym' if c[1] else 'asym'}{'-act' if c[2] else ''}-{'v1' if c[3] else 'v2'}"
                              for c in GPTQ_CASES])
def test_gptq(tmp_path, model, group, symmetric, act_order, v1):
    """Group 64 over the experts' 32 input columns is one partial group. GPTQModel's Trinity definition leaves
    attention's output gate in 16 bits without its config saying so: the checkpoint's tensors decide."""
    tensors = write_gptq_checkpoint(model, str(tmp_path), group, symmetric, act_order, v1,
                                    skip=("self_attn.gate_proj",))
    ours = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert not isinstance(ours.model.layers[0].self_attn.gate_proj, Int4Linear)
    reference = {}
    for m in modules_of(tensors, "qweight"):
        part = {k.removeprefix(m + "."): v for k, v in tensors.items() if k.startswith(m + ".")}
        reference[m] = gptq_weight(part, loaded_weight(ours, m).shape[1], v1)
    check_loaded(ours, model, reference)
    assert hasattr(ours.model.layers[0].self_attn.q_proj, "weight_g_idx") == act_order


def test_stacked_experts_load_as_per_expert(tmp_path, model):
    """Experts stacked per projection ([E, ...] tensors, GPTQ with act-order) and gate and up stacked as one
    (compressed-tensors) compute exactly what the per-expert checkpoints do."""
    write_gptq_checkpoint(model, str(tmp_path / "gptq"), 32, symmetric=False, act_order=True)
    per_expert = logits(TrinityForCausalLM.from_pretrained(tmp_path / "gptq", dtype=torch.float32))
    stack_experts(str(tmp_path / "gptq"), CFG.num_experts, ("qweight", "qzeros", "scales", "g_idx"))
    assert torch.equal(logits(TrinityForCausalLM.from_pretrained(tmp_path / "gptq", dtype=torch.float32)), per_expert)
    write_ct_checkpoint(model, str(tmp_path / "ct"), "group", 32, symmetric=False)
    per_expert = logits(TrinityForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32))
    stack_experts(str(tmp_path / "ct"), CFG.num_experts,
                  ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"), gate_up=True)
    assert torch.equal(logits(TrinityForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)), per_expert)


@pytest.mark.parametrize("strategy,group", [("group", 32), ("channel", None)])
def test_hf_transformers_runs_the_same_checkpoint_to_1e4(tmp_path, model, strategy, group):
    """HF transformers loads the pack-quantized checkpoint through compressed-tensors (its per-expert tensors
    dequantized into its stacked experts) and computes our fp32 logits. Symmetric only: compressed-tensors 0.20.1
    builds an asymmetric module's zero point unpacked ([out, G]) on the meta device while checkpoints hold it packed
    ([out / 8, G]), so HF re-initialises it (a library bug); asymmetric checkpoints are checked against the
    library's own decompressor above."""
    transformers = pytest.importorskip("transformers")
    write_ct_checkpoint(model, str(tmp_path), strategy, group, symmetric=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(ours.model.layers[1].mlp.experts, Int4Experts)
    with torch.inference_mode():
        theirs = hf(IDS).logits.float()
    assert rel(logits(ours), theirs) < 1e-4


def test_bf16_activations_and_the_engine(tmp_path, model):
    """bf16 activations dequantize into bf16 (close to fp32), and the engine generates with a 4-bit model."""
    from trinity import LLM, SamplingParams

    write_gptq_checkpoint(model, str(tmp_path), 32, symmetric=False, act_order=True)
    fp32 = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    bf16 = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.float32
    # The references on both sides: with the C kernels' other (equally valid) bf16 rounding this random model's
    # last token flips one expert in layer 3 (its 2nd and 3rd router scores 1e-4 apart), and the logits move by
    # 0.19. The kernels are checked against these references in tests/test_kernels_int4.py.
    kernels.use_reference(True)
    try:
        assert rel(logits(bf16), logits(fp32)) < 3e-2
    finally:
        kernels.use_reference(None)
    llm = LLM(fp32, num_kv_blocks=64)
    out = llm.generate(prompt_token_ids=[[1, 2, 3, 4, 5]],
                       sampling_params=SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8


def test_experts_without_host_sync_under_graph_capture(tmp_path, model):
    """Inside a CUDA-graph capture the experts reference cannot read which experts are used: every expert runs,
    weighted 0 where not chosen, to the same sums."""
    from trinity.kernels import graph_mode

    write_ct_checkpoint(model, str(tmp_path), "group", 32, symmetric=False)
    experts = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).model.layers[1].mlp.experts
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, CFG.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(CFG.num_experts, generator=g)[:2] for _ in range(5)])
    weights = torch.rand(5, 2, generator=g)
    with torch.inference_mode():
        eager = experts(x, weights, ids)
        with graph_mode():
            captured = experts(x, weights, ids)
    assert torch.allclose(captured, eager, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ refusals
CT_BASE = {"quant_method": "compressed-tensors", "format": "pack-quantized",
           "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                                      "group_size": 128, "symmetric": True,
                                                                      "dynamic": False}}}}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq"}


def _ct(**weights):
    cfg = json.loads(json.dumps(CT_BASE))
    cfg["config_groups"]["g"]["weights"].update(weights)
    return cfg


@pytest.mark.parametrize("config,names", [
    ({**AWQ, "version": "gemv"}, "version = 'gemv'"),
    ({**AWQ, "zero_point": False}, "zero_point = False"),
    ({**GPTQ, "bits": 8}, "quant_method = 'gptq' is not supported: with bits = 8"),
    ({**GPTQ, "checkpoint_format": "marlin"}, "checkpoint_format = 'marlin'"),
    ({**GPTQ, "group_size": 0}, "group_size = 0"),
    ({**GPTQ, "dynamic": {r"+:.*down_proj": {"bits": 8}}}, "dynamic"),
    (_ct(num_bits=8), "weights.num_bits = 8"),
    (_ct(strategy="tensor_group"), "weights.strategy = 'tensor_group'"),
    (_ct(strategy="mystery"), "weights.strategy = 'mystery'"),
    (_ct(actorder="group"), "weights.actorder = 'group'"),
    (_ct(dynamic=True), "weights.dynamic = True"),
    (_ct(type="float"), "format = 'pack-quantized'"),
    ({**CT_BASE, "config_groups": {"g": {**CT_BASE["config_groups"]["g"],
                                         "input_activations": {"num_bits": 8, "type": "int"}}}}, "input_activations"),
])
def test_unsupported_configs_are_refused_by_name(config, names):
    with pytest.raises(QuantizationError, match=names.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("+", r"\+").replace(".*", r"\.\*")):
        from_hf(config)


def test_accepted_configs():
    assert from_hf(AWQ).weights == from_hf({**AWQ, "version": None, "format": "gemm"}).weights
    gptq = from_hf({**GPTQ, "group_size": -1, "desc_act": True, "sym": False, "checkpoint_format": "gptq_v2",
                    "lm_head": True, "dynamic": {"-:.*gate_proj": {}}})
    assert gptq.weights.group_size is None and gptq.weights.act_order and not gptq.weights.gptq_v1
    assert "lm_head" not in gptq.ignore and "lm_head" in from_hf(GPTQ).ignore
    ct = from_hf(_ct(strategy="channel", symmetric=False))
    assert ct.int4 and ct.weights.group_size is None and not ct.weights.symmetric


def test_quantization_flag_names_the_checkpoints_method(tmp_path, model):
    """vLLM's `--quantization awq` / `compressed_tensors` on a checkpoint of that method loads it as without the flag;
    a method the checkpoint does not have is refused, naming what it has."""
    write_awq_checkpoint(model, str(tmp_path / "awq"), 32)
    write_ct_checkpoint(model, str(tmp_path / "ct"), "group", 32)
    plain = TrinityForCausalLM.from_pretrained(tmp_path / "awq", dtype=torch.float32)
    flagged = TrinityForCausalLM.from_pretrained(tmp_path / "awq", dtype=torch.float32, quantization="awq")
    assert rel(logits(flagged), logits(plain)) == 0
    for alias in ("compressed-tensors", "compressed_tensors"):
        ct = TrinityForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, quantization=alias)
        assert isinstance(ct.model.layers[0].self_attn.q_proj, Int4Linear)
    with pytest.raises(QuantizationError, match="quant_method 'awq'"):
        TrinityForCausalLM.from_pretrained(tmp_path / "awq", dtype=torch.float32, quantization="gptq")
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(QuantizationError, match="not quantized"):
        TrinityForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32, quantization="awq")


def test_bad_checkpoints_are_named(tmp_path, model):
    """AWQ needs groups dividing the input dimension; a checkpoint missing a module's tensor says which."""
    from safetensors.torch import load_file, save_file

    from trinity.model.checkpoint import CheckpointError

    write_awq_checkpoint(model, str(tmp_path), group=32)
    config = json.load(open(os.path.join(tmp_path, "config.json")))
    config["quantization_config"]["group_size"] = 48
    json.dump(config, open(os.path.join(tmp_path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="in groups of 48"):
        TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    write_gptq_checkpoint(model, str(tmp_path / "g"), 32, symmetric=True)
    file = os.path.join(tmp_path, "g", "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.2.mlp.experts.5.up_proj.scales"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.scales"):
        TrinityForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float32)
