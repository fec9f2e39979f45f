"""How many kernels one decode step launches, per layer: the figure that bounds batch-1 decode under CUDA graphs.

    .venv/bin/python benchmarks/launch_count.py                 # CPU: the GPU path under Triton's interpreter
    PYTHONPATH=src python3 benchmarks/launch_count.py --device cuda   # also the profiler's kernel count

Builds Nano- and Mini-structured models (their head counts, 128 experts top-8, a shared expert, dense + MoE
layers, sliding + full attention) with small widths, since the count depends on the structure only; runs the
engine's GPU kernels (on the CPU through Triton's interpreter), prefills the prompts and counts, with
`trinity.kernels.launch_counter`, the forward a CUDA graph captures for that decode batch (`DecodeTable.forward`:
the graph holds exactly these launches) and one eager engine step (metadata and sampling included). Prints
per-layer counts and the ops of one MoE layer, then one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--device", default=None, help="cuda (default where there is one) or cpu (the interpreter)")
parser.add_argument("--models", default="nano,mini")
parser.add_argument("--batch", type=int, default=1)
args = parser.parse_args()

import torch  # noqa: E402

device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
if device == "cpu":  # before triton is imported: the GPU kernels through the interpreter, no C kernels
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["TRINITY_KERNELS"] = "triton"
    os.environ["TRINITY_CPU_NATIVE"] = "0"

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from trinity import TrinityForCausalLM, preset  # noqa: E402
from trinity.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from trinity.engine.cuda_graphs import DecodeTable  # noqa: E402
from trinity.kernels.launch_counter import count_by_layer, count_decode_step  # noqa: E402


# The context the decode graphs are sized for, as in decode_gpu.py (8K prompts): on a GPU the decode attention
# splits each row's keys by this width (its launch count depends on it: a merge launch follows a split).
MAX_MODEL_LEN = 8192 + 256


def structure(name: str):
    """The model's layer structure (heads, experts, the real sliding window) at small widths: 4 layers, 2 dense
    then 2 MoE, one of them full attention."""
    return preset(name, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
                  head_dim=32, vocab_size=1024, max_position_embeddings=MAX_MODEL_LEN)


def profiled_kernels(run) -> int:
    """How many CUDA kernels the torch profiler records for `run()`: the cross-check of the counter on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def decode_counts(name: str) -> dict:
    config = structure(name)
    model = TrinityForCausalLM.random(config, dtype=torch.bfloat16, device=device)
    engine = LLMEngine(model, None, EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=args.batch, num_kv_blocks=64,
                                                 enforce_eager=True, async_scheduling=False))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(str(i), prompt_token_ids=list(range(3 + i, 43 + i)), params=params)
    engine.step()  # the prefill
    engine.step()  # one decode outside the count: one-off work (caches, compilation) happens here
    eager = count_decode_step(engine)
    # the forward a CUDA graph captures for this batch, from the runner's decode table
    table = DecodeTable(engine.runner, args.batch, MAX_MODEL_LEN, engine.runner.scratch_slots)
    host = table.new_host_table(pin=False)
    step = engine.scheduler.schedule().step
    engine.runner.apply_changes(step)
    table.load(host, step, args.batch)
    with torch.inference_mode():
        table.forward(args.batch)
        counter = count_by_layer(model, lambda: table.forward(args.batch))
        cuda_kernels = profiled_kernels(lambda: table.forward(args.batch)) if device == "cuda" else None
    per_layer = {f"layer{i}": counter.count(f"layer{i}") for i in range(config.num_hidden_layers)}
    moe = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    dense = [i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)]
    return {
        "per_layer": per_layer,
        "moe_layer": per_layer[f"layer{moe[0]}"],
        "dense_layer": per_layer[f"layer{dense[0]}"],
        "outside_layers": counter.count(""),
        "outside_ops": dict(sorted(counter.names("").items())),
        "eager_step_outside_layers": eager.count(""),
        "syncs": counter.syncs(),
        # on a GPU: the device kernels the profiler saw for the same forward (a few torch ops launch more than one)
        "profiled_cuda_kernels": cuda_kernels,
        "counted": counter.count(),
        "moe_layer_ops": dict(sorted(counter.names(f"layer{moe[0]}").items())),
        # the full model's layer count, for the per-step total on the real model
        "real_layers": {"moe": sum(preset(name).is_moe_layer(i) for i in range(preset(name).num_hidden_layers)),
                        "dense": preset(name).num_dense_layers},
    }


def main() -> None:
    results = {}
    for name in args.models.split(","):
        r = decode_counts(name)
        real = r["real_layers"]
        r["per_step_real_model"] = real["moe"] * r["moe_layer"] + real["dense"] * r["dense_layer"] + r["outside_layers"]
        results[name] = r
        print(f"{name}: graph forward: MoE layer {r['moe_layer']} launches, dense layer {r['dense_layer']}, around the "
              f"layers {r['outside_layers']}: {r['per_step_real_model']} per step for the real "
              f"{real['moe'] + real['dense']} layers, {r['syncs']} syncs (an eager step launches "
              f"{r['eager_step_outside_layers']} outside the layers, metadata and sampling included)")
        if r["profiled_cuda_kernels"] is not None:
            print(f"    the profiler saw {r['profiled_cuda_kernels']} CUDA kernels where the counter counted "
                  f"{r['counted']} launches (4-layer model)")
        for op, n in r["moe_layer_ops"].items():
            print(f"    {n:3d}  {op}")
    print(json.dumps({"device": device, "batch": args.batch, "torch": torch.__version__, **results}))


if __name__ == "__main__":
    main()
