"""What FP8 costs in quality: KL divergence of next-token distributions against the unquantized model.

    .venv/bin/python benchmarks/fp8_quality.py [--prompts 20] [--tokens 64]

The built-in model (fp32) answers `--prompts` chat prompts greedily for `--tokens` tokens; each prompt with its answer
is then scored teacher-forced by the engine (prompt log-probabilities, chunked prefill of 16 tokens, so later chunks
read earlier chunks' keys and values from the KV cache) under five settings: the unquantized reference, FP8 weights
(block 128 x 128, `--quantization fp8`), an FP8 KV cache in e4m3 and in e5m2, and FP8 weights with an e4m3 cache.
For each: the mean KL(reference || setting) over the answer positions, its 99th percentile, and how often the
top-1 token agrees. The engine is the real one; the benchmark reads the full distributions it scores prompts with
(`_record_prompt_logprobs`, subclassed here to keep them).
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from trinity import SamplingParams
from trinity.engine.config import EngineConfig
from trinity.engine.engine import LLMEngine
from trinity.loading import load_model
from trinity.quant.modules import quantize_model
from trinity.quant.scheme import QuantConfig

QUESTIONS = ([f"What is {i * 7 % 50} + {i * 13 % 40}?" for i in range(8)]
             + [f"Tell me about the weather in city {i}." for i in range(4)]
             + ["Write a short sentence about cats.", "What's the time in Tokyo?", "Hello!", "What is 12 * 3?",
                "Search for pasta recipes.", "Name three colours.", "Count to five.", "What is 9 - 4?"])


class ScoringEngine(LLMEngine):
    """The engine, keeping the log-probability rows it scores prompt positions with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept: dict[tuple[str, int], torch.Tensor] = {}

    def _record_prompt_logprobs(self, logits, prompt_rows) -> None:
        raw = torch.log_softmax(logits.float(), dim=-1)
        for i, (seq, position) in enumerate(prompt_rows):
            self.kept[(seq.request_id, position)] = raw[i].cpu()
        super()._record_prompt_logprobs(logits, prompt_rows)


def score(model, tokenizer, texts: list[list[int]], kv_cache_dtype: str) -> dict:
    engine = ScoringEngine(model, tokenizer, EngineConfig(max_num_seqs=8, max_num_batched_tokens=16,
                                                          kv_cache_dtype=kv_cache_dtype))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    for i, ids in enumerate(texts):
        engine.add_request(f"p{i}", prompt_token_ids=ids, params=params)
    while engine.has_unfinished():
        engine.step()
    return engine.kept


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    loaded = load_model("trinity-tiny", dtype="float32", device="cpu")
    tok, model = loaded.tokenizer, loaded.model
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
               for q in QUESTIONS[:args.prompts]]
    from trinity import LLM
    answers = LLM(model, tokenizer=tok).generate(
        prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=args.tokens, temperature=0))
    texts = [p + list(a.outputs[0].token_ids) for p, a in zip(prompts, answers)]
    answer_positions = {(f"p{i}", pos) for i, p in enumerate(prompts) for pos in range(len(p), len(texts[i]))}
    fp8 = quantize_model(copy.deepcopy(model), QuantConfig.online_fp8())
    settings = {"reference": (model, "auto"), "fp8 weights": (fp8, "auto"), "fp8 kv e4m3": (model, "fp8_e4m3"),
                "fp8 kv e5m2": (model, "fp8_e5m2"), "fp8 weights + kv e4m3": (fp8, "fp8_e4m3")}
    kept = {name: score(m, tok, texts, kv) for name, (m, kv) in settings.items()}
    ref = kept["reference"]
    rows = []
    for name in settings:
        if name == "reference":
            continue
        kls, agree = [], 0
        for key in answer_positions:
            p, q = ref[key], kept[name][key]
            kls.append(float((p.exp() * (p - q)).sum()))
            agree += int(p.argmax() == q.argmax())
        kl = torch.tensor(kls)
        rows.append({"setting": name, "positions": len(kls), "kl_mean": round(kl.mean().item(), 6),
                     "kl_p99": round(kl.quantile(0.99).item(), 6), "top1_agreement": round(agree / len(kls), 4)})
    weights = {name: sum(p.numel() * p.element_size() for p in m.parameters()) for name, m in
               (("fp32", model), ("fp8", fp8))}
    print(f"built-in model, {len(texts)} prompts + {args.tokens}-token answers, teacher-forced; weights fp32 "
          f"{weights['fp32'] / 1e6:.1f} MB, fp8 {weights['fp8'] / 1e6:.1f} MB")
    for r in rows:
        print(f"{r['setting']:24} KL mean {r['kl_mean']:.6f}  p99 {r['kl_p99']:.6f}  top-1 agreement "
              f"{r['top1_agreement']:.4f} over {r['positions']} positions")
    print(json.dumps({"benchmark": "fp8_quality", "prompts": len(texts), "tokens": args.tokens,
                      "weight_bytes": weights, "results": rows}))


if __name__ == "__main__":
    main()
