"""The launch counter, and the number of kernels a decode step's layers launch on the GPU path (counted on the CPU
under Triton's interpreter: `TRITON_INTERPRET=1 pytest tests/test_launch_count.py`, the second step of `make
test`), with the engine's Triton path giving the reference path's tokens."""

from __future__ import annotations

import pytest
import torch

from trinity import TrinityForCausalLM, preset
from trinity.engine import EngineConfig, LLMEngine, SamplingParams
from trinity.kernels import interpreting, triton_importable, use_reference
from trinity.kernels.launch_counter import LaunchCounter, count_decode_step

needs_interpreter = pytest.mark.skipif(not (interpreting() and triton_importable()),
                                       reason="counts the GPU path under Triton's interpreter (TRITON_INTERPRET=1)")


# ------------------------------------------------------------------------------------------ the counter
def test_counter_counts_kernels_not_views_or_allocations():
    x = torch.randn(4, 6)
    with torch.inference_mode(), LaunchCounter() as counter:
        y = x.view(6, 4).t()  # views
        x.reshape(24)  # a view here
        torch.empty(3)  # an allocation
        x.float()  # already fp32: no copy
        z = y.contiguous()  # a copy
        z.mul_(2)  # in place
        torch.add(x, 1)
        torch.cumsum(x, 0, out=torch.empty(4, 6))  # the empty is no kernel, the out= op is
    # under inference mode `contiguous` reaches the dispatcher whole (elsewhere as the clone it does)
    assert [e.name for e in counter.launches] == ["contiguous", "mul_", "add", "cumsum"]


def test_counter_counts_syncs_and_sections():
    x = torch.arange(5)
    with LaunchCounter() as counter:
        with counter.section("a"):
            x.sum().item()
        x + 1
    assert counter.count("a") == 1 and counter.syncs() == 1 and counter.count() == 2


def test_counter_counts_ops_on_tensors_without_storage():
    """oneDNN's packed weights (the CPU's fp32 linears past a few rows) have no storage to compare: their ops
    count as launches instead of failing the count."""
    from trinity.kernels import linear as kernel_linear
    if not kernel_linear.onednn_available():
        pytest.skip("oneDNN not available")
    x, w = torch.randn(32, 64), torch.randn(48, 64)
    with torch.inference_mode():
        kernel_linear.linear(x, w)  # packs the weight (cached) outside the count
        with LaunchCounter() as counter:
            y = kernel_linear.linear(x, w)
    torch.testing.assert_close(y, x @ w.t(), atol=1e-4, rtol=1e-4)
    assert counter.count() >= 1 and counter.syncs() == 0


@needs_interpreter
def test_counter_counts_a_triton_launch_once(monkeypatch):
    from trinity.kernels import norm_triton
    monkeypatch.setenv("TRINITY_KERNELS", "triton")
    x, w = torch.randn(3, 16), torch.ones(16)
    with torch.inference_mode(), LaunchCounter() as counter:
        norm_triton.rms_norm(x, w, 1e-5)
    assert [(e.kind, e.name) for e in counter.launches] == [("triton", "_rms_norm_kernel")]


# ------------------------------------------------------------------------------------------ the engine
def _engine(model, batch: int) -> LLMEngine:
    engine = LLMEngine(model, None, EngineConfig(max_model_len=128, max_num_seqs=batch, num_kv_blocks=32,
                                                 enforce_eager=True, async_scheduling=False))
    for i in range(batch):
        engine.add_request(str(i), prompt_token_ids=list(range(3 + 5 * i, 20 + 5 * i)),
                           params=SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    return engine


def _nano_structure() -> TrinityForCausalLM:
    """Nano's structure (8/2 heads, 128 experts top-8 + shared, 2 dense layers first) at small widths."""
    cfg = preset("nano", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
                 head_dim=16, vocab_size=256, sliding_window=8, max_position_embeddings=256)
    return TrinityForCausalLM.random(cfg, dtype=torch.bfloat16, seed=1)


# Kernels per layer of a small-batch decode step on the GPU path (eager; the CUDA graph holds the same). It was 19
# for a MoE layer before routing, counting and alignment became one kernel, the q/k norm + RoPE, the new K/V
# write and the output gate moved into the attention kernel, the MoE combine and the router's fp32 cast into
# the norm kernels, and then the router GEMM into the routing launch and each norm step into the launch of the
# projection before it (o_proj, down: their last program runs it). A MoE layer is now q/k/v/gate GEMM,
# attention, o_proj + norm, router + routing + alignment, gate_up, down + norm; a dense layer q/k/v/gate GEMM,
# attention, o_proj + norm, gate_up, SwiGLU, down + norm. (With long contexts the decode attention splits its keys;
# the last split merges them, in the same launch: benchmarks/launch_count.py counts that case.)
MOE_LAYER_BUDGET = 6
DENSE_LAYER_BUDGET = 6


@needs_interpreter
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_launches_per_layer(monkeypatch, batch):
    monkeypatch.setenv("TRINITY_KERNELS", "triton")
    monkeypatch.setenv("TRINITY_CPU_NATIVE", "0")  # the GPU path's linears: one library GEMM each
    engine = _engine(_nano_structure(), batch)
    engine.step()
    engine.step()
    counter = count_decode_step(engine)
    cfg = engine.model.config
    for i in range(cfg.num_hidden_layers):
        budget = MOE_LAYER_BUDGET if cfg.is_moe_layer(i) else DENSE_LAYER_BUDGET
        assert counter.count(f"layer{i}") <= budget, (i, counter.names(f"layer{i}"))
    assert not [e for e in counter.launches if e.kind == "sync" and e.section]  # no host sync inside a layer


@needs_interpreter
def test_engine_triton_path_gives_the_reference_tokens(monkeypatch):
    """Decode through the fused kernels (routing + align, gated attention, combine in the norm) against the
    pure-torch references, on the tiny model in fp32."""
    model = TrinityForCausalLM.random(preset("tiny"), seed=5)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)  # a peaked next-token distribution: a stable argmax
    monkeypatch.setenv("TRINITY_KERNELS", "triton")
    fast = _run(_engine(model, 3))
    use_reference(True)
    try:
        ref = _run(_engine(model, 3))
    finally:
        use_reference(None)
    assert fast == ref


@needs_interpreter
def test_engine_triton_path_with_prefix_hits_gives_the_reference_tokens(monkeypatch):
    """Prefix-cache hits through the Triton prefill attention, against the reference path without the cache: a
    16-token window, blocks of 4. The first prompt, in one chunk, writes the blocks its window does not keep for the
    cache alone; the second hits after 8 blocks (reading cached blocks 4-7); the third hits after 9 and lets go of
    adopted blocks as its window moves on."""
    model = TrinityForCausalLM.random(preset("tiny", sliding_window=16), seed=5)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    stem = [(7 * i) % 200 + 10 for i in range(40)]
    prompts = [stem[:37], stem[:33] + [3, 4, 5], stem + [9]]

    def run(caching: bool) -> tuple[list[list[int]], int]:
        engine = LLMEngine(model, None, EngineConfig(max_model_len=128, max_num_seqs=2, block_size=4,
                                                     max_num_batched_tokens=40, enforce_eager=True,
                                                     async_scheduling=False, enable_prefix_caching=caching))
        tokens, logprobs = [], []
        for i, ids in enumerate(prompts):  # one after another, so each later one can hit
            engine.add_request(str(i), prompt_token_ids=ids,
                               params=SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0))
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        c = out.outputs[0]
                        tokens.append(c.token_ids)
                        logprobs += [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
        return tokens, torch.tensor(logprobs), engine.stats()["prefix_cache"]["hit_tokens"]

    monkeypatch.setenv("TRINITY_KERNELS", "triton")
    fast, fast_lp, hits = run(True)
    use_reference(True)
    try:
        ref, ref_lp, _ = run(False)
    finally:
        use_reference(None)
    assert hits == 32 + 36 and fast == ref
    torch.testing.assert_close(fast_lp, ref_lp, atol=1e-4, rtol=0)


def _run(engine: LLMEngine) -> list[list[int]]:
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[k] for k in sorted(done)]


@pytest.mark.script_smoke
@pytest.mark.slow  # the tuning sweep's CPU smoke mode: most of a minute on 2 cores
def test_moe_tuning_script_smoke():
    """benchmarks/tune_moe.py (a GPU sweep) runs end to end in its CPU smoke mode and ends with its JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "tune_moe.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--models", "nano"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["nano"]) == {"1", "2"} and all(r["candidates"] >= 2 for r in result["nano"].values())
    # the prefill-sized crossover: both ways timed (their outputs checked against each other by the script)
    assert [r["tokens"] for r in result["nano_crossover"]] == [16, 64]
    assert all(r["triton_us"] > 0 and r["grouped_mm_us"] > 0 for r in result["nano_crossover"])


@pytest.mark.script_smoke
def test_last_program_benchmark_smoke():
    """benchmarks/last_program_gpu.py (each last-program epilogue against its two launches, on a GPU) runs end to end
    in its CPU smoke mode, every user timed both ways, and ends with its JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "last_program_gpu.py"
    done = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ops = {r["op"].split(" [")[0].split(" 4/")[0] for r in result["results"]}
    assert ops == {"o_proj", "dense down", "decode attention", "router", "MoE layer"}, ops
    assert all(r["fused_us"] > 0 and r["separate_us"] > 0 for r in result["results"])


@pytest.mark.script_smoke
def test_prefill_tuning_script_smoke():
    """benchmarks/tune_prefill.py (the prefill attention's tiles against torch's attention, on a GPU) runs end to end
    in its CPU smoke mode, every case timed with both candidates checked, and ends with its JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "tune_prefill.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--models", "nano"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(c["tokens"], c["window"]) for c in result["cases"]] == [(24, None), (24, 16), (40, None), (40, 16)]
    assert all(c["candidates"] == 2 and c["default_ms"] > 0 and c["torch_sdpa_ms"] > 0 for c in result["cases"])
