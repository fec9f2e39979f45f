"""`trinity plan`: will a Trinity model fit on these GPUs, how fast can it decode at best, and what does it cost?

Everything is computed from the model config (exact tensor shapes), not from a rule of thumb such as seed 001's
"params x bytes x 1.15". Units: 1 GB = 1e9 bytes, 1 TB/s = 1e12 bytes/s, as on GPU spec sheets.

Assumptions (also listed under "assumptions" in the JSON):
- bf16 weights: 2 bytes per parameter, every tensor.
- fp8 weights: the linear layers (attention q/k/v/o/gate, dense MLP, shared and routed experts) are 1 byte per
  weight plus one fp32 scale per 128x128 block (the layout of the released `*-FP8-Block` checkpoints); the
  embeddings, lm_head, router, expert bias and norms stay bf16 (quantizers leave them alone: they are small or
  accuracy-critical).
- w4a16 weights: the same linear layers at 4 bits, plus an fp32 scale and a uint8 zero point per group of 128
  input channels per output row (AWQ/GPTQ-style, group size 128, asymmetric: the engine's in-memory layout,
  `quant.int4`, whatever the checkpoint stores); everything else bf16.
- KV cache: K and V of every KV head, 2 bytes (bf16) or 1 byte (fp8, e4m3 or e5m2, as the engine's
  `--kv-cache-dtype` stores it; its per-layer scales are ignored).
  Full-attention layers keep every token; sliding layers keep at most `sliding_window` tokens per sequence.
  Counts are token-exact (the engine's paged blocks round a sliding window up to whole blocks: up to one block more).
- Memory per GPU usable for the model: memory x gpu_memory_utilization (0.90 by default, as in vLLM), minus a
  runtime reserve (4 GB by default: CUDA context and graphs, communication buffers, and the peak activations of
  a prefill chunk, including MoE intermediates and sampler buffers over a 200K vocabulary), minus the weights.
- Tensor parallelism (TP): every sharded tensor is split evenly over the TP group; norms, router and expert bias
  are replicated. TP must divide num_attention_heads, and either divide num_key_value_heads or be a multiple of it
  (then each GPU keeps a copy of one KV head, as vLLM does). With block- or group-quantized weights, the expert and
  MLP widths per GPU must be multiples of 128. The smallest valid TP that holds the weights and one sequence of
  max_model_len is chosen; the rest of the GPUs run further replicas (data parallel), gpus // TP in all.
- Decode bounds are memory-bandwidth bounds (no efficiency factor): a step reads every non-expert weight once
  (one embedding row per token, not the table), each routed expert it touches once, and the KV cache of each
  sequence at max_model_len (worst case). A batch of N touches E*(1-(1-k/E)^N) distinct experts per MoE layer in
  expectation under uniform, independent routing. They are upper bounds on throughput, so the costs below are
  lower bounds on cost per token.
- Cost: price per GPU-hour x all GPUs; a month is `hours_per_month` hours (730 by default; seed 001 uses 720).

JSON output (`--json`): one object with these keys (null where an input was not given or nothing fits):
- model: name, total_params, active_params, layers, dense_layers, moe_layers, full_layers, sliding_layers,
  sliding_window, num_experts, experts_per_token, num_attention_heads, num_key_value_heads, head_dim
- weights: dtype, bytes, gb, groups ({group: {params, bytes}} for embed_tokens, lm_head, attention_q_o_gate,
  attention_k_v, dense_mlp, shared_experts, routed_experts, router, expert_bias, norms)
- kv_cache: dtype, max_model_len, full_bytes_per_token, sliding_bytes_per_token, sliding_window,
  sliding_bytes_cap_per_sequence, full_bytes_per_sequence, sliding_bytes_per_sequence, bytes_per_sequence,
  gb_per_sequence
- gpu: name, count, memory_gb, bandwidth_tbps, memory_utilization, reserve_gb
- fit: fits, tensor_parallel_size, replicas, idle_gpus, weights_gb_per_gpu, kv_budget_gb_per_gpu (left for KV
  after weights and reserve), kv_gb_per_sequence_per_gpu, max_sequences_per_replica, max_sequences, concurrency,
  concurrency_fits, headroom_gb_per_gpu (KV budget left after `concurrency` max-length sequences; negative when
  they do not all fit), shortfall_gb_per_gpu and shortfall_gb (how much memory is missing, when nothing fits),
  tried ([{tensor_parallel_size, fits, kv_budget_gb_per_gpu} or {tensor_parallel_size, invalid}])
- decode: batch1_weight_bytes_per_token, batch1_kv_bytes_per_token, batch1_bytes_per_token, batch1_tokens_per_s
  (one replica), batch_per_replica (sequences decoded together per replica: the requested concurrency spread over
  the replicas and capped by what fits), expected_experts_per_layer, batch_bytes_per_step,
  batch_tokens_per_s_per_replica, total_tokens_per_s (all replicas). Bytes are summed over the GPUs of a replica.
- cost: usd_per_hour, usd_per_mtok_output, hours_per_month, monthly_usd, monthly_capacity_tokens,
  api_usd_per_mtok, break_even_tokens_per_month, break_even_utilization (share of the monthly capacity needed to
  break even), beats_api
- assumptions: {name: text}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from ..config import PRESETS, TrinityConfig, preset

GB = 1e9
TB = 1e12
QUANT_BLOCK = 128  # fp8 block side and w4a16 group size
DEFAULT_RESERVE_GB = 4.0
DEFAULT_UTILIZATION = 0.90
DEFAULT_HOURS_PER_MONTH = 730.0
WEIGHT_DTYPES = ("bf16", "fp8", "w4a16")
W4A16_GROUP_BYTES = 5  # an fp32 scale and a uint8 zero point per group
# the engine's `--kv-cache-dtype` spellings of fp8 too: either format stores 1 byte a value
KV_BYTES = {"bf16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
KV_DTYPES = tuple(KV_BYTES)


@dataclass(frozen=True, slots=True)
class GpuSpec:
    memory_gb: float
    bandwidth_tbps: float


# Spec-sheet HBM capacity and bandwidth. MI350X's 288 GB is the figure seed 000 uses; H100/H200 match seed 001's
# node totals (640 GB / 564 GB). B200 is listed at 180 GB usable (192 GB physical) by most clouds.
GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec(80, 3.35),
    "h100-pcie": GpuSpec(80, 2.0),
    "h200": GpuSpec(141, 4.8),
    "b200": GpuSpec(180, 8.0),
    "b300": GpuSpec(288, 8.0),
    "mi300x": GpuSpec(192, 5.3),
    "mi325x": GpuSpec(256, 6.0),
    "mi350x": GpuSpec(288, 8.0),
    "a100": GpuSpec(80, 2.0),
    "l40s": GpuSpec(48, 0.864),
    "l4": GpuSpec(24, 0.3),
    "rtx4090": GpuSpec(24, 1.0),
}


class PlanError(ValueError):
    """Bad planner input; the CLI prints the message and exits with status 2."""


@dataclass(frozen=True, slots=True)
class TensorGroup:
    name: str
    params: int
    bytes: int
    replicated: bool = False  # a full copy on every GPU of a TP group (not split)


# ---------------------------------------------------------------------- weights
def _linear_bytes(out_features: int, in_features: int, dtype: str) -> int:
    """Bytes of one linear weight [out, in] stored in `dtype`, scales included."""
    n = out_features * in_features
    if dtype == "bf16":
        return 2 * n
    if dtype == "fp8":
        return n + 4 * math.ceil(out_features / QUANT_BLOCK) * math.ceil(in_features / QUANT_BLOCK)
    if dtype == "w4a16":
        return n // 2 + (n % 2) + W4A16_GROUP_BYTES * out_features * math.ceil(in_features / QUANT_BLOCK)
    raise PlanError(f"unknown weights dtype {dtype!r}; allowed: {', '.join(WEIGHT_DTYPES)}")


def _swiglu(width: int, hidden: int, dtype: str) -> tuple[int, int]:
    """(params, bytes) of gate [width, hidden] + up [width, hidden] + down [hidden, width]."""
    return 3 * width * hidden, 2 * _linear_bytes(width, hidden, dtype) + _linear_bytes(hidden, width, dtype)


def weight_groups(cfg: TrinityConfig, dtype: str) -> list[TensorGroup]:
    """Every parameter of the model, grouped by how it is stored, sharded and read."""
    if dtype not in WEIGHT_DTYPES:
        raise PlanError(f"unknown weights dtype {dtype!r}; allowed: {', '.join(WEIGHT_DTYPES)}")
    h, d, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    q_width, kv_width = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    moe, dense = cfg.num_moe_layers, cfg.num_dense_layers
    # q_proj and gate_proj [heads*d, h], o_proj [h, heads*d]
    qog_params = 3 * q_width * h
    qog_bytes = 2 * _linear_bytes(q_width, h, dtype) + _linear_bytes(h, q_width, dtype)
    dense_params, dense_bytes = _swiglu(cfg.intermediate_size, h, dtype)
    expert_params, expert_bytes = _swiglu(cfg.moe_intermediate_size, h, dtype)
    shared_params, shared_bytes = _swiglu(cfg.moe_intermediate_size * cfg.num_shared_experts, h, dtype)
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    # four sandwich norms per layer, q_norm and k_norm per layer, the final norm
    norm_params = layers * (4 * h + 2 * d) + h
    experts = cfg.num_experts if moe else 0
    return [
        TensorGroup("embed_tokens", cfg.vocab_size * h, 2 * cfg.vocab_size * h),
        TensorGroup("lm_head", head, 2 * head),
        TensorGroup("attention_q_o_gate", layers * qog_params, layers * qog_bytes),
        TensorGroup("attention_k_v", layers * 2 * kv_width * h, layers * 2 * _linear_bytes(kv_width, h, dtype)),
        TensorGroup("dense_mlp", dense * dense_params, dense * dense_bytes),
        TensorGroup("shared_experts", moe * shared_params, moe * shared_bytes),
        TensorGroup("routed_experts", moe * experts * expert_params, moe * experts * expert_bytes),
        TensorGroup("router", moe * experts * h, 2 * moe * experts * h, replicated=True),
        TensorGroup("expert_bias", moe * experts, 2 * moe * experts, replicated=True),
        TensorGroup("norms", norm_params, 2 * norm_params, replicated=True),
    ]


def _kv_copies(cfg: TrinityConfig, tp: int) -> int:
    """Into how many GPUs the KV heads are split: with TP > kv heads, each GPU holds one head (a copy)."""
    return min(tp, cfg.num_key_value_heads)


def weight_bytes_per_gpu(cfg: TrinityConfig, groups: list[TensorGroup], tp: int) -> float:
    total = 0.0
    for g in groups:
        if g.replicated:
            total += g.bytes
        elif g.name == "attention_k_v":
            total += g.bytes / _kv_copies(cfg, tp)
        else:
            total += g.bytes / tp
    return total


def tp_problem(cfg: TrinityConfig, tp: int, weights_dtype: str) -> str | None:
    """Why `tp` cannot shard this model (None when it can)."""
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads % tp:
        return f"{heads} attention heads do not split over {tp} GPUs"
    if kv % tp and tp % kv:
        return f"{kv} KV heads neither split over nor replicate evenly onto {tp} GPUs"
    if tp > 1 and weights_dtype != "bf16":
        widths = [("moe_intermediate_size", cfg.moe_intermediate_size)] if cfg.num_moe_layers else []
        widths += [("intermediate_size", cfg.intermediate_size)] if cfg.num_dense_layers else []
        for key, width in widths:
            if width % tp or (width // tp) % QUANT_BLOCK:
                return (f"{key} {width} / {tp} GPUs is not a multiple of the {weights_dtype} block of "
                        f"{QUANT_BLOCK}")
    return None


# ---------------------------------------------------------------------- KV cache
@dataclass(frozen=True, slots=True)
class KVLayout:
    full_bytes_per_token: int  # summed over the full-attention layers
    sliding_bytes_per_token: int  # summed over the sliding layers
    sliding_window: int

    def full_bytes(self, tokens: int) -> int:
        return self.full_bytes_per_token * tokens

    def sliding_bytes(self, tokens: int) -> int:
        return self.sliding_bytes_per_token * min(tokens, self.sliding_window)

    def bytes_per_sequence(self, tokens: int) -> int:
        return self.full_bytes(tokens) + self.sliding_bytes(tokens)


def kv_layout(cfg: TrinityConfig, kv_dtype: str) -> KVLayout:
    if kv_dtype not in KV_DTYPES:
        raise PlanError(f"unknown KV dtype {kv_dtype!r}; allowed: {', '.join(KV_DTYPES)}")
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * KV_BYTES[kv_dtype]  # K and V
    full = cfg.layer_types.count("full_attention")
    return KVLayout(per_layer * full, per_layer * (cfg.num_hidden_layers - full), cfg.sliding_window)


# ---------------------------------------------------------------------- inputs
@dataclass(slots=True)
class PlanInputs:
    model: str
    config: TrinityConfig
    weights_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    gpu: str = "h100"
    gpus: int = 1
    memory_gb: float = 80.0
    bandwidth_tbps: float = 3.35
    max_model_len: int = 32768
    concurrency: int = 1
    memory_utilization: float = DEFAULT_UTILIZATION
    reserve_gb: float = DEFAULT_RESERVE_GB
    tensor_parallel_size: int | None = None
    price_per_gpu_hour: float | None = None
    api_price_per_mtok: float | None = None
    hours_per_month: float = DEFAULT_HOURS_PER_MONTH

    def __post_init__(self) -> None:
        for key in ("gpus", "max_model_len", "concurrency"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"{_flag(key)} must be a positive integer, got {value!r}")
        for key in ("memory_gb", "bandwidth_tbps", "hours_per_month", "price_per_gpu_hour", "api_price_per_mtok"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise PlanError(f"{_flag(key)} must be a positive number, got {value!r}")
        if not (0 < self.memory_utilization <= 1):
            raise PlanError(f"--gpu-memory-utilization must be in (0, 1], got {self.memory_utilization!r}")
        if not (math.isfinite(self.reserve_gb) and self.reserve_gb >= 0):
            raise PlanError(f"--reserve-gb must be >= 0, got {self.reserve_gb!r}")
        if self.tensor_parallel_size is not None:
            tp = self.tensor_parallel_size
            if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
                raise PlanError(f"--tensor-parallel-size must be a positive integer, got {tp!r}")
            if tp > self.gpus:
                raise PlanError(f"--tensor-parallel-size {tp} needs more GPUs than --gpus {self.gpus}")
            problem = tp_problem(self.config, tp, self.weights_dtype)
            if problem:
                raise PlanError(f"--tensor-parallel-size {tp}: {problem}")
        weight_groups(self.config, self.weights_dtype)  # validates the dtypes early
        kv_layout(self.config, self.kv_dtype)


_FLAGS = {"memory_gb": "--gpu-memory", "bandwidth_tbps": "--gpu-bandwidth"}


def _flag(key: str) -> str:
    return _FLAGS.get(key, "--" + key.replace("_", "-"))


def load_config(model: str) -> TrinityConfig:
    """A preset name, or a folder holding config.json (or the config.json file itself)."""
    if model in PRESETS:
        return preset(model)
    if not os.path.exists(model):
        raise PlanError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    return TrinityConfig.from_pretrained(model)


# ---------------------------------------------------------------------- the plan
def expected_distinct_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a batch of `batch` tokens touches in one MoE layer, routing uniform and independent."""
    if num_experts == 0 or batch == 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def _split(total: int, parts: int) -> list[int]:
    """`total` sequences spread as evenly as possible over `parts` replicas."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _decode_step_bytes(cfg: TrinityConfig, groups: list[TensorGroup], kv: KVLayout, tp: int, batch: int,
                       max_model_len: int) -> tuple[float, float, float]:
    """(weight bytes, KV bytes, expected experts per layer) one decode step of `batch` sequences reads, summed over
    the TP group's GPUs (replicated tensors are read by every GPU)."""
    by_name = {g.name: g for g in groups}
    weights = 0.0
    for g in groups:
        if g.name in ("embed_tokens", "routed_experts"):
            continue
        copies = tp if g.replicated else (tp // _kv_copies(cfg, tp) if g.name == "attention_k_v" else 1)
        weights += g.bytes * copies
    weights += batch * 2 * cfg.hidden_size  # one bf16 embedding row per token
    experts = expected_distinct_experts(cfg.num_experts if cfg.num_moe_layers else 0, cfg.num_experts_per_tok, batch)
    if cfg.num_moe_layers:
        per_expert = by_name["routed_experts"].bytes / (cfg.num_moe_layers * cfg.num_experts)
        weights += cfg.num_moe_layers * experts * per_expert
    kv_bytes = batch * kv.bytes_per_sequence(max_model_len) * (tp // _kv_copies(cfg, tp))
    return weights, float(kv_bytes), experts


def make_plan(p: PlanInputs) -> dict[str, Any]:
    """The whole plan as a JSON-ready dict (keys documented in the module docstring)."""
    cfg = p.config
    groups = weight_groups(cfg, p.weights_dtype)
    kv = kv_layout(cfg, p.kv_dtype)
    weight_bytes = sum(g.bytes for g in groups)
    seq_bytes = kv.bytes_per_sequence(p.max_model_len)
    full_layers = cfg.layer_types.count("full_attention")

    usable_per_gpu = p.memory_gb * GB * p.memory_utilization - p.reserve_gb * GB
    candidates = [p.tensor_parallel_size] if p.tensor_parallel_size else range(1, p.gpus + 1)
    tried: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    best_failure: dict[str, Any] | None = None
    for tp in candidates:
        problem = tp_problem(cfg, tp, p.weights_dtype)
        if problem:
            if tp & (tp - 1) == 0:  # list the usual power-of-two sizes; odd sizes that cannot work are noise
                tried.append({"tensor_parallel_size": tp, "invalid": problem})
            continue
        budget = usable_per_gpu - weight_bytes_per_gpu(cfg, groups, tp)
        seq_per_gpu = seq_bytes / _kv_copies(cfg, tp)
        attempt = {"tp": tp, "budget": budget, "seq_per_gpu": seq_per_gpu}
        fits = budget >= seq_per_gpu
        tried.append({"tensor_parallel_size": tp, "fits": fits, "kv_budget_gb_per_gpu": budget / GB})
        if fits:
            chosen = attempt
            break
        if best_failure is None or budget - seq_per_gpu > best_failure["budget"] - best_failure["seq_per_gpu"]:
            best_failure = attempt

    fit: dict[str, Any] = {"fits": chosen is not None, "concurrency": p.concurrency, "tried": tried}
    decode = cost = None
    if chosen is None:  # report the best attempt (TP=1 is always valid, so there is one)
        at = best_failure
        shortfall = at["seq_per_gpu"] - at["budget"]
        fit.update(tensor_parallel_size=at["tp"], replicas=0, idle_gpus=p.gpus,
                   weights_gb_per_gpu=weight_bytes_per_gpu(cfg, groups, at["tp"]) / GB,
                   kv_budget_gb_per_gpu=at["budget"] / GB, kv_gb_per_sequence_per_gpu=at["seq_per_gpu"] / GB,
                   max_sequences_per_replica=0, max_sequences=0, concurrency_fits=False, headroom_gb_per_gpu=None,
                   shortfall_gb_per_gpu=shortfall / GB, shortfall_gb=shortfall * at["tp"] / GB)
    else:
        tp, budget, seq_per_gpu = chosen["tp"], chosen["budget"], chosen["seq_per_gpu"]
        replicas = p.gpus // tp
        max_seqs = int(budget // seq_per_gpu)
        batches = [b for b in _split(p.concurrency, replicas) if b]
        fit.update(tensor_parallel_size=tp, replicas=replicas, idle_gpus=p.gpus - replicas * tp,
                   weights_gb_per_gpu=weight_bytes_per_gpu(cfg, groups, tp) / GB, kv_budget_gb_per_gpu=budget / GB,
                   kv_gb_per_sequence_per_gpu=seq_per_gpu / GB, max_sequences_per_replica=max_seqs,
                   max_sequences=max_seqs * replicas, concurrency_fits=max(batches) <= max_seqs,
                   headroom_gb_per_gpu=(budget - max(batches) * seq_per_gpu) / GB,
                   shortfall_gb_per_gpu=None, shortfall_gb=None)
        decode = _decode(cfg, groups, kv, p, tp, [min(b, max_seqs) for b in batches])
        cost = _cost(p, decode["total_tokens_per_s"])

    return {
        "model": {"name": p.model, "total_params": sum(g.params for g in groups),
                  "active_params": cfg.num_parameters(active_only=True), "layers": cfg.num_hidden_layers,
                  "dense_layers": cfg.num_dense_layers, "moe_layers": cfg.num_moe_layers, "full_layers": full_layers,
                  "sliding_layers": cfg.num_hidden_layers - full_layers, "sliding_window": cfg.sliding_window,
                  "num_experts": cfg.num_experts, "experts_per_token": cfg.num_experts_per_tok,
                  "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
                  "head_dim": cfg.head_dim},
        "weights": {"dtype": p.weights_dtype, "bytes": weight_bytes, "gb": weight_bytes / GB,
                    "groups": {g.name: {"params": g.params, "bytes": g.bytes} for g in groups}},
        "kv_cache": {"dtype": p.kv_dtype, "max_model_len": p.max_model_len,
                     "full_bytes_per_token": kv.full_bytes_per_token,
                     "sliding_bytes_per_token": kv.sliding_bytes_per_token, "sliding_window": kv.sliding_window,
                     "sliding_bytes_cap_per_sequence": kv.sliding_bytes_per_token * kv.sliding_window,
                     "full_bytes_per_sequence": kv.full_bytes(p.max_model_len),
                     "sliding_bytes_per_sequence": kv.sliding_bytes(p.max_model_len),
                     "bytes_per_sequence": seq_bytes, "gb_per_sequence": seq_bytes / GB},
        "gpu": {"name": p.gpu, "count": p.gpus, "memory_gb": p.memory_gb, "bandwidth_tbps": p.bandwidth_tbps,
                "memory_utilization": p.memory_utilization, "reserve_gb": p.reserve_gb},
        "fit": fit,
        "decode": decode,
        "cost": cost,
        "assumptions": ASSUMPTIONS,
    }


def _decode(cfg: TrinityConfig, groups: list[TensorGroup], kv: KVLayout, p: PlanInputs, tp: int,
            batches: list[int]) -> dict[str, Any]:
    bandwidth = tp * p.bandwidth_tbps * TB  # a replica's GPUs read their shards in parallel
    w1, kv1, _ = _decode_step_bytes(cfg, groups, kv, tp, 1, p.max_model_len)
    per_replica = []
    for n in batches:
        wn, kvn, experts = _decode_step_bytes(cfg, groups, kv, tp, n, p.max_model_len)
        per_replica.append((n, wn + kvn, experts, n * bandwidth / (wn + kvn)))
    n, step_bytes, experts, tok_s = per_replica[0]  # the largest batch (the split puts larger ones first)
    return {"batch1_weight_bytes_per_token": w1, "batch1_kv_bytes_per_token": kv1,
            "batch1_bytes_per_token": w1 + kv1, "batch1_tokens_per_s": bandwidth / (w1 + kv1),
            "batch_per_replica": n, "expected_experts_per_layer": experts, "batch_bytes_per_step": step_bytes,
            "batch_tokens_per_s_per_replica": tok_s, "total_tokens_per_s": sum(r[3] for r in per_replica)}


def _cost(p: PlanInputs, tokens_per_s: float) -> dict[str, Any] | None:
    if p.price_per_gpu_hour is None:
        return None
    usd_per_hour = p.price_per_gpu_hour * p.gpus
    monthly_usd = usd_per_hour * p.hours_per_month
    capacity = tokens_per_s * 3600 * p.hours_per_month
    out: dict[str, Any] = {"usd_per_hour": usd_per_hour,
                           "usd_per_mtok_output": usd_per_hour / (tokens_per_s * 3600) * 1e6,
                           "hours_per_month": p.hours_per_month, "monthly_usd": monthly_usd,
                           "monthly_capacity_tokens": capacity, "api_usd_per_mtok": p.api_price_per_mtok,
                           "break_even_tokens_per_month": None, "break_even_utilization": None, "beats_api": None}
    if p.api_price_per_mtok is not None:
        break_even = monthly_usd / p.api_price_per_mtok * 1e6
        out.update(break_even_tokens_per_month=break_even, break_even_utilization=break_even / capacity,
                   beats_api=out["usd_per_mtok_output"] < p.api_price_per_mtok)
    return out


ASSUMPTIONS = {
    "units": "1 GB = 1e9 bytes, 1 TB/s = 1e12 bytes/s",
    "bf16": "2 bytes per parameter, every tensor",
    "fp8": "linear weights 1 byte + one fp32 scale per 128x128 block; embeddings, lm_head, router, expert bias, "
           "norms bf16",
    "w4a16": "linear weights 4 bits + fp32 scale and uint8 zero per 128 input channels per row (the engine's "
             "layout); the rest bf16",
    "kv_cache": "K and V per KV head; full layers keep every token, sliding layers at most sliding_window tokens "
                "(token-exact; paged blocks add up to one block); fp8 scales ignored",
    "memory": "usable per GPU = memory x utilization - reserve - weights on that GPU",
    "tensor_parallel": "sharded tensors split evenly; norms, router, expert bias replicated; KV heads copied when "
                       "TP > KV heads; smallest valid TP that holds the weights and one max-length sequence; "
                       "remaining GPUs run replicas",
    "decode": "memory-bandwidth upper bounds, no efficiency factor: non-expert weights once per step, distinct "
              "experts E*(1-(1-k/E)^N) per MoE layer (uniform routing), KV of every sequence at max_model_len",
    "cost": "price per GPU-hour x all GPUs, at the decode upper bound (a lower bound on cost per token)",
}


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="large", help="preset (%s) or a folder with config.json; default large"
                        % ", ".join(PRESETS))
    parser.add_argument("--weights-dtype", default="bf16", choices=WEIGHT_DTYPES)
    parser.add_argument("--kv-dtype", default="bf16", choices=KV_DTYPES)
    parser.add_argument("--gpu", default="h100", help="one of %s, or any name with --gpu-memory and --gpu-bandwidth"
                        % ", ".join(GPUS))
    parser.add_argument("--gpus", type=int, default=1, help="GPUs in the node")
    parser.add_argument("--gpu-memory", type=float, default=None, help="GB per GPU (overrides the table)")
    parser.add_argument("--gpu-bandwidth", type=float, default=None, help="TB/s per GPU (overrides the table)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=DEFAULT_UTILIZATION)
    parser.add_argument("--reserve-gb", type=float, default=DEFAULT_RESERVE_GB,
                        help="per-GPU runtime reserve: CUDA context, graphs, buffers, activations")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                        help="use this TP size (default: the smallest that fits)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="tokens per sequence (default: 32768, or the model's limit if lower)")
    parser.add_argument("--concurrency", type=int, default=32, help="sequences in flight over the whole node")
    parser.add_argument("--price-per-gpu-hour", type=float, default=None, help="USD")
    parser.add_argument("--api-price-per-mtok", type=float, default=None, help="USD per million output tokens")
    parser.add_argument("--hours-per-month", type=float, default=DEFAULT_HOURS_PER_MONTH)
    parser.add_argument("--json", action="store_true", help="print one JSON object (keys: see trinity.ops.plan)")


def inputs_from_args(args: argparse.Namespace) -> PlanInputs:
    cfg = load_config(args.model)
    spec = GPUS.get(args.gpu.lower())
    if spec is None and (args.gpu_memory is None or args.gpu_bandwidth is None):
        raise PlanError(f"unknown --gpu {args.gpu!r}; known: {', '.join(GPUS)} "
                        "(or give --gpu-memory and --gpu-bandwidth for another GPU)")
    memory = args.gpu_memory if args.gpu_memory is not None else spec.memory_gb
    bandwidth = args.gpu_bandwidth if args.gpu_bandwidth is not None else spec.bandwidth_tbps
    max_len = args.max_model_len if args.max_model_len is not None else min(32768, cfg.max_position_embeddings)
    return PlanInputs(model=args.model, config=cfg, weights_dtype=args.weights_dtype, kv_dtype=args.kv_dtype,
                      gpu=args.gpu.lower(), gpus=args.gpus, memory_gb=memory, bandwidth_tbps=bandwidth,
                      max_model_len=max_len, concurrency=args.concurrency,
                      memory_utilization=args.gpu_memory_utilization, reserve_gb=args.reserve_gb,
                      tensor_parallel_size=args.tensor_parallel_size, price_per_gpu_hour=args.price_per_gpu_hour,
                      api_price_per_mtok=args.api_price_per_mtok, hours_per_month=args.hours_per_month)


def run(args: argparse.Namespace) -> int:
    """`trinity plan`; bad input raises PlanError/ValueError/FileNotFoundError, which the CLI turns into exit 2."""
    inputs = inputs_from_args(args)
    result = make_plan(inputs)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        from .plan_table import print_plan

        print_plan(result, inputs)
    if inputs.max_model_len > inputs.config.max_position_embeddings:
        print(f"note: --max-model-len {inputs.max_model_len} is beyond the config's max_position_embeddings "
              f"({inputs.config.max_position_embeddings})", file=sys.stderr)
    return 0
