"""GPU decode benchmark: Nano- and Mini-shaped random bf16 models against the bandwidth roofline.

    PYTHONPATH=src python3 benchmarks/decode_gpu.py [--models nano,mini] [--skip-hf]
    PYTHONPATH=src python3 benchmarks/decode_gpu.py --smoke      # tiny preset on CPU: checks the script runs

For each model (random weights built on the GPU, no checkpoint): copy bandwidth measured in the same run;
batch-1 decode tok/s at 1K and 8K context with the fraction of the roofline (bytes read per token / copy
bandwidth); aggregate decode tok/s at batch 8, 32, 64 (while the whole batch decodes); time to first token for
2K and 8K prompts; what the CUDA graphs, the look-ahead and the last-program epilogues (kernels/last_program.py)
are each worth, by runs without them, and what programmatic dependent launch (kernels/pdl.py) is worth, by a run
with it; and HF transformers `generate` at batch 1 and 16 on the same weights.
Prints a table, then one JSON object last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from trinity import TrinityForCausalLM, preset  # noqa: E402
from trinity.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from trinity.kernels import last_program, pdl  # noqa: E402


def release(device: torch.device) -> None:
    """Free what deleted engines held: an engine's runner and its CUDA graphs refer to each other, so only the
    cycle collector frees them (without it the next model found its KV budget taken)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def progress(name: str, what: str, value) -> None:
    """Each figure as soon as it is measured (stderr, flushed): a run cut off by a time limit keeps what it got."""
    print(f"[{name}] {what}: {value}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * 10 / (time.perf_counter() - start)


def bytes_per_step(cfg, dtype_bytes: int, context: int, batch: int = 1) -> float:
    """The least a decode step of `batch` sequences at `context` must read: every weight it uses once (the embedding
    aside: one row per token) and each sequence's KV. The routed experts are those any token chose: with the
    uniform routing of random weights, E * (1 - (1 - k/E)^B) distinct experts per MoE layer (k at batch 1, nearly
    all of them at 64), so the roofline of a batch is `batch` tokens per this many bytes."""
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    distinct = e * (1 - (1 - k / e) ** batch)
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    weights = cfg.num_parameters(active_only=True) - cfg.vocab_size * cfg.hidden_size \
        + cfg.num_moe_layers * (distinct - k) * expert
    kv_layers = sum(min(context, cfg.sliding_window) if cfg.is_sliding_layer(i) else context
                    for i in range(cfg.num_hidden_layers))
    return weights * dtype_bytes + batch * kv_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


def bytes_per_token(cfg, dtype_bytes: int, context: int) -> float:
    """Batch 1: the active weights plus the KV cache the token attends over."""
    return bytes_per_step(cfg, dtype_bytes, context, 1)


def decode_rate(engine: LLMEngine, batch: int, context: int, new_tokens: int, vocab: int,
                trial: int = 0) -> tuple[float, float]:
    """(decode tok/s while the whole batch decodes, time to first token of the batch).

    The decode rate is counted from the step at which every sequence has its first token to the end: the
    tokens generated in that window over its duration. Counting from the first sequence's first token instead
    mixes the prefill of the rest of the batch into a decode figure (at batch 64 x 1K, 7 prefill chunks of
    ~80 ms on Mini). `trial` draws other prompts (repeats measure fresh prompts, never a cached prefix)."""
    g = torch.Generator().manual_seed(batch * 7919 + context + 104729 * trial)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i in range(batch):
        ids = torch.randint(0, vocab, (context,), generator=g).tolist()
        engine.add_request(f"b{batch}-c{context}-t{trial}-{i}", prompt_token_ids=ids, params=params)
    device = engine.model.device
    start = time.perf_counter()
    first = all_started = None
    generated: dict[str, int] = {}
    at_all_started = 0
    while engine.has_unfinished():
        # no device sync per step: a step returns once its tokens are on the host, and with look-ahead the next
        # step is already queued, which a sync here would drain
        outs = engine.step()
        for o in outs:
            generated[o.request_id] = len(o.outputs[0].token_ids)
        if first is None and generated:
            first = time.perf_counter()
        if all_started is None and len(generated) == batch:
            all_started, at_all_started = time.perf_counter(), sum(generated.values())
    sync(device)
    end = time.perf_counter()
    return (sum(generated.values()) - at_all_started) / max(end - all_started, 1e-9), first - start


def hf_sharing_weights(model: TrinityForCausalLM):
    """HF transformers' AfmoeForCausalLM over the *same* GPU tensors (built on the meta device, then assigned
    our parameters, whose names and stacked-expert layout are HF's): Mini in bf16 is 52 GB, two copies do not
    fit on one 80 GB card, and writing it to disk for `from_pretrained` would take minutes."""
    import transformers

    from trinity.model.checkpoint import hf_tensors

    with tempfile.TemporaryDirectory() as d:
        model.config.save_pretrained(d)
        hf_config = transformers.AutoConfig.from_pretrained(d)
    with torch.device("meta"):
        hf = transformers.AfmoeForCausalLM._from_config(hf_config, dtype=model.dtype)
    hf.load_state_dict(dict(hf_tensors(model, expert_layout="stacked")), strict=False, assign=True)
    device = model.device
    # modules left with meta buffers (the RoPE tables are non-persistent): build them again on the device
    for name, module in list(hf.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "config"):
                raise RuntimeError(f"HF module {name} has buffers without values")
            with torch.device(device):
                fresh = type(module)(module.config)
            parent_name, _, child = name.rpartition(".")
            setattr(hf.get_submodule(parent_name) if parent_name else hf, child, fresh)
    leftover = [n for n, p in hf.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"HF parameters without weights: {leftover[:5]}")
    return hf.eval()


def hf_rate(hf, batch: int, context: int, new_tokens: int, vocab: int, device) -> float:
    ids = torch.randint(0, vocab, (batch, context), device=device)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        sync(device)
        start = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, eos_token_id=None, pad_token_id=0)
        sync(device)
    return batch * new_tokens / (time.perf_counter() - start)


def bench_model(name: str, cfg, device, args) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = TrinityForCausalLM.random(cfg, dtype=dtype, device=device, seed=0)
    sync(device)
    bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 26))
    contexts = (1024, 8192) if not args.smoke else (64, 256)
    batches = (8, 32, 64) if not args.smoke else (2, 4)
    ttft_prompts = (2048, 8192) if not args.smoke else (64, 256)
    longest = max(contexts + ttft_prompts) + args.new_tokens + 16
    engine = LLMEngine(model, None, EngineConfig(max_model_len=longest, max_num_seqs=max(batches),
                                                 max_num_batched_tokens=max(8192, longest), seed=0))
    out = {"model": name, "params_b": round(cfg.num_parameters() / 1e9, 3),
           "copy_bandwidth_gb_s": round(bw / 1e9, 1), "batch1": {}, "batched": {}, "ttft_ms": {}}
    for ctx in contexts:
        rate, _ = decode_rate(engine, 1, ctx, args.new_tokens, cfg.vocab_size)
        roofline = bw / bytes_per_token(cfg, model.dtype.itemsize, ctx)
        out["batch1"][str(ctx)] = {"tok_s": round(rate, 1), "roofline_tok_s": round(roofline, 1),
                                   "fraction": round(rate / roofline, 3)}
        progress(name, f"batch 1 @ {ctx}", out["batch1"][str(ctx)])
    out["batched_roofline_tok_s"] = {}
    for batch in batches:
        ctx = 1024 if not args.smoke else 64
        rate, _ = decode_rate(engine, batch, ctx, args.new_tokens, cfg.vocab_size)
        out["batched"][str(batch)] = round(rate, 1)
        out["batched_roofline_tok_s"][str(batch)] = round(batch * bw / bytes_per_step(cfg, model.dtype.itemsize, ctx,
                                                                                      batch), 1)
        progress(name, f"batch {batch} tok/s (roofline)", (out["batched"][str(batch)],
                                                            out["batched_roofline_tok_s"][str(batch)]))
    for prompt in ttft_prompts:
        # the median of 3 fresh prompts: one prefill is a single ~0.1 s sample, open to a stray host hiccup
        ttft = statistics.median(decode_rate(engine, 1, prompt, 2, cfg.vocab_size, trial)[1]
                                  for trial in range(3))
        out["ttft_ms"][str(prompt)] = round(ttft * 1e3, 1)
        progress(name, f"TTFT {prompt} ms", out["ttft_ms"][str(prompt)])
    del engine
    release(device)
    if args.skip_baselines:
        return finish(out, model, device, args)
    # batch 1 and 64 with plain steps (each step's tokens read before the next is prepared): what look-ahead is worth
    plain = LLMEngine(model, None, EngineConfig(max_model_len=2048, max_num_seqs=max(batches),
                                                max_num_batched_tokens=8192, seed=0, async_scheduling=False))
    ctx = 1024 if not args.smoke else 64
    out["no_lookahead_tok_s"] = {str(b): round(decode_rate(plain, b, ctx, args.new_tokens, cfg.vocab_size)[0], 1)
                                 for b in (1, max(batches))}
    del plain
    release(device)
    # the same batch-1 decode without CUDA graphs: what the graphs are worth
    eager = LLMEngine(model, None, EngineConfig(max_model_len=2048, max_num_seqs=1, max_num_batched_tokens=2048,
                                                seed=0, enforce_eager=True))
    rate, _ = decode_rate(eager, 1, 1024 if not args.smoke else 64, args.new_tokens, cfg.vocab_size)
    out["batch1_eager_1024_tok_s"] = round(rate, 1)
    del eager
    release(device)
    # the same batch-1 graph decode with each last-program epilogue as a launch of its own (split merge, norm
    # steps, router GEMM): what those fusions are worth, against batch1 at 1024
    out["batch1_separate_epilogues_1024_tok_s"] = batch1_with(last_program.enable, False, model, longest,
                                                               contexts[0], args)
    # and with programmatic dependent launch (kernels/pdl.py; off by default until this figure says it pays)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        out["batch1_pdl_1024_tok_s"] = batch1_with(pdl.enable, True, model, longest, contexts[0], args)
    return finish(out, model, device, args)


def batch1_with(switch, setting: bool, model: TrinityForCausalLM, longest: int, context: int, args) -> float:
    """Batch-1 graph decode tok/s with one kernel switch set (`last_program.enable`, `pdl.enable`), then back to
    its default. The engine is sized like the main one (its max_model_len sets the decode attention's key
    splits), for one sequence."""
    switch(setting)
    try:
        engine = LLMEngine(model, None, EngineConfig(max_model_len=longest, max_num_seqs=1,
                                                     max_num_batched_tokens=max(8192, longest), seed=0))
        rate, _ = decode_rate(engine, 1, context, args.new_tokens, model.config.vocab_size)
        del engine
    finally:
        switch(None)
    release(model.device)
    return round(rate, 1)


def finish(out: dict, model: TrinityForCausalLM, device: torch.device, args) -> dict:
    """HF transformers on the same weights (unless skipped). The model itself is freed by `main`, once
    `bench_model` has returned and nothing refers to it."""
    if not args.skip_hf:
        try:
            hf = hf_sharing_weights(model)
            ctx = 1024 if not args.smoke else 64
            vocab = model.config.vocab_size
            out["hf_tok_s"] = {str(b): round(hf_rate(hf, b, ctx, args.hf_new_tokens, vocab, device), 2)
                               for b in (1, 16)}
            del hf
        except Exception as e:  # report, keep the rest of the results
            out["hf_error"] = f"{type(e).__name__}: {e}"[:500]
    release(device)  # what HF left behind
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="nano,mini")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hf-new-tokens", type=int, default=16)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-baselines", action="store_true",
                    help="skip the runs without CUDA graphs and without look-ahead (they show what each is worth)")
    ap.add_argument("--smoke", action="store_true", help="tiny preset on CPU: checks that the script runs")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    names = ["tiny"] if args.smoke else args.models.split(",")
    results = []
    for n in names:
        try:
            results.append(bench_model(n, preset(n), device, args))
            release(device)  # the model is freed only now that bench_model has returned
        except Exception as e:  # one model failing must not lose the other's figures
            import traceback
            traceback.print_exc()
            results.append({"model": n, "error": f"{type(e).__name__}: {e}"[:1000]})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    results_ok = [r for r in results if "error" not in r]
    for r in results_ok:
        print(f"{r['model']}: copy {r['copy_bandwidth_gb_s']} GB/s")
        for ctx, b1 in r["batch1"].items():
            print(f"  batch 1 @ {ctx}: {b1['tok_s']} tok/s = {b1['fraction']:.0%} of {b1['roofline_tok_s']} roofline")
        if "no_lookahead_tok_s" in r:
            print(f"  batch 1 @ 1024 without CUDA graphs: {r['batch1_eager_1024_tok_s']} tok/s")
            print(f"  batch 1 @ {next(iter(r['batch1']))} with the last-program epilogues as separate launches: "
                  f"{r['batch1_separate_epilogues_1024_tok_s']} tok/s")
            if "batch1_pdl_1024_tok_s" in r:
                print(f"  batch 1 @ {next(iter(r['batch1']))} with programmatic dependent launch: "
                      f"{r['batch1_pdl_1024_tok_s']} tok/s")
            print(f"  without look-ahead, by batch: {r['no_lookahead_tok_s']} tok/s")
        print(f"  batched: {r['batched']} tok/s (rooflines {r['batched_roofline_tok_s']}); TTFT {r['ttft_ms']} ms; HF {r.get('hf_tok_s', r.get('hf_error'))}")
    print(json.dumps({"benchmark": "decode_gpu", "device": torch.cuda.get_device_name(device)
                      if device.type == "cuda" else "cpu", "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
