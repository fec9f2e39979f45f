"""The `trinity` command, run for real in a subprocess."""

import json
import subprocess
import sys

import torch

from trinity import TrinityForCausalLM
from trinity.tokenizer import TrinityTokenizer


def trinity(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "trinity", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_init_writes_a_loadable_checkpoint_with_tokenizer(tmp_path):
    out = tmp_path / "tiny"
    r = trinity("init", "--preset", "tiny", "--out", str(out), "--dtype", "bfloat16", "--max-shard-size", "300KB")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / "model.safetensors.index.json").exists()
    model = TrinityForCausalLM.from_pretrained(out, dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    assert TrinityTokenizer.from_pretrained(out).token_to_id("<|im_end|>") is not None


def test_generate_greedy_is_deterministic_and_matches_library(tmp_path):
    out = tmp_path / "tiny"
    assert trinity("init", "--preset", "tiny", "--out", str(out), "--seed", "3").returncode == 0
    args = ("generate", "--model", str(out), "--prompt", "Hello there", "--max-tokens", "12", "--temperature", "0")
    first, second = trinity(*args), trinity(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout

    from trinity.generate import GenerationParams, generate
    from trinity.loading import load_model

    loaded = load_model(str(out), device="cpu")
    ids = generate(loaded.model, [loaded.tokenizer.encode("Hello there")],
                   GenerationParams(max_tokens=12, temperature=0, stop_token_ids=loaded.stop_token_ids))[0]
    ids = [t for t in ids if t not in loaded.stop_token_ids]
    assert first.stdout == loaded.tokenizer.decode(ids, skip_special_tokens=True) + "\n"


def test_chat_reads_turns_until_exit():
    r = trinity("chat", "--model", "tiny", "--max-tokens", "5", "--seed", "0", stdin="hello\n/reset\nagain\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "trinity chat" in r.stdout and r.stdout.count("> ") >= 3


def test_bad_model_and_bad_sampling_values_give_one_line_errors(tmp_path):
    r = trinity("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x")
    assert r.returncode == 2
    assert "neither a local checkpoint folder nor a preset" in r.stderr and "Traceback" not in r.stderr
    r = trinity("generate", "--model", "tiny", "--prompt", "x", "--top-p", "1.5")
    assert r.returncode == 2 and "top_p = 1.5" in r.stderr and "Traceback" not in r.stderr
