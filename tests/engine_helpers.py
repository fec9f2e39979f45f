"""Shared helpers for the engine tests: small sharpened random models, a scripted model, references."""

from __future__ import annotations

import functools
import random
import sys

import torch

from trinity import TrinityForCausalLM, preset
from trinity.generate import GenerationParams, generate


def sharpened(model: TrinityForCausalLM, scale: float) -> TrinityForCausalLM:
    """Scale every matrix so the random model's next-token distribution is peaked (stable argmax)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    return model.eval()


_MODELS: dict[str, TrinityForCausalLM] = {}


def tiny_model(seed: int = 0, scale: float = 8.0, **overrides) -> TrinityForCausalLM:
    """A cached tiny fp32 random model (do not mutate it)."""
    key = repr((seed, scale, sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = sharpened(TrinityForCausalLM.random(preset("tiny", **overrides), seed=seed), scale)
    return _MODELS[key]


def run_llm_both_ways(request, monkeypatch) -> bool:
    """For a parametrized autouse fixture: the calling test module's `LLM` builds engines with look-ahead
    decoding on or off (request.param), so the module's tests check both give the same results. Look-ahead is on
    by default only on CUDA; here it is forced on the CPU."""
    from trinity.engine import LLM

    monkeypatch.setattr(sys.modules[request.module.__name__], "LLM",
                        functools.partial(LLM, async_scheduling=request.param))
    return request.param


def random_prompts(lengths, seed: int = 0, low: int = 10, high: int = 266) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(n)] for n in lengths]


def reference_greedy(model: TrinityForCausalLM, prompt: list[int], max_tokens: int) -> list[int]:
    """The contiguous-cache reference decode loop (no stop tokens)."""
    return generate(model, [prompt], GenerationParams(max_tokens=max_tokens, temperature=0))[0]


@torch.inference_mode()
def reference_logprobs(model: TrinityForCausalLM, ids: list[int]) -> torch.Tensor:
    """log_softmax of the whole-sequence forward, [T, V] (row t scores token t + 1)."""
    return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def assert_pools_free(engine) -> None:
    kv = engine.kv
    assert kv.full.num_free == kv.full.num_blocks, (kv.full.num_free, kv.full.num_blocks)
    assert kv.sliding.num_free == kv.sliding.num_blocks, (kv.sliding.num_free, kv.sliding.num_blocks)
    assert kv.full._holders == {} and kv.sliding._holders == {}
    assert kv._seqs == {} and kv.full_manager.tables == {} and kv.sliding_manager.tables == {}
    stats = engine.stats()
    assert stats["kv_blocks"]["full"]["used"] == 0
    assert stats["kv_blocks"]["sliding"]["used"] == 0


class ScriptedModel(TrinityForCausalLM):
    """Ignores attention: the logits of a row are `table[input token]` (set with `script`), so the next
    token depends only on the current one. Lets the engine's stop logic be tested with exact tokens."""

    table: torch.Tensor

    def forward(self, input_ids, positions=None, attn=None, logits_indices=None):
        if input_ids.dim() == 2:
            return self.table[input_ids]
        rows = input_ids if logits_indices is None else input_ids[logits_indices]
        return self.table[rows]


def scripted_model(successors: dict[int, int] | None = None, default: int | None = None,
                   second: dict[int, int] | None = None, vocab: int = 512) -> ScriptedModel:
    """Next token after t is successors.get(t, default) (logit 10); `second[t]` gets logit 5; the rest 0."""
    cfg = preset("tiny", vocab_size=vocab)
    model = ScriptedModel.random(cfg, seed=0)
    table = torch.zeros(vocab, vocab)
    for t in range(vocab):
        nxt = (successors or {}).get(t, default)
        if nxt is not None:
            table[t, nxt] = 10.0
        if second and t in second:
            table[t, second[t]] = 5.0
    model.table = table
    return model.eval()


def byte_ids(tok, text: str) -> list[int]:
    """Ids of the merge-free byte-level tokenizer: one id per UTF-8 byte."""
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    return ids


def chain(tok, text: str) -> dict[int, int]:
    """Successor map that spells `text` after its first byte (each byte must occur once)."""
    ids = byte_ids(tok, text)
    assert len(set(ids)) == len(ids), text
    return dict(zip(ids, ids[1:]))
