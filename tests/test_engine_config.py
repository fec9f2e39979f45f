"""EngineConfig, defined once: `trinity serve`'s flags and `LLM(...)`'s keywords are derived from its fields, with
the same names and defaults as before (vLLM's spellings), and bad values are refused with a message that says what
is allowed."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import subprocess
import sys

import pytest

from trinity.engine.config import EngineConfig, EngineConfigError

FIELDS = [f.name for f in dataclasses.fields(EngineConfig)]


def serve_args(*argv: str) -> argparse.Namespace:
    from trinity.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_importing_the_config_loads_no_torch():
    code = "import sys, trinity.engine.config; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_one_definition():
    from trinity import engine
    from trinity.engine import engine as engine_module

    assert engine.EngineConfig is EngineConfig and engine_module.EngineConfig is EngineConfig


def test_every_field_is_a_serve_flag_with_the_same_default():
    assert EngineConfig.from_cli_args(serve_args()) == EngineConfig()
    args = vars(serve_args())
    for name in FIELDS:
        assert name in args, name


@pytest.mark.parametrize("argv,expected", [
    (["--max-model-len", "64"], dict(max_model_len=64)),
    (["--max-num-seqs", "4"], dict(max_num_seqs=4)),
    (["--max-num-batched-tokens", "32"], dict(max_num_batched_tokens=32)),
    (["--block-size", "4"], dict(block_size=4)),
    (["--num-kv-blocks", "20"], dict(num_kv_blocks=20)),
    (["--kv-cache-memory", "1000000"], dict(kv_cache_memory=1000000)),
    (["--gpu-memory-utilization", "0.5"], dict(gpu_memory_utilization=0.5)),
    (["--enforce-eager"], dict(enforce_eager=True)),
    (["--seed", "7"], dict(seed=7)),
    (["--async-scheduling"], dict(async_scheduling=True)),
    (["--no-async-scheduling"], dict(async_scheduling=False)),
    (["--no-enable-prefix-caching"], dict(enable_prefix_caching=False)),
    (["--enable-prefix-caching"], dict(enable_prefix_caching=True)),
])
def test_vllm_flag_spellings(argv, expected):
    assert EngineConfig.from_cli_args(serve_args(*argv)) == EngineConfig(**expected)


def test_a_bad_flag_value_names_the_flag():
    with pytest.raises(EngineConfigError, match=r"--max-num-seqs = 0 is invalid: must be an integer >= 1"):
        EngineConfig.from_cli_args(serve_args("--max-num-seqs", "0"))


def test_serve_reports_a_bad_flag_value_in_one_line():
    r = subprocess.run([sys.executable, "-m", "trinity", "serve", "--block-size", "0"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--block-size = 0 is invalid: must be an integer >= 1" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_new_field_gets_a_flag_and_a_keyword():
    """What a new setting needs: a field with a help text, nothing else."""
    @dataclasses.dataclass(slots=True)
    class Extended(EngineConfig):
        speculative_tokens: int | None = dataclasses.field(default=None, metadata={"help": "draft tokens"})
        fast_mode: bool = dataclasses.field(default=False, metadata={"help": "go fast"})

    parser = argparse.ArgumentParser()
    Extended.add_cli_arguments(parser)
    built = Extended.from_cli_args(parser.parse_args(["--speculative-tokens", "3", "--fast-mode"]))
    assert built.speculative_tokens == 3 and built.fast_mode is True and built.block_size == 16
    assert "speculative_tokens" in [p.name for p in Extended.signature_parameters()]
    assert Extended.from_kwargs(fast_mode=True).fast_mode


def test_llm_keywords_are_the_fields():
    from trinity.engine import LLM

    params = inspect.signature(LLM).parameters
    assert list(params)[:4] == ["model", "tokenizer", "dtype", "device"]
    for f in dataclasses.fields(EngineConfig):
        assert params[f.name].default == f.default and params[f.name].kind is inspect.Parameter.KEYWORD_ONLY


def test_llm_refuses_an_unknown_keyword_listing_the_settings():
    from trinity.engine import LLM

    with pytest.raises(TypeError, match=r"LLM\(\) got unexpected keyword argument\(s\) 'max_num_seq'.*max_num_seqs"):
        LLM("tiny", max_num_seq=4)


def test_llm_passes_the_keywords_through():
    from engine_helpers import tiny_model
    from trinity.engine import LLM

    model = tiny_model(seed=0)

    engine = LLM(model, max_num_seqs=3, block_size=4, num_kv_blocks=16, seed=5, enable_prefix_caching=False).engine
    assert engine.config == EngineConfig(max_num_seqs=3, block_size=4, num_kv_blocks=16, seed=5,
                                         enable_prefix_caching=False)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_num_seqs=0), "max_num_seqs = 0 is invalid: must be an integer >= 1"),
    (dict(max_num_seqs=4.0), "max_num_seqs = 4.0 is invalid: must be an integer >= 1"),
    (dict(block_size=0), "block_size = 0 is invalid: must be an integer >= 1"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens = 0 is invalid"),
    (dict(max_model_len=-1), "max_model_len = -1 is invalid: must be an integer >= 1, or None"),
    (dict(num_kv_blocks=0), "num_kv_blocks = 0 is invalid: must be an integer >= 1, or None"),
    (dict(kv_cache_memory=0), "kv_cache_memory = 0 is invalid: must be a whole number of bytes >= 1"),
    (dict(kv_cache_memory=2e9), "kv_cache_memory = 2000000000.0 is invalid"),
    (dict(seed=1.5), "seed = 1.5 is invalid: must be an integer, or None"),
])
def test_invalid_values(kwargs, message):
    with pytest.raises(EngineConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(max_model_len=0),  # the model's limit, as before
    dict(seed=None), dict(seed=-1), dict(async_scheduling=None), dict(num_kv_blocks=8, kv_cache_memory=0),
    dict(max_num_seqs=1, max_num_batched_tokens=1, block_size=1),
])
def test_values_that_worked_before_still_do(kwargs):
    EngineConfig(**kwargs)
