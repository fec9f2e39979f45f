"""The trainer end to end on a tiny model: loss falls, exact resume, data parallel over gloo (FSDP2, DDP, manual
all-reduce), HF export, the schedule, the report-style init and the `trinity train` command line."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trinity import LLM, SamplingParams, TrinityForCausalLM, preset
from trinity.cli import main as cli_main
from trinity.jsonl import read_jsonl
from trinity.train.parallel import clip_grad_norm_, fsdp_available, resolve_mode
from trinity.train.trainer import TrainConfig, Trainer, init_like_report_, load_train_config, lr_scale

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

SENTENCES = ["the cat sat on the mat. ", "a dog ran in the park. ", "we like to eat red apples. ",
             "my hat is on the bed. "]

STEPS, RESUME_AT = 12, 4  # warmup covers the first RESUME_AT steps, so a steps=RESUME_AT run has the same schedule


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small learnable corpus: a few documents, each one short sentence repeated."""
    root = tmp_path_factory.mktemp("corpus")
    for i, sentence in enumerate(SENTENCES):
        (root / f"doc{i}.txt").write_text(sentence * 12, encoding="utf-8")
    return root


def base_config(corpus: Path, out_dir: Path, **overrides) -> TrainConfig:
    values = dict(preset="tiny", data=[str(corpus)], seq_len=32, batch_size=4, steps=STEPS, warmup_steps=RESUME_AT,
                  lr=3e-3, muon_lr=0.02, schedule="cosine", seed=0, out_dir=str(out_dir), progress=False,
                  device="cpu", data_order="rsdb", buffer_size=4)
    values.update(overrides)
    return TrainConfig(**values)


def losses(history) -> list[float]:
    return [r["loss"] for r in history]


def read_log(out_dir: Path) -> list[dict]:
    return read_jsonl(str(out_dir / "log.jsonl"))


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    """One uninterrupted run, checkpointing every RESUME_AT steps."""
    out = tmp_path_factory.mktemp("full")
    trainer = Trainer(base_config(corpus, out, checkpoint_every=RESUME_AT))
    history = trainer.run()
    return trainer, history, out


# ---------------------------------------------------------------------------------------------- training

def test_loss_falls_well_below_its_start(full_run):
    _, history, out = full_run
    values = losses(history)
    assert len(values) == STEPS and all(math.isfinite(v) for v in values)
    assert values[-1] < 0.5 * values[0], values
    assert sum(values[-3:]) < 0.6 * sum(values[:3])
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in log] == values
    for record in log:
        assert record["maxvio"] is not None and len(record["maxvio_per_layer"]) == 3
        assert record["batchhet"] == 0.0  # one micro batch per step
        assert record["grad_norm"] > 0


def test_schedule_in_the_log(full_run):
    trainer, history, _ = full_run
    for record in history:
        assert record["lr"] == pytest.approx(3e-3 * lr_scale(trainer.cfg, record["step"] - 1))
        assert record["muon_lr"] == pytest.approx(0.02 * lr_scale(trainer.cfg, record["step"] - 1))


def test_expert_bias_moved_and_centred(full_run):
    trainer, _, _ = full_run
    for name, p in trainer.model.named_parameters():
        if name.endswith("expert_bias"):
            assert p.abs().max() > 0 and abs(p.mean().item()) < 1e-6


def test_resume_reproduces_the_uninterrupted_run_exactly(full_run, corpus, tmp_path):
    trainer_a, history_a, _ = full_run
    first = Trainer(base_config(corpus, tmp_path, steps=RESUME_AT)).run()
    assert (tmp_path / "checkpoint.pt").exists()
    resumed = Trainer(base_config(corpus, tmp_path))
    assert resumed.step == RESUME_AT
    rest = resumed.run()
    assert [r["step"] for r in rest] == list(range(RESUME_AT + 1, STEPS + 1))
    assert losses(first) + losses(rest) == losses(history_a)  # exact, on CPU
    assert [r["grad_norm"] for r in first + rest] == [r["grad_norm"] for r in history_a]
    assert [r["loss"] for r in read_log(tmp_path)] == losses(history_a)  # the log continues, not restarts
    state_a, state_b = trainer_a.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_fresh_run_replaces_an_old_log(corpus, tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 99}\n')
    trainer = Trainer(base_config(corpus, tmp_path, steps=1, warmup_steps=0))
    assert trainer.step == 0 and not (tmp_path / "log.jsonl").exists()


def test_micro_batches_accumulate_to_the_full_batch(tmp_path):
    """Same global batch as one forward or as micro batches of 1: the same losses (loss normalised by the global
    batch's loss tokens, also when SFT masks give the micro batches different token counts)."""
    messages = [[{"role": "user", "content": f"q{i}" * (i + 1)}, {"role": "assistant", "content": "ok " * (i + 2)}]
                for i in range(6)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in messages), encoding="utf-8")
    runs = []
    for micro in (0, 1):
        cfg = base_config(tmp_path, tmp_path / f"m{micro}", data=[str(data)], steps=2, micro_batch_size=micro,
                          autocast=False, data_order="sequential")
        trainer = Trainer(cfg)
        runs.append([trainer.train_step() for _ in range(2)])
    whole, micro = runs
    # step 1 (same weights): fp32 reassociation only
    assert whole[0]["loss"] == pytest.approx(micro[0]["loss"], rel=1e-5)
    assert whole[0]["grad_norm"] == pytest.approx(micro[0]["grad_norm"], rel=1e-4)
    # step 2: Muon's bf16 Newton-Schulz turns ~1e-7 gradient differences into bf16-rounding-sized update
    # differences, so only close (a normalisation bug would be off by far more)
    assert whole[1]["loss"] == pytest.approx(micro[1]["loss"], abs=1e-2)
    assert all(r["batchhet"] > 0 for r in micro)


def test_routed_experts_backward_is_bit_reproducible_with_two_threads():
    from trinity.kernels.moe import experts_reference

    g = torch.Generator().manual_seed(0)
    t, e, k, h, i = 256, 32, 4, 128, 32
    x0 = torch.randn(t, h, generator=g)
    gate_up, down = torch.randn(e, 2 * i, h, generator=g) * 0.1, torch.randn(e, h, i, generator=g) * 0.1
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)

    def input_grad():
        x = x0.clone().requires_grad_()
        experts_reference(x, weights, ids, gate_up, down).square().sum().backward()
        return x.grad

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = input_grad()
        assert all(torch.equal(first, input_grad()) for _ in range(5))
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- export

def test_export_loads_in_transformers_with_the_same_logits(full_run):
    transformers = pytest.importorskip("transformers")
    trainer, _, out = full_run
    export = out / "export"
    assert (export / "config.json").exists() and (export / "tokenizer.json").exists()
    ours = TrinityForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    hf = transformers.AfmoeForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    ids = torch.tensor([trainer.tokenizer.encode("the cat sat on the mat. a dog ran")])
    with torch.no_grad():
        a = ours(ids)
        b = hf(ids).logits
        trained = trainer.model.eval()(ids)
    scale = a.abs().max().item()
    assert (a - b).abs().max().item() <= 1e-4 * scale
    assert (a - trained).abs().max().item() <= 1e-5 * scale  # the export is the trained model


def test_llm_generates_from_the_export(full_run):
    trainer, _, out = full_run
    llm = LLM(str(out / "export"), max_num_seqs=2, seed=0)
    prompt = trainer.tokenizer.encode("the cat sat")
    result = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0.0, max_tokens=8,
                                                                                    ignore_eos=True))
    tokens = result[0].outputs[0].token_ids
    assert len(tokens) == 8
    # greedy decoding by hand with the same weights
    model = TrinityForCausalLM.from_pretrained(out / "export", dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert tokens == ids[len(prompt):]
    assert result[0].outputs[0].text == trainer.tokenizer.decode(tokens)


def test_export_in_bf16_is_half_the_size_and_keeps_the_model(full_run, tmp_path):
    """export_dtype = "bfloat16" stores the weights in bf16 (the built-in model's size budget counts stored bytes);
    loaded for the CPU it computes in fp32 with the trained tensors rounded to bf16, and predicts like the fp32
    export."""
    from safetensors import safe_open

    trainer, _, out = full_run
    trainer.cfg.export_dtype = "bfloat16"
    try:
        trainer.export(str(tmp_path / "bf16"))
    finally:
        trainer.cfg.export_dtype = None
    fp32_file, bf16_file = out / "export" / "model.safetensors", tmp_path / "bf16" / "model.safetensors"
    with safe_open(str(bf16_file), "pt") as f:
        file_dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert "BF16" in file_dtypes and json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] \
        in ("bfloat16", "torch.bfloat16")
    assert bf16_file.stat().st_size < 0.6 * fp32_file.stat().st_size
    fp32 = TrinityForCausalLM.from_pretrained(out / "export", dtype=torch.float32).eval()
    bf16 = TrinityForCausalLM.from_pretrained(tmp_path / "bf16", device="cpu").eval()
    assert bf16.dtype == torch.float32  # the CPU default: fp32 compute from bf16 storage
    # every tensor is the trained one rounded to bf16, or kept as it was (those the model keeps in fp32)
    stored, trained = bf16.state_dict(), fp32.state_dict()
    for name, tensor in trained.items():
        assert torch.equal(stored[name], tensor.bfloat16().float()) or torch.equal(stored[name], tensor), name
    assert sum(not torch.equal(stored[n], t) for n, t in trained.items()) > len(trained) // 2
    ids = torch.tensor([trainer.tokenizer.encode("the cat sat on the mat. a dog ran")])
    with torch.no_grad():
        a, b = fp32(ids), bf16(ids)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9  # the same model, up to rounding
    for wrong in ("float8", "auto"):
        with pytest.raises(ValueError, match="export_dtype"):
            TrainConfig(export_dtype=wrong)


# ---------------------------------------------------------------------------------------------- data parallel

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `trinity train` exactly as `python -m trinity train` runs it, then a record of whether the command left its gloo
# process group up (the test below checks that the command tore it down itself), and a fallback teardown.
DP_WRAPPER = """
import json, os, sys
import torch.distributed as dist
from trinity.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1] + "." + os.environ.get("RANK", "x"), "w") as f:
    json.dump({"initialized_after_main": dist.is_initialized()}, f)
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
sys.exit(code)
"""


DP_MODES = ("fsdp", "ddp")  # `manual` (the first implementation) is checked piecewise below: each launch costs ~9 s
FSDP_FIRST_STEPS = 3  # = warmup_steps of the DP config: a run this long has the same schedule as a 10-step one


@pytest.fixture(scope="module")
def dp_runs(corpus, tmp_path_factory):
    """One process, then two gloo processes (torchrun) in each data-parallel mode; same config and global batch,
    10 steps each. The fsdp run is two launches: FSDP_FIRST_STEPS steps, then a resume from that checkpoint."""
    tmp = tmp_path_factory.mktemp("dp")
    config = tmp / "train.json"
    config.write_text(json.dumps(dict(preset="tiny", data=[str(corpus)], seq_len=32, batch_size=4,
                                      micro_batch_size=2, steps=10, warmup_steps=FSDP_FIRST_STEPS, seed=0,
                                      device="cpu", progress=False, data_order="rsdb", buffer_size=4)),
                      encoding="utf-8")
    wrapper = tmp / "run_train.py"
    wrapper.write_text(DP_WRAPPER, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    states: list[dict] = []

    def launch(tag: str, *args: str) -> str:
        proc = subprocess.run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                               "--master_port", str(free_port()), str(wrapper), str(tmp / f"state-{tag}"), "train",
                               "--config", str(config), *args], env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, f"{tag}: {proc.stderr[-3000:]}"
        states.extend(json.loads((tmp / f"state-{tag}.{rank}").read_text()) for rank in (0, 1))
        return proc.stdout

    single = subprocess.run([sys.executable, "-m", "trinity", "train", "--config", str(config),
                             "--out_dir", str(tmp / "single")], env=env, capture_output=True, text=True, timeout=400)
    assert single.returncode == 0, single.stderr[-3000:]
    launch("fsdp-first", "--out_dir", str(tmp / "fsdp"), "--data_parallel", "fsdp", "--steps", str(FSDP_FIRST_STEPS))
    first_log = read_log(tmp / "fsdp")
    resumed = launch("fsdp-resumed", "--out_dir", str(tmp / "fsdp"), "--data_parallel", "fsdp")
    launch("ddp", "--out_dir", str(tmp / "ddp"), "--data_parallel", "ddp")
    return dict(tmp=tmp, states=states, first_log=first_log, resumed_summary=json.loads(resumed.splitlines()[0]))


@pytest.mark.slow  # dp_runs: a one-process run and three torchrun launches of two processes
@pytest.mark.parametrize("mode", DP_MODES)
def test_two_gloo_processes_match_one_process(dp_runs, mode):
    dp_out, single_out = dp_runs["tmp"] / mode, dp_runs["tmp"] / "single"
    a, b = read_log(dp_out), read_log(single_out)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
    diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    assert diff <= 1e-5, f"{mode}: max |loss difference| over 10 steps: {diff:.3g}"
    for x, y in zip(a, b):
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)  # the norm of the summed gradients
        assert x["maxvio"] == pytest.approx(y["maxvio"], abs=1e-6)  # expert counts summed over ranks
        assert x["batchhet"] == pytest.approx(y["batchhet"], abs=1e-5)  # micro losses gathered from both ranks
    # rank 0 alone writes the log, the checkpoint and the export
    assert (dp_out / "checkpoint.pt").exists() and (dp_out / "export" / "config.json").exists()


def assert_same_tree(a, b, where: str = "") -> None:
    """Same structure and non-tensor values; tensors of the same shape within 1e-5."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype, where
        if a.numel():
            assert (a.float() - b.float()).abs().max().item() <= 1e-5, where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.mark.slow
def test_fsdp_resumes_and_writes_full_checkpoints_and_exports(dp_runs):
    tmp = dp_runs["tmp"]
    single_log = read_log(tmp / "single")
    # the first launch stopped after FSDP_FIRST_STEPS; the second started from its checkpoint, not from scratch
    assert [r["step"] for r in dp_runs["first_log"]] == list(range(1, FSDP_FIRST_STEPS + 1))
    assert dp_runs["resumed_summary"]["first_loss"] == pytest.approx(single_log[FSDP_FIRST_STEPS]["loss"], abs=1e-5)
    # checkpoint: full (unsharded) tensors, the same as one process's, for the model and both optimizers
    sharded = torch.load(tmp / "fsdp" / "checkpoint.pt", map_location="cpu", weights_only=True)
    whole = torch.load(tmp / "single" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert sharded["step"] == whole["step"] == 10
    for key in ("model", "optimizer", "balancer", "data"):
        assert_same_tree(sharded[key], whole[key], key)
    exported = TrinityForCausalLM.from_pretrained(tmp / "fsdp" / "export", dtype=torch.float32).state_dict()
    reference = TrinityForCausalLM.from_pretrained(tmp / "single" / "export", dtype=torch.float32).state_dict()
    assert_same_tree(exported, reference, "export")


@pytest.mark.slow
def test_train_command_tears_down_its_process_group(dp_runs):
    states = dp_runs["states"]
    assert len(states) == 2 * (len(DP_MODES) + 1)
    assert not any(state["initialized_after_main"] for state in states)


# Pieces on two gloo ranks. Muon on FSDP2 shards against Muon on whole tensors: 2-D matrices with even and
# uneven row splits (gathered), stacked experts split evenly (orthogonalised where they are) and unevenly
# (gathered). The `manual` mode's gradient sum, with different gradients on each rank.
PARALLEL_PIECES = """
import json, sys
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from trinity.train.optim import muon_update
from trinity.train.parallel import DataParallel
dist.init_process_group("gloo")
rank = dist.get_rank()
plain = nn.Linear(3, 2)
plain.weight.grad, plain.bias.grad = torch.full((2, 3), 1.0 + rank), torch.full((2,), 10.0 * (rank + 1))
DataParallel(plain, "manual", torch.device("cpu")).sync_gradients()
manual = [plain.weight.grad.tolist(), plain.bias.grad.tolist()]
torch.manual_seed(0)  # the same tensors on both ranks
shapes = {"dense": (5, 6), "router": (8, 6), "a.experts.gate_up_proj": (3, 8, 6), "a.experts.down_proj": (4, 6, 5)}
holder = nn.Module()
for name, shape in shapes.items():
    holder.register_parameter(name.replace(".", "_"), nn.Parameter(torch.randn(shape)))
fully_shard(holder)
result = {}
for name in shapes:
    p = getattr(holder, name.replace(".", "_")).detach()
    update = muon_update(p, name)
    result[name] = {"local_rows": update.to_local().shape[0], "param_rows": p.to_local().shape[0],
                    "diff": (update.full_tensor() - muon_update(p.full_tensor(), name)).abs().max().item()}
with open(sys.argv[1] + "." + str(rank), "w") as f:
    json.dump({"muon": result, "manual": manual}, f)
# Drop every DTensor (and with them the device mesh's groups) and wait for the other rank before tearing down:
# otherwise gloo now and then aborts at interpreter exit ("terminate called without an active exception").
del holder, p, update
import gc; gc.collect()
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow  # a torchrun launch of two processes
def test_muon_on_fsdp_shards_and_the_manual_gradient_sum(tmp_path):
    script = tmp_path / "parallel_pieces.py"
    script.write_text(PARALLEL_PIECES, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(free_port()), str(script), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        out = json.loads((tmp_path / f"out.{rank}").read_text())
        assert out["manual"] == [[[3.0] * 3] * 2, [30.0] * 2]  # summed over the ranks, not averaged
        result = out["muon"]
        assert set(result) == {"dense", "router", "a.experts.gate_up_proj", "a.experts.down_proj"}
        for name, r in result.items():
            assert r["local_rows"] == r["param_rows"], (rank, name)  # the update has the parameter's layout
            assert r["diff"] == 0.0, (rank, name, r["diff"])  # the same numbers as unsharded Muon


# ---------------------------------------------------------------------------------------------- pieces

def test_data_parallel_mode_resolution():
    assert resolve_mode("auto", 1) == resolve_mode("fsdp", 1) == "none"  # one process: nothing to wrap
    assert resolve_mode("auto", 2) == ("fsdp" if fsdp_available() else "ddp")
    assert [resolve_mode(m, 4) for m in ("ddp", "manual")] == ["ddp", "manual"]
    with pytest.raises(ValueError, match="data_parallel 'zero'"):
        resolve_mode("zero", 2)
    with pytest.raises(ValueError, match="allowed auto, fsdp, ddp, manual"):
        TrainConfig(data_parallel="zero")
    assert load_train_config(None, {"data_parallel": "ddp"}).data_parallel == "ddp"


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_agrees_with_torch(max_norm):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(7, 5), (3, 4, 2), (11,)]]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    twins = [torch.nn.Parameter(torch.zeros(p.shape)) for p in params]
    for p, t, grad in zip(params, twins, grads):
        p.grad, t.grad = grad.clone(), grad.clone()
    ours = clip_grad_norm_(params, max_norm)
    theirs = torch.nn.utils.clip_grad_norm_(twins, max_norm)
    assert ours.dtype == torch.float32 and ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for p, t, grad in zip(params, twins, grads):
        torch.testing.assert_close(p.grad, t.grad, rtol=1e-6, atol=0)
        if max_norm > ours.item():  # under the limit: left exactly as they were
            assert torch.equal(p.grad, grad)



def test_lr_scale_shapes():
    cos = TrainConfig(steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_scale(cos, s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_scale(cos, 9) == 1.0 and lr_scale(cos, 10) == pytest.approx(1.0)
    assert lr_scale(cos, 55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_scale(cos, 100) == pytest.approx(0.1)
    assert all(lr_scale(cos, s) >= lr_scale(cos, s + 1) for s in range(10, 100))
    wsd = TrainConfig(steps=100, warmup_steps=0, schedule="wsd", min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_scale(wsd, 0) == 1.0 and lr_scale(wsd, 79) == 1.0
    assert lr_scale(wsd, 90) == pytest.approx(0.5) and lr_scale(wsd, 99) == pytest.approx(0.05)
    const = TrainConfig(steps=10, warmup_steps=2, schedule="constant")
    assert [lr_scale(const, s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_init_like_report():
    cfg = preset("tiny")
    model = TrinityForCausalLM.empty(cfg, torch.float32, "cpu")
    init_like_report_(model, 0)
    std = 0.5 / math.sqrt(cfg.hidden_size)
    for name, p in model.named_parameters():
        if name.endswith(("post_attention_layernorm.weight", "post_mlp_layernorm.weight")):
            assert torch.all(p == 1 / math.sqrt(cfg.num_hidden_layers)), name
        elif name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        elif name.endswith("expert_bias"):
            assert not p.any()
        else:
            assert p.abs().max() <= 3 * std + 1e-7, name
            if p.numel() >= 4096:
                assert p.std().item() == pytest.approx(std * 0.986, rel=0.08), name  # ±3σ truncation: σ·0.986
    again = TrinityForCausalLM.empty(cfg, torch.float32, "cpu")
    init_like_report_(again, 0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_load_train_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('steps = 7\ndata = ["x"]\nbalance = "sign"\n[model]\nnum_experts = 4\n', encoding="utf-8")
    cfg = load_train_config(str(path), {"lr": "1e-3", "autocast": "false", "data": "a,b", "aux_loss_coeff": "5e-05",
                                        "model": '{"num_experts": 16}', "seq_len": "64"})
    assert (cfg.steps, cfg.lr, cfg.autocast, cfg.data, cfg.balance) == (7, 1e-3, False, ["a", "b"], "sign")
    assert cfg.aux_loss_coeff == 5e-05 and cfg.model == {"num_experts": 16} and cfg.seq_len == 64
    with pytest.raises(ValueError, match="unknown training option"):
        load_train_config(None, {"stepz": "3"})
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_a_config_extends_another_and_changes_only_what_it_names(tmp_path):
    (tmp_path / "base.toml").write_text('steps = 7\nlr = 1e-3\n[model]\nnum_experts = 4\nhidden_size = 64\n',
                                        encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "stage.toml").write_text('extends = "../base.toml"\nsteps = 3\n[model]\nnum_experts = 8\n',
                                                 encoding="utf-8")
    cfg = load_train_config(str(tmp_path / "sub" / "stage.toml"), {"lr": "2e-3"})
    assert (cfg.steps, cfg.lr, cfg.model) == (3, 2e-3, {"num_experts": 8, "hidden_size": 64})
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n', encoding="utf-8")
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="loops back"):
        load_train_config(str(tmp_path / "a.toml"), {})
    # the shipped second GRPO stage is the first with its own few changes
    first, second = (load_train_config(str(ROOT / "configs" / name), {})
                     for name in ("tiny_grpo.toml", "tiny_grpo_json.toml"))
    assert (second.steps, second.json_reward, second.init_from) == (10, "exact", first.export_dir)
    assert (second.group_size, second.lr, second.kl_coeff) == (first.group_size, first.lr, first.kl_coeff)


def test_cli_train_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    code = cli_main(["train", "--data", str(bad), "--out_dir", str(tmp_path / "o"), "--progress", "false"])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2" in err and "Traceback" not in err
    assert cli_main(["train", "--steps", "3"]) == 2
    assert "no training data" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(bad), "--nonsense", "1"]) == 2
    assert "unknown training option" in capsys.readouterr().err
