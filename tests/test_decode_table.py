"""The CUDA-graph decode forward (`engine.cuda_graphs.DecodeTable`: one int32 table per batch, attention by block
table, padding rows) against the eager runner, without a GPU: the forward runs uncaptured through the Triton
kernels under the interpreter (`TRITON_INTERPRET=1 pytest tests/test_decode_table.py`, the second step of
`make test`). On a GPU, tests/test_gpu_engine.py checks the captured graphs themselves."""

from __future__ import annotations

import pytest
import torch

from trinity import TrinityForCausalLM, preset
from trinity.engine import EngineConfig, LLMEngine, SamplingParams
from trinity.engine.cuda_graphs import DecodeTable, buckets_up_to
from trinity.kernels import interpreting, triton_importable
from trinity.kernels.launch_counter import count_by_layer

pytestmark = pytest.mark.skipif(not (interpreting() and triton_importable()),
                                reason="runs the Triton path under the interpreter (TRITON_INTERPRET=1)")


@pytest.fixture(autouse=True)
def _triton_kernels(monkeypatch):
    monkeypatch.setenv("TRINITY_KERNELS", "triton")
    monkeypatch.setenv("TRINITY_CPU_NATIVE", "0")  # the GPU path's linears: one library GEMM each


def _model(dtype: torch.dtype) -> TrinityForCausalLM:
    model = TrinityForCausalLM.random(preset("tiny"), seed=2)  # window 8, block size 4 below: windows move past blocks
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(6.0)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_forward_equals_the_eager_runner(dtype):
    """Every decode step of three sequences (prompts shorter and longer than the window; one finishing early, so
    the batch shrinks and padding rows appear in the bucket) is also run through the table forward: same logits."""
    engine = LLMEngine(_model(dtype), None, EngineConfig(max_model_len=96, max_num_seqs=4, block_size=4,
                                                         num_kv_blocks=40, enforce_eager=True,
                                                         async_scheduling=False))
    runner = engine.runner
    table = DecodeTable(runner, 4, 96, runner.scratch_slots)
    host = table.new_host_table(pin=False)
    eager_execute = runner.execute
    compared = []

    def execute(step, input_tokens=None):
        if step.decode_only:
            n = len(step.seqs)
            b = next(size for size in buckets_up_to(4) if size >= n)
            want = eager_execute(step, input_tokens)  # applies the step's table changes first
            table.load(host, step, b)
            with torch.inference_mode():
                got = table.forward(b)[:n].float()  # rewrites the same K/V: same values
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=0)
            compared.append((n, b))
            return want
        return eager_execute(step, input_tokens)

    runner.execute = execute
    for i, (prompt, new) in enumerate([(5, 4), (19, 10), (3, 10)]):  # both long ones move past the window of 8
        engine.add_request(str(i), prompt_token_ids=list(range(10 + i, 10 + i + prompt)),
                           params=SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert len(compared) >= 8
    assert (3, 4) in compared and (2, 2) in compared  # a padded bucket, then the batch after one finished


def test_table_forward_launches():
    """The whole graph-captured forward at batch 1: each layer's kernels as tests/test_launch_count.py counts them
    in an eager step, and only a few around the layers (no per-position slot tensors: the kernel reads block
    tables)."""
    from test_launch_count import DENSE_LAYER_BUDGET, MOE_LAYER_BUDGET
    engine = LLMEngine(_model(torch.bfloat16), None, EngineConfig(max_model_len=96, max_num_seqs=1, block_size=4,
                                                                  num_kv_blocks=40, enforce_eager=True,
                                                                  async_scheduling=False))
    engine.add_request("a", prompt_token_ids=list(range(10, 30)),
                       params=SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    engine.step()
    table = DecodeTable(engine.runner, 1, 96, engine.runner.scratch_slots)
    host = table.new_host_table(pin=False)
    step = engine.scheduler.schedule().step
    engine.runner.apply_changes(step)
    table.load(host, step, 1)
    with torch.inference_mode():
        table.forward(1)  # compiles and caches
        counter = count_by_layer(engine.model, lambda: table.forward(1))
    cfg = engine.model.config
    for i in range(cfg.num_hidden_layers):
        budget = MOE_LAYER_BUDGET if cfg.is_moe_layer(i) else DENSE_LAYER_BUDGET
        assert counter.count(f"layer{i}") <= budget, (i, counter.names(f"layer{i}"))
    # the embedding + muP scale + first norm kernel, the RoPE table gather, the count-mask cast, the head: the token
    # and position columns go in as int32, uncast
    assert dict(counter.names("")) == {"triton:_embed_rms_norm_kernel": 1, "aten:index_select": 1, "aten:to": 1,
                                       "aten:linear": 1}
    assert counter.syncs() == 0
