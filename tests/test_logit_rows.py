"""The last layer keeps only the rows whose logits are asked for (`TrinityModel.forward(rows=...)`): the same
logits as computing every row and picking afterwards, the same K/V in the cache for every row, and nothing lost
for the steps after it, on the layer-by-layer code and on the chained-norm inference code."""

import pytest
import torch

from trinity import TrinityForCausalLM, preset
from trinity.model import ContiguousKVCache

PROMPT_LENS = [13, 9]


def _model(chained: bool) -> TrinityForCausalLM:
    model = TrinityForCausalLM.random(preset("tiny"), seed=7).eval()
    if chained:
        model.fuse_projections()
    return model


def _cache(model) -> ContiguousKVCache:
    cfg = model.config
    return ContiguousKVCache(cfg.num_hidden_layers, len(PROMPT_LENS), 32, cfg.num_key_value_heads, cfg.head_dim,
                             torch.float32, "cpu")


def _prefill(model, cache, ids, keep):
    step = cache.step(PROMPT_LENS)
    logits = model(ids, cache.positions(PROMPT_LENS, "cpu"), step, logits_indices=keep)
    cache.advance(step)
    return logits


@pytest.mark.parametrize("chained", [False, True])
@pytest.mark.parametrize("keep", [[12, 21], [21], [0, 5, 12, 13, 21], []])
def test_kept_rows_give_the_picked_logits_and_the_whole_cache(chained, keep):
    model = _model(chained)
    ids = torch.randint(0, model.config.vocab_size, (sum(PROMPT_LENS),), generator=torch.Generator().manual_seed(1))
    keep = torch.tensor(keep, dtype=torch.long)
    with torch.inference_mode():
        full_cache, kept_cache = _cache(model), _cache(model)
        want = _prefill(model, full_cache, ids, None)[keep]
        got = _prefill(model, kept_cache, ids, keep)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # every row's keys and values were written, the dropped rows' too, and by the same arithmetic
        assert torch.equal(kept_cache.k, full_cache.k) and torch.equal(kept_cache.v, full_cache.v)
        # so the next step (a decode for each sequence) sees the same context
        nxt = torch.tensor([3, 4])
        after_full = _prefill_decode(model, full_cache, nxt)
        after_kept = _prefill_decode(model, kept_cache, nxt)
    assert torch.equal(after_kept, after_full)


def _prefill_decode(model, cache, tokens):
    step = cache.step([1, 1])
    logits = model(tokens, cache.positions([1, 1], "cpu"), step)
    cache.advance(step)
    return logits


def test_the_last_layer_runs_only_the_kept_rows():
    """What saves the time: the last layer's MLP sees only the kept rows, every earlier layer's sees all."""
    model = _model(chained=True)
    seen: dict[int, int] = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].shape[0]))
    ids = torch.randint(0, model.config.vocab_size, (sum(PROMPT_LENS),), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        _prefill(model, _cache(model), ids, torch.tensor([12, 21]))
    last = len(model.model.layers) - 1
    assert seen[last] == 2  # the last layer is a MoE layer; the dense ones run their MLP without a module call
    assert len(seen) > 2 and all(n == sum(PROMPT_LENS) for i, n in seen.items() if i != last)


def test_benchmark_script_runs_and_agrees():
    """benchmarks/cpu_prefill_rows.py at a small size: both ways give the same logits."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "benchmarks/cpu_prefill_rows.py", "--tokens", "48", "--repeats", "1",
                          "--threads", "1"], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(out["results"]) == 2
    assert all(r["max_logit_diff"] < 1e-4 and r["every_row_ms"] > 0 for r in out["results"])


def test_engine_computes_only_the_sampling_queries_and_loses_nothing():
    """Through the engine's paged attention on the CPU, whose last layer computes only the kept rows' queries:
    the first token's log-probability of each prompt equals the one from a run that keeps every prompt row
    (prompt_logprobs asks for all of them), across chunked prefills where middle chunks sample nothing; and the
    tokens after it agree too, so the K/V of the rows left out were written."""
    import copy

    from engine_helpers import random_prompts, tiny_model

    from trinity.engine import EngineConfig, LLMEngine, SamplingParams

    model = copy.deepcopy(tiny_model(seed=4)).fuse_projections()
    prompts = random_prompts([37, 5, 90, 16], seed=9)

    def run(prompt_logprobs):
        engine = LLMEngine(model, None, EngineConfig(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32,
                                                     num_kv_blocks=64))
        for i, p in enumerate(prompts):
            engine.add_request(str(i), prompt_token_ids=p, params=SamplingParams(
                max_tokens=6, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=prompt_logprobs))
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0]
        return [done[str(i)] for i in range(len(prompts))]

    kept, every = run(None), run(0)
    for a, b in zip(kept, every):
        assert a.token_ids == b.token_ids
        got = torch.tensor([pos[t].logprob for pos, t in zip(a.logprobs, a.token_ids)])
        want = torch.tensor([pos[t].logprob for pos, t in zip(b.logprobs, b.token_ids)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_reference_attention_unbatched_equals_batched():
    """The engine's prefill chunks reach `reference_attention` unbatched ([n, H, D]); it adds a batch dim of 1
    (4x faster on the CPU) and must give what the batched call gives, sliding window and GQA included."""
    from trinity.model.attention import reference_attention, visibility_mask

    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(40, 4, 16, generator=g), torch.randn(40, 2, 16, generator=g), torch.randn(40, 2, 16, generator=g)
    pos = torch.arange(40)
    for window in (None, 7):
        mask = visibility_mask(pos[-9:], pos, window)  # the last 9 queries against every key
        got = reference_attention(q[-9:], k, v, mask, 0.25)
        want = reference_attention(q[None, -9:], k[None], v[None], mask, 0.25)[0]
        assert got.shape == (9, 4, 16)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
