"""HF safetensors checkpoints: round trips, sharding, expert layouts, dtypes, every error, tied heads, memory."""

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trinity import CheckpointError, TrinityConfig, TrinityForCausalLM, preset
from trinity.model.checkpoint import INDEX_FILE, parse_size

CFG = preset("tiny")
E, I, H = CFG.num_experts, CFG.moe_intermediate_size, CFG.hidden_size  # 8, 32, 64
MOE_LAYERS = range(CFG.num_dense_layers, CFG.num_hidden_layers)  # 1, 2, 3
FP32_KEPT = TrinityForCausalLM.FP32_PARAM_SUFFIXES


def make_model(cfg=CFG, seed=0) -> TrinityForCausalLM:
    """random() leaves norms at 1 and expert biases at 0; perturb them so every tensor is distinct."""
    model = TrinityForCausalLM.random(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def model():
    return make_model(seed=0)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """The tiny model saved with defaults (single file, per-expert tensors)."""
    path = tmp_path_factory.mktemp("saved")
    model.save_pretrained(path)
    return path


def assert_same_params(got: TrinityForCausalLM, want: TrinityForCausalLM, dtype=None) -> None:
    g, w = dict(got.named_parameters()), dict(want.named_parameters())
    assert g.keys() == w.keys()
    for name, p in w.items():
        expect = p if dtype is None or name.endswith(FP32_KEPT) else p.to(dtype)
        assert g[name].dtype == expect.dtype, name
        assert g[name].shape == expect.shape, name
        assert torch.equal(g[name], expect), name


def file_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def write_checkpoint(path, tensors: dict[str, torch.Tensor], cfg: TrinityConfig = CFG) -> None:
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    cfg.save_pretrained(path)


def load_error(path, exc=CheckpointError) -> str:
    with pytest.raises(exc) as info:
        TrinityForCausalLM.from_pretrained(path)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- round trips
def test_single_file_round_trip(model, saved):
    assert sorted(os.listdir(saved)) == ["config.json", "model.safetensors"]
    loaded = TrinityForCausalLM.from_pretrained(saved)
    assert loaded.dtype == torch.float32 and not loaded.training
    assert loaded.config == model.config
    assert_same_params(loaded, model)
    assert json.loads((saved / "config.json").read_text())["torch_dtype"] == "float32"
    ids = torch.tensor([[1, 5, 9, 200, 3, 7, 11, 2, 8, 100, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_parse_size():
    assert parse_size("200KB") == 200_000
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="cannot read size 'lots'"):
        parse_size("lots")


def shard_names(path) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


def check_sharded(path, limit: int) -> int:
    """Shard names, index coverage and total_size; returns the shard count."""
    shards = shard_names(path)
    n = len(shards)
    assert n >= 2
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((path / INDEX_FILE).read_text())
    total, where = 0, {}
    for shard in shards:
        nbytes = 0
        with safe_open(path / shard, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                nbytes += t.numel() * t.element_size()
                where[name] = shard
        assert nbytes <= limit or len(where) == 1, (shard, nbytes)
        total += nbytes
    assert index["weight_map"] == where
    assert index["metadata"]["total_size"] == total
    assert total == sum(p.numel() * p.element_size() for p in make_model().parameters())
    return n


def test_sharded_save_and_resave_leaves_no_stale_shards(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    n200 = check_sharded(tmp_path, 200_000)
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_params(TrinityForCausalLM.from_pretrained(tmp_path), model)

    model.save_pretrained(tmp_path, max_shard_size="450KB")
    n450 = check_sharded(tmp_path, 450_000)
    assert 2 <= n450 < n200
    assert sorted(os.listdir(tmp_path)) == sorted(shard_names(tmp_path) + [INDEX_FILE, "config.json"])
    assert_same_params(TrinityForCausalLM.from_pretrained(tmp_path), model)

    model.save_pretrained(tmp_path)  # fits in one file again: the index and all shards go
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert_same_params(TrinityForCausalLM.from_pretrained(tmp_path), model)


def test_shards_without_index_still_load(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    (tmp_path / INDEX_FILE).unlink()
    assert_same_params(TrinityForCausalLM.from_pretrained(tmp_path), model)


# ---------------------------------------------------------------------------------------------- expert layouts
def test_per_expert_names_and_shapes(model, saved):
    tensors = file_tensors(saved)
    for i in MOE_LAYERS:
        stacked = model.model.layers[i].mlp.experts
        for e in range(E):
            p = f"model.layers.{i}.mlp.experts.{e}."
            assert tensors[p + "gate_proj.weight"].shape == (I, H)
            assert tensors[p + "up_proj.weight"].shape == (I, H)
            assert tensors[p + "down_proj.weight"].shape == (H, I)
            # gate rows come first in our fused gate_up_proj
            assert torch.equal(tensors[p + "gate_proj.weight"], stacked.gate_up_proj[e, :I])
            assert torch.equal(tensors[p + "up_proj.weight"], stacked.gate_up_proj[e, I:])
            assert torch.equal(tensors[p + "down_proj.weight"], stacked.down_proj[e])
        assert f"model.layers.{i}.mlp.experts.gate_up_proj" not in tensors
        assert tensors[f"model.layers.{i}.mlp.router.gate.weight"].shape == (E, H)
        assert tensors[f"model.layers.{i}.mlp.expert_bias"].shape == (E,)
        assert tensors[f"model.layers.{i}.mlp.shared_experts.down_proj.weight"].shape == (H, I)
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (CFG.intermediate_size, H)
    assert not any(".0.mlp.experts" in k or "layers.0.mlp.router" in k for k in tensors)
    assert len(tensors) == 137  # 4 layers x 11 common + dense 3 + 3 MoE x (2 + 3 shared + 24 experts) + 3


def test_stacked_layout(model, tmp_path):
    model.save_pretrained(tmp_path, expert_layout="stacked")
    tensors = file_tensors(tmp_path)
    for i in MOE_LAYERS:
        assert tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"].shape == (E, 2 * I, H)
        assert tensors[f"model.layers.{i}.mlp.experts.down_proj"].shape == (E, H, I)
    assert not any(re.search(r"experts\.\d+\.", k) for k in tensors)
    assert len(tensors) == 137 - 3 * (3 * E - 2)
    assert_same_params(TrinityForCausalLM.from_pretrained(tmp_path), model)


def test_bad_expert_layout(model, tmp_path):
    with pytest.raises(ValueError, match="expert_layout 'fused'"):
        model.save_pretrained(tmp_path, expert_layout="fused")


def test_stacked_unfused_gate_and_up_load(model, saved, tmp_path):
    tensors = file_tensors(saved)
    for i in MOE_LAYERS:
        p = f"model.layers.{i}.mlp.experts."
        for proj in ("gate_proj", "up_proj", "down_proj"):
            tensors[p + proj] = torch.stack([tensors.pop(f"{p}{e}.{proj}.weight") for e in range(E)])
        assert tensors[p + "gate_proj"].shape == (E, I, H) and tensors[p + "down_proj"].shape == (E, H, I)
    write_checkpoint(tmp_path, tensors)
    assert_same_params(TrinityForCausalLM.from_pretrained(tmp_path), model)


def test_ignored_rotary_buffer(model, saved, tmp_path):
    tensors = file_tensors(saved)
    tensors["model.rotary_emb.inv_freq"] = torch.ones(8)
    write_checkpoint(tmp_path, tensors)
    assert_same_params(TrinityForCausalLM.from_pretrained(tmp_path), model)


# ---------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype, want", [(torch.bfloat16, torch.bfloat16), ("float16", torch.float16),
                                         ("fp32", torch.float32)])
def test_load_dtype(model, saved, dtype, want):
    loaded = TrinityForCausalLM.from_pretrained(saved, dtype=dtype)
    assert loaded.dtype == want
    params = dict(loaded.named_parameters())
    for name, p in params.items():
        assert p.dtype == (torch.float32 if name.endswith(FP32_KEPT) else want), name
    assert params["model.layers.1.mlp.expert_bias"].dtype == torch.float32
    assert params["model.norm.weight"].dtype == torch.float32
    assert params["model.layers.2.self_attn.q_norm.weight"].dtype == torch.float32
    assert params["model.layers.0.post_mlp_layernorm.weight"].dtype == torch.float32
    assert params["model.layers.1.mlp.experts.gate_up_proj"].dtype == want
    assert params["model.layers.1.mlp.router.gate.weight"].dtype == want
    assert params["lm_head.weight"].dtype == want
    assert_same_params(loaded, model, dtype=want)


def test_unknown_load_dtype(saved):
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        TrinityForCausalLM.from_pretrained(saved, dtype="int4")


def test_save_bf16(model, tmp_path):
    model.save_pretrained(tmp_path, dtype="bfloat16")
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert len(dtypes) == 137
    for name, dt in dtypes.items():
        assert dt == ("F32" if name.endswith(FP32_KEPT) else "BF16"), name
    assert dtypes["model.layers.1.mlp.experts.3.up_proj.weight"] == "BF16"
    assert dtypes["model.layers.1.mlp.expert_bias"] == "F32"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["dtype"] == "bfloat16"
    assert model.dtype == torch.float32  # saving does not convert the model
    back = TrinityForCausalLM.from_pretrained(tmp_path)  # CPU, dtype auto: fp32
    assert back.dtype == torch.float32
    for name, p in model.named_parameters():
        want = p if name.endswith(FP32_KEPT) else p.to(torch.bfloat16).float()
        assert torch.equal(dict(back.named_parameters())[name], want), name


# ---------------------------------------------------------------------------------------------- errors
def test_missing_tensor(saved, tmp_path):
    tensors = file_tensors(saved)
    del tensors["model.layers.0.self_attn.q_norm.weight"]
    write_checkpoint(tmp_path, tensors)
    msg = load_error(tmp_path)
    assert "missing tensors" in msg
    assert "model.layers.0.self_attn.q_norm.weight (shape (16,))" in msg
    assert "k_norm" not in msg


def test_missing_one_expert_projection(saved, tmp_path):
    tensors = file_tensors(saved)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    write_checkpoint(tmp_path, tensors)
    msg = load_error(tmp_path)
    assert msg.endswith("is missing tensors: model.layers.1.mlp.experts.3.up_proj.weight"), msg


def test_missing_many_tensors_is_summarised(saved, tmp_path):
    tensors = {k: v for k, v in file_tensors(saved).items() if "layers.3." not in k}
    write_checkpoint(tmp_path, tensors)
    msg = load_error(tmp_path)
    assert "model.layers.3.input_layernorm.weight (shape (64,))" in msg
    assert re.search(r"and \d+ more$", msg), msg


def test_unexpected_tensor(saved, tmp_path):
    tensors = file_tensors(saved)
    tensors["model.layers.0.mlp.bogus.weight"] = torch.zeros(3, 4)
    write_checkpoint(tmp_path, tensors)
    msg = load_error(tmp_path)
    assert "unexpected tensor 'model.layers.0.mlp.bogus.weight'" in msg
    assert "(3, 4)" in msg and "model.safetensors" in msg


def test_unexpected_expert_tensors_in_dense_layer_gate(saved, tmp_path):
    tensors = file_tensors(saved)
    tensors["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(I, H)
    write_checkpoint(tmp_path, tensors)
    assert "unexpected tensor 'model.layers.0.mlp.experts.0.gate_proj.weight'" in load_error(tmp_path)


@pytest.mark.parametrize("name, shape", [
    (f"model.layers.1.mlp.experts.{E}.gate_proj.weight", (I, H)),
    (f"model.layers.1.mlp.experts.{E}.down_proj.weight", (H, I)),
    ("model.layers.0.mlp.experts.0.down_proj.weight", (H, I)),
])
def test_unexpected_expert_tensor_named(saved, tmp_path, name, shape):
    tensors = file_tensors(saved)
    tensors[name] = torch.zeros(shape)
    write_checkpoint(tmp_path, tensors)
    assert f"'{name}'" in load_error(tmp_path)


@pytest.mark.parametrize("name, shape, want", [
    ("model.layers.0.self_attn.q_proj.weight", (64, 32), (64, 64)),
    ("model.layers.2.mlp.experts.5.down_proj.weight", (64, 16), (64, 32)),
    ("model.layers.1.mlp.experts.gate_up_proj", (8, 64, 32), (8, 64, 64)),
])
def test_misshaped_tensor(saved, tmp_path, name, shape, want):
    tensors = file_tensors(saved)
    if name.endswith("gate_up_proj"):
        for e in range(E):
            del tensors[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"]
            del tensors[f"model.layers.1.mlp.experts.{e}.up_proj.weight"]
    tensors[name] = torch.zeros(shape)
    write_checkpoint(tmp_path, tensors)
    msg = load_error(tmp_path)
    assert f"tensor '{name}'" in msg
    assert f"has shape {shape} but the model expects {want}" in msg


def duplicated_checkpoint(saved, path, stacked_first: bool) -> None:
    """Layer 1's experts both per expert and stacked, in two shards; the index says which is read first."""
    tensors = file_tensors(saved)
    stacked = {"model.layers.1.mlp.experts.gate_up_proj": torch.cat(
        [torch.stack([tensors[f"model.layers.1.mlp.experts.{e}.{p}.weight"] for e in range(E)]) for p in
         ("gate_proj", "up_proj")], dim=1)}
    os.makedirs(path)
    save_file(stacked, os.path.join(path, "stacked.safetensors"), metadata={"format": "pt"})
    save_file(tensors, os.path.join(path, "rest.safetensors"), metadata={"format": "pt"})
    order = [(stacked, "stacked.safetensors"), (tensors, "rest.safetensors")]
    if not stacked_first:
        order.reverse()
    weight_map = {name: file for group, file in order for name in group}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    CFG.save_pretrained(path)


def test_same_tensor_twice_stacked_first(saved, tmp_path):
    duplicated_checkpoint(saved, tmp_path / "ckpt", stacked_first=True)
    msg = load_error(tmp_path / "ckpt")
    assert "fills part of 'model.layers.1.mlp.experts.gate_up_proj' that another tensor already filled" in msg
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in msg


def test_same_tensor_twice_per_expert_first(saved, tmp_path):
    duplicated_checkpoint(saved, tmp_path / "ckpt", stacked_first=False)
    msg = load_error(tmp_path / "ckpt")
    assert "fills part of 'model.layers.1.mlp.experts.gate_up_proj' that another tensor already filled" in msg


@pytest.mark.parametrize("proj", ["gate_up_proj", "down_proj"])
def test_same_tensor_twice_single_file(model, saved, tmp_path, proj):
    tensors = file_tensors(saved)
    tensors[f"model.layers.1.mlp.experts.{proj}"] = getattr(model.model.layers[1].mlp.experts, proj).detach()
    write_checkpoint(tmp_path, tensors)
    msg = load_error(tmp_path)
    assert f"fills part of 'model.layers.1.mlp.experts.{proj}' that another tensor already filled" in msg


class _Payload:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weights_refused_without_unpickling(tmp_path):
    probe = tmp_path / "probe_marker"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()  # the payload is live

    marker = tmp_path / "marker"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    CFG.save_pretrained(ckpt)
    msg = load_error(ckpt)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "not loaded" in msg
    assert "safetensors" in msg
    assert not marker.exists()
    # without a config.json the config error comes first; still nothing is unpickled
    (ckpt / "config.json").unlink()
    assert "no config.json at" in load_error(ckpt, FileNotFoundError)
    assert not marker.exists()


def test_no_weights(tmp_path):
    CFG.save_pretrained(tmp_path)
    msg = load_error(tmp_path, FileNotFoundError)
    assert "no safetensors weights in" in msg and str(tmp_path) in msg


def test_index_names_missing_shard(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    shards = shard_names(tmp_path)
    (tmp_path / shards[1]).unlink()
    msg = load_error(tmp_path, FileNotFoundError)
    assert f"{INDEX_FILE} names {shards[1]}, which is not in" in msg


def test_missing_config(model, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    msg = load_error(tmp_path, FileNotFoundError)
    assert "no config.json at" in msg and str(tmp_path) in msg


def test_nonexistent_folder(tmp_path):
    msg = load_error(tmp_path / "nowhere", FileNotFoundError)
    assert str(tmp_path / "nowhere") in msg


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


# ---------------------------------------------------------------------------------------------- tied embeddings
@pytest.mark.parametrize("with_head", [False, True])
def test_tied_embeddings(tmp_path, with_head):
    cfg = preset("tiny", tie_word_embeddings=True)
    model = make_model(cfg, seed=5)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    tensors = file_tensors(tmp_path)
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    if with_head:  # some exporters write the tied head anyway
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        write_checkpoint(tmp_path, tensors, cfg)
    loaded = TrinityForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)
    assert_same_params(loaded, model)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


# ---------------------------------------------------------------------------------------------- memory
MEMORY_OVERRIDES = dict(vocab_size=16384, hidden_size=256, intermediate_size=1024, moe_intermediate_size=128,
                        num_hidden_layers=6, num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=64, num_experts=32, num_experts_per_tok=2)  # 27.0M params: 108 MB in fp32

SAVE = """
import torch
from trinity import TrinityForCausalLM, preset
torch.set_num_threads(2)
TrinityForCausalLM.random(preset("tiny", **{overrides}), seed=0).save_pretrained({path!r}, max_shard_size="20MB")
"""

MEASURE = """
import json

def status():
    out = {{}}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out

import torch, trinity
torch.set_num_threads(2)
base = status()
model = trinity.TrinityForCausalLM.from_pretrained({path!r}, dtype=torch.float32)
after = status()
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(base=base, after=after, nbytes=nbytes)))
"""


def test_loading_streams_tensors(tmp_path):
    assert preset("tiny", **MEMORY_OVERRIDES).num_parameters() * 4 == pytest.approx(100e6, rel=0.1)
    path = str(tmp_path / "big")
    subprocess.run([sys.executable, "-c", textwrap.dedent(SAVE.format(overrides=MEMORY_OVERRIDES, path=path))],
                   check=True, timeout=120)
    assert len(shard_names(tmp_path / "big")) >= 5
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(MEASURE.format(path=path))], check=True,
                         capture_output=True, text=True, timeout=120)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    base, after, nbytes = r["base"], r["after"], r["nbytes"]
    extra_peak = after["VmHWM"] - base["VmRSS"]
    report = (f"model {nbytes / 1e6:.1f} MB; peak extra {extra_peak / 1e6:.1f} MB = {extra_peak / nbytes:.2f}x; "
              f"after load: anon +{(after['RssAnon'] - base['RssAnon']) / 1e6:.1f} MB, "
              f"file +{(after['RssFile'] - base['RssFile']) / 1e6:.1f} MB")
    print(report)
    assert after["VmRSS"] - base["VmRSS"] >= 0.9 * nbytes, report  # the model really is resident
    assert extra_peak < 1.6 * nbytes, report


# ---------------------------------------------------------------------------------------------- HF interop
@pytest.mark.parametrize("layout", ["per_expert", "stacked"])
def test_transformers_loads_our_checkpoint(model, tmp_path, layout):
    transformers = pytest.importorskip("transformers")
    model.save_pretrained(tmp_path, expert_layout=layout)
    hf, info = transformers.AfmoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(0, CFG.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    assert ids.shape[1] > CFG.sliding_window
    with torch.no_grad():
        ref, got = hf.eval()(ids).logits, model(ids)
    assert got.shape == ref.shape == (2, 13, CFG.vocab_size)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


# ---------------------------------------------------------------------------------------------- progress
def test_progress_bar_without_tty(model, saved, capsys):
    assert not sys.stderr.isatty()
    loaded = TrinityForCausalLM.from_pretrained(saved, progress=True)
    assert_same_params(loaded, model)
    TrinityForCausalLM.from_pretrained(saved)  # progress=None: off when stderr is not a terminal
    capsys.readouterr()


def test_progress_bar_in_subprocess_with_piped_stderr(saved):
    code = (f"import trinity; m = trinity.TrinityForCausalLM.from_pretrained({str(saved)!r}, progress=True); "
            "print(sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(CFG.num_parameters())
    assert "Traceback" not in out.stderr
