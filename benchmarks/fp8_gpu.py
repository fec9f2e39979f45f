"""The FP8 Triton kernels (`kernels.fp8_triton`) timed against what they replace, and checked, at model shapes.

    PYTHONPATH=src python3 benchmarks/fp8_gpu.py            # on a GPU
    .venv/bin/python benchmarks/fp8_gpu.py --smoke          # CPU, Triton's interpreter: checks it runs

- projections (Mini's q_proj, o_proj, dense gate_up and down) at decode and prefill rows: cuBLAS on the bf16 weight
  (the unquantized model), the reference (`kernels.fp8.linear_fp8_reference`: dequantize, then cuBLAS), the w8a16
  kernel and the w8a8 one (its activation-quantizing launch included), with each kernel's largest error relative
  to its reference's largest value, and the weight bandwidth at decode (fp8 bytes / time);
- routed experts (Nano and Mini: 128 experts, top-8) at decode and prefill tokens: `moe_triton.fused_moe` on bf16
  experts, `fused_moe_fp8` on the fp8 ones (with its error against `Fp8Experts.forward`), and that module's
  reference loop (eager: it syncs with the host, so the time includes its launch gaps).

Timing and shapes: `quant_gpu_timing.py` (CUDA-graph replays over copies of the weights that overflow the L2
cache, as a decode step reads them cold; the time per call is the median of several replays). Prints a table, then one JSON
object last. The tile configs (`fp8_triton.gemm_config`, the MoE table) are first guesses from the sm_90 compile:
these numbers are what tuning starts from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
parser.add_argument("--calls", type=int, default=20, help="calls per graph replay")
args = parser.parse_args()
if args.smoke:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["TRINITY_KERNELS"] = "triton"

import torch  # noqa: E402

from quant_gpu_timing import Shapes, Timer, max_rel  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from trinity import kernels  # noqa: E402
from trinity.kernels import fp8_triton, moe_triton  # noqa: E402
from trinity.kernels.fp8 import linear_fp8_reference  # noqa: E402
from trinity.quant import fp8  # noqa: E402
from trinity.quant.modules import Fp8Experts  # noqa: E402
from trinity.quant.scheme import QuantConfig, WeightScheme  # noqa: E402

DEVICE = torch.device("cpu" if args.smoke else "cuda")
DTYPE = torch.bfloat16
BLOCK = (128, 128)
SHAPES = Shapes(args.smoke)
PROJECTIONS, ROWS, EXPERTS, TOKENS = SHAPES.projections, SHAPES.rows, SHAPES.experts, SHAPES.tokens
NUM_EXPERTS, TOP_K = SHAPES.num_experts, SHAPES.top_k
TIMER = Timer(DEVICE, args.smoke, args.calls)
copies_for, per_call_us, eager_us = TIMER.copies_for, TIMER.per_call_us, TIMER.eager_us


def projection(name: str, n: int, k: int, rows: int) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    weights = [torch.randn(n, k, device=DEVICE, generator=g) * k ** -0.5 for _ in range(copies_for(n * k))]
    quantized = [fp8.quantize(w, BLOCK) for w in weights]
    dense = [w.to(DTYPE) for w in weights]
    x = torch.randn(rows, k, device=DEVICE, generator=g).to(DTYPE)
    q, s = quantized[0]
    err_a16 = max_rel(fp8_triton.linear_fp8_gpu(x, q, s, BLOCK), linear_fp8_reference(x, q, s, BLOCK))
    err_a8 = max_rel(fp8_triton.linear_fp8_gpu(x, q, s, BLOCK, act_group=128),
                     linear_fp8_reference(fp8.fake_quantize_activations(x, 128), q, s, BLOCK))
    del weights
    row = {"op": f"{name} [{n}x{k}]", "rows": rows,
           "bf16_cublas_us": per_call_us([lambda w=w: torch.nn.functional.linear(x, w) for w in dense]),
           "reference_us": per_call_us([lambda q=q, s=s: linear_fp8_reference(x, q, s, BLOCK) for q, s in quantized]),
           "w8a16_us": per_call_us([lambda q=q, s=s: fp8_triton.linear_fp8_gpu(x, q, s, BLOCK) for q, s in quantized]),
           "w8a8_us": per_call_us([lambda q=q, s=s: fp8_triton.linear_fp8_gpu(x, q, s, BLOCK, act_group=128)
                                   for q, s in quantized]),
           "w8a16_err": err_a16, "w8a8_err": err_a8}
    if rows <= 16:
        row["w8a16_weight_gbps"] = n * k / row["w8a16_us"] / 1e3
    return row


def experts(name: str, hidden: int, inter: int, tokens: int) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(1)
    gate_up = torch.randn(NUM_EXPERTS, 2 * inter, hidden, device=DEVICE, generator=g) * hidden ** -0.5
    down = torch.randn(NUM_EXPERTS, hidden, inter, device=DEVICE, generator=g) * inter ** -0.5
    with torch.device(DEVICE):
        mod = Fp8Experts(NUM_EXPERTS, hidden, inter, QuantConfig(WeightScheme("block", BLOCK)))
    (qg, sg), (qu, su) = fp8.quantize(gate_up[:, :inter], BLOCK), fp8.quantize(gate_up[:, inter:], BLOCK)
    mod.gate_up_proj.data, mod.gate_up_proj_scale.data = torch.cat([qg, qu], 1), torch.cat([sg, su], 1)
    mod.down_proj.data, mod.down_proj_scale.data = fp8.quantize(down, BLOCK)
    gate_up, down = gate_up.to(DTYPE), down.to(DTYPE)
    x = torch.randn(tokens, hidden, device=DEVICE, generator=g).to(DTYPE)
    # routings cycled from call to call, so that a small batch's experts are not the L2-resident ones of the call
    # before (8 experts of Mini are 25 MB in fp8)
    routings = []
    for _ in range(1 if args.smoke else 16):
        w, ids = torch.topk(torch.rand(tokens, NUM_EXPERTS, device=DEVICE, generator=g), TOP_K)
        routings.append((w / w.sum(-1, keepdim=True), ids))
    w, ids = routings[0]
    args_fp8 = (mod.gate_up_proj, mod.gate_up_proj_scale, mod.gate_block, mod.down_proj, mod.down_proj_scale,
                mod.down_block)
    kernels.use_reference(True)  # the module's own loop, whatever `linear_fp8` dispatches to
    try:
        ref = mod(x, w, ids)
        reference_us = eager_us(lambda: mod(x, w, ids))
    finally:
        kernels.use_reference(None)
    return {"op": f"{name} experts H{hidden} I{inter}", "rows": tokens,
            "bf16_fused_us": per_call_us([lambda w=w, ids=ids: moe_triton.fused_moe(x, w, ids, gate_up, down)
                                          for w, ids in routings]),
            "fp8_fused_us": per_call_us([lambda w=w, ids=ids: fp8_triton.fused_moe_fp8(x, w, ids, *args_fp8)
                                         for w, ids in routings]),
            "reference_eager_us": reference_us,
            "fp8_fused_err": max_rel(fp8_triton.fused_moe_fp8(x, w, ids, *args_fp8), ref)}


def main() -> None:
    device = "interpreter" if args.smoke else torch.cuda.get_device_name(DEVICE)
    results = []
    with torch.no_grad():
        for name, (n, k) in PROJECTIONS.items():
            for rows in ROWS:
                results.append(projection(name, n, k, rows))
                print(results[-1], flush=True)
        for name, (hidden, inter) in EXPERTS.items():
            for tokens in TOKENS:
                results.append(experts(name, hidden, inter, tokens))
                print(results[-1], flush=True)
    print(json.dumps({"benchmark": "fp8_gpu", "device": device, "results": results}))


if __name__ == "__main__":
    main()
