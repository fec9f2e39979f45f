"""The engine end to end on a CUDA device: the Triton path equals the pure-torch references, and CUDA-graph
decode equals eager decode (tokens, log-probabilities and expert-load telemetry). Skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from trinity.engine import EngineConfig, LLMEngine, SamplingParams
from trinity.kernels import interpreting, triton_importable, use_reference

from engine_helpers import random_prompts, tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or interpreting() or not triton_importable(),
                                 reason="needs a CUDA device with Triton (and no interpreter)")]


def _model(dtype: torch.dtype):
    return copy.deepcopy(tiny_model(seed=3)).to(device="cuda", dtype=dtype)


def _run(model, prompts: list[list[int]], max_tokens: int | list[int], *, enforce_eager: bool,
         max_num_seqs: int = 16, logprobs: int | None = None, async_scheduling: bool | None = None):
    engine = LLMEngine(model, None, EngineConfig(max_model_len=512, max_num_seqs=max_num_seqs,
                                                 max_num_batched_tokens=512, num_kv_blocks=256,
                                                 enforce_eager=enforce_eager, async_scheduling=async_scheduling))
    for i, p in enumerate(prompts):
        n = max_tokens[i] if isinstance(max_tokens, list) else max_tokens
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=logprobs)
        engine.add_request(str(i), prompt_token_ids=p, params=params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [done[str(i)] for i in range(len(prompts))], engine


def test_triton_path_equals_reference_path_64_tokens():
    model = _model(torch.float32)
    prompts = random_prompts([5, 17, 40, 64, 3, 100], seed=11)
    fast, _ = _run(model, prompts, 64, enforce_eager=True)
    use_reference(True)
    try:
        ref, _ = _run(model, prompts, 64, enforce_eager=True)
    finally:
        use_reference(None)
    assert [o.token_ids for o in fast] == [o.token_ids for o in ref]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_eager(dtype):
    model = _model(dtype)
    # 3, 5 and 11 sequences at once: every batch is padded up to a bucket (4, 8, 16)
    for n in (3, 5, 11):
        prompts = random_prompts([7 + 13 * i % 90 for i in range(n)], seed=n)
        eager, eager_engine = _run(model, prompts, 64, enforce_eager=True, logprobs=2)
        graphed, graph_engine = _run(model, prompts, 64, enforce_eager=False, logprobs=2)
        assert eager_engine.runner.graphs is None
        assert graph_engine.runner.graphs is not None and graph_engine.runner.graphs.replays >= 60
        assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
        for g, e in zip(graphed, eager):
            got = torch.tensor([pos[t].logprob for pos, t in zip(g.logprobs, g.token_ids)])
            want = torch.tensor([pos[t].logprob for pos, t in zip(e.logprobs, e.token_ids)])
            torch.testing.assert_close(got, want, atol=1e-4 if dtype == torch.float32 else 5e-2, rtol=0)
        # padding rows are masked out of the expert-load telemetry: the same number of choices per layer, and
        # (up to rare top-k flips from batch-size-dependent rounding) the same experts
        got, want = graph_engine.expert_tokens_total, eager_engine.expert_tokens_total
        assert got.sum(dim=1).tolist() == want.sum(dim=1).tolist()
        assert (got - want).abs().sum().item() <= 0.01 * want.sum().item()


def test_lookahead_with_graphs_equals_plain_eager_steps():
    """Look-ahead decoding (on by default on CUDA) queues each graph replay before the previous step's tokens
    are read, feeding them on the device; sequences end at different steps, so queued rows get dropped."""
    model = _model(torch.float32)
    prompts = random_prompts([9, 30, 4, 61, 17], seed=21)
    lengths = [40, 7, 64, 23, 1]
    plain, plain_engine = _run(model, prompts, lengths, enforce_eager=True, async_scheduling=False, logprobs=1)
    ahead, ahead_engine = _run(model, prompts, lengths, enforce_eager=False, logprobs=1)
    assert ahead_engine.async_scheduling and ahead_engine.stats()["num_lookahead_steps"] >= 50
    assert plain_engine.stats()["num_lookahead_steps"] == 0
    assert [o.token_ids for o in ahead] == [o.token_ids for o in plain]
    assert [len(o.token_ids) for o in ahead] == lengths
    for g, e in zip(ahead, plain):
        got = torch.tensor([pos[t].logprob for pos, t in zip(g.logprobs, g.token_ids)])
        want = torch.tensor([pos[t].logprob for pos, t in zip(e.logprobs, e.token_ids)])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
