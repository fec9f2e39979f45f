"""`trinity quantize`: every scheme and method writes a compressed-tensors checkpoint that trinity loads, that the
compressed-tensors library's own decompressor reads back to exactly the weights we compute with, and (fp8-block,
w4a16 rtn) that HF transformers runs to our fp32 logits; AWQ and GPTQ beat RTN on the output error they minimise;
the command streams a checkpoint bigger than the memory it is allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from trinity import TrinityForCausalLM, preset
from trinity.cli import main
from trinity.quant import awq, gptq, int4

pytest.importorskip("compressed_tensors")
from fp8_helpers import library_dequantized  # noqa: E402
from int4_helpers import ct_dequantized  # noqa: E402
from quant_helpers import IDS, loaded_weight, logits, rel  # noqa: E402

CFG = preset("tiny", vocab_size=301)
GROUP = 32


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    TrinityForCausalLM.random(CFG, seed=0).save_pretrained(path)
    return path


def quantize(model, out, *args) -> dict:
    assert main(["quantize", str(model), "--out", str(out), *args]) == 0
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)


def read_all(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


CASES = [("fp8-block", "rtn"), ("fp8-channel", "rtn"), ("w4a16", "rtn"), ("w4a16", "awq"), ("w4a16", "gptq")]


@pytest.mark.parametrize("scheme,method", CASES)
def test_quantized_checkpoint_loads_as_the_library_reads_it(tmp_path, float_dir, scheme, method):
    config = quantize(float_dir, tmp_path, "--scheme", scheme, "--method", method, "--group-size", str(GROUP),
                      "--num-samples", "8", "--max-tokens", "128", "--min-expert-tokens", "8")
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["quantization_status"] == "compressed"
    assert q["format"] == ("pack-quantized" if scheme == "w4a16" else "float-quantized")
    assert "lm_head" in q["ignore"]
    tensors = read_all(tmp_path)
    ours = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    part = "weight_packed" if scheme == "w4a16" else "weight_scale"
    modules = sorted(n.removesuffix("." + part) for n in tensors if n.endswith("." + part))
    # every projection but the router's: attention (5) and the dense MLP (3) per layer, the shared expert and
    # every routed expert (3 each) in MoE layers
    moe = sum(CFG.is_moe_layer(i) for i in range(CFG.num_hidden_layers))
    assert len(modules) == 5 * CFG.num_hidden_layers + 3 * (CFG.num_hidden_layers - moe) \
        + 3 * moe * (CFG.num_experts + 1)
    assert not any("router" in m for m in modules) and "lm_head" not in modules
    for module in modules:
        if scheme == "w4a16":
            library = ct_dequantized(tensors, module, "group", GROUP, symmetric=True)
        else:
            library = library_dequantized(tensors, module + ".weight", scheme.removeprefix("fp8-"))
        assert torch.equal(loaded_weight(ours, module), library), module
    # (closeness to fp32 is measured on the built-in model, below and in benchmarks/quantize_quality.py: a random
    # model's routing flips on small changes)
    assert torch.isfinite(logits(ours)).all()


def test_stacked_expert_checkpoint_quantizes_as_per_expert(tmp_path, float_dir):
    """A source checkpoint with HF transformers 5's stacked experts gives the same quantized checkpoint."""
    TrinityForCausalLM.random(CFG, seed=0).save_pretrained(tmp_path / "stacked", expert_layout="stacked")
    for name, src in (("a", float_dir), ("b", tmp_path / "stacked")):
        quantize(src, tmp_path / name, "--scheme", "w4a16", "--group-size", str(GROUP))
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scheme,args", [("fp8-block", ["--ignore", "re:.*mlp\\.experts\\..*"]),
                                         ("w4a16", ["--group-size", str(GROUP)])])
def test_hf_transformers_runs_the_quantized_checkpoint_to_1e4(tmp_path, float_dir, scheme, args):
    """HF transformers loads the checkpoint through compressed-tensors. FP8: its Afmoe keeps routed experts stacked
    outside `nn.Linear`, which compressed-tensors does not quantize, so that checkpoint leaves them in float
    (`--ignore`; they are checked against the library's decompressor above)."""
    transformers = pytest.importorskip("transformers")
    quantize(float_dir, tmp_path, "--scheme", scheme, *args)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.inference_mode():
        theirs = hf(IDS).logits.float()
    assert rel(logits(ours), theirs) < 1e-4


def test_builtin_model_with_awq_keeps_its_greedy_answer(tmp_path):
    """The built-in model, AWQ with the default (synthetic, reasoning included) calibration: the quantized model's
    next-token choices agree with fp32's on most of a conversation."""
    from trinity.loading import load_model
    from trinity.quant.calibration import synthetic_conversations

    quantize("trinity-tiny", tmp_path, "--scheme", "w4a16", "--method", "awq", "--group-size", "32",
             "--num-samples", "8", "--max-tokens", "256")
    ref = load_model("trinity-tiny", dtype="float32", device="cpu")
    q = TrinityForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    conv = synthetic_conversations(1, seed=99)[0]
    ids = torch.tensor([ref.tokenizer.apply_chat_template(conv["messages"], tools=conv["tools"],
                                                          add_generation_prompt=False, tokenize=True)[:200]])
    agree = (logits(q, ids).argmax(-1) == logits(ref.model, ids).argmax(-1)).float().mean().item()
    assert agree > 0.85


# ------------------------------------------------------------------------------------------------ the methods
def outlier_problem(seed=0, out=64, inp=128, tokens=512):
    g = torch.Generator().manual_seed(seed)
    # correlated channels (hidden states are), a few with much larger activations (as LLM hidden states have)
    x = torch.randn(tokens, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    x[:, :4] *= 30.0
    w = torch.randn(out, inp, generator=g) * 0.02
    return x, w


def test_gptq_beats_rtn_on_the_layer_output_error():
    x, w = outlier_problem()
    h = gptq.Hessian(x.shape[1])
    h.add(x)
    q, scales = gptq.gptq(w, h.value(), GROUP)
    err_rtn = awq.output_error(x, w, awq.rtn(w, GROUP))
    err_gptq = awq.output_error(x, w, q)
    assert err_gptq < 0.5 * err_rtn
    # Q lies on the int4 grid of its scales: the library's compressor (and int4.quantize) recover it exactly
    codes = torch.round(q / scales.repeat_interleave(GROUP, 1))
    assert codes.min() >= -8 and codes.max() <= 7
    assert torch.equal(codes * scales.repeat_interleave(GROUP, 1), q)


def test_awq_scales_beat_rtn_on_the_layer_output_error():
    x, w = outlier_problem(1)
    s, alpha, errors = awq.search_scales([(x, [w])], x.abs().mean(0), GROUP)
    assert errors[0.0] == pytest.approx(awq.output_error(x, w, awq.rtn(w, GROUP)), rel=1e-6)  # alpha 0 is RTN
    assert alpha > 0 and errors[alpha] < 0.8 * errors[0.0]
    # the folded form computes the same: (x / s) (w s)^T == x w^T
    assert torch.allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)
    clipped, ratio = awq.search_clip(w, x, GROUP)
    assert awq.output_error(x, w, awq.rtn(clipped, GROUP)) <= errors[0.0] * (1 + 1e-9)


def test_awq_clip_per_group_beats_one_ratio_for_the_whole_weight():
    """AWQ's clip search picks a ratio per (row, group): better than the best single ratio, far better than RTN."""
    x, w = outlier_problem(1)
    clipped, ratio = awq.search_clip(w, x, GROUP)
    err = awq.output_error(x, w, awq.rtn(clipped, GROUP))
    per_weight = []
    for r in awq.CLIP_RATIOS:
        limit = r * w.abs().reshape(w.shape[0], -1, GROUP).amax(-1).repeat_interleave(GROUP, 1)
        per_weight.append(awq.output_error(x, w, awq.rtn(torch.maximum(torch.minimum(w, limit), -limit), GROUP)))
    assert err < 0.9 * min(per_weight) and err < 0.5 * per_weight[0]  # per_weight[0]: ratio 1.0, plain RTN
    assert 0.5 <= ratio < 1.0


def test_int4_rtn_is_the_canonical_quantize():
    _, w = outlier_problem(2)
    q = int4.quantize(w, GROUP, True)
    assert torch.equal(awq.rtn(w, GROUP), int4.dequantize(q, torch.float32))


# ------------------------------------------------------------------------------------------------ streaming
def test_streaming_peak_memory_is_bounded(tmp_path):
    """A ~110 MB checkpoint quantized in a fresh process whose resident memory may grow by less than half the
    checkpoint's size (`--max-memory`): the float model is never built, one layer at a time is. RTN keeps the test
    short on 2 cores; the calibrated methods stream the same way (their figures on this shape: README section)."""
    cfg = preset("tiny", vocab_size=301, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                 num_hidden_layers=16, num_experts=8, head_dim=32)
    src = tmp_path / "float"
    TrinityForCausalLM.random(cfg, seed=0).save_pretrained(src, max_shard_size="16MB")
    size = sum(os.path.getsize(src / f) for f in os.listdir(src) if f.endswith(".safetensors"))
    assert size > 100e6
    budget = size // 2
    run = subprocess.run([sys.executable, "-m", "trinity", "quantize", str(src), "--scheme", "w4a16",
                          "--group-size", "32", "--max-memory", str(budget), "--out", str(tmp_path / "q")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["peak_growth_mib"] * 2**20 < budget
    assert TrinityForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32) is not None
