"""`trinity quantize`: a float Trinity checkpoint -> a compressed-tensors checkpoint (FP8 block / channel, or W4A16
group-wise int4 by round-to-nearest, AWQ or GPTQ), streamed one decoder layer at a time.

Streaming: the float model is never built. Each decoder layer's tensors are read from the safetensors files
(`safe_open` for that layer only, closed after, so the mapped pages of the other layers are never touched), the
calibration activations are run through that layer (in fp32) to give its projections' inputs and the next layer's
input, the layer is quantized, its tensors written to a shard of their own, and everything of it freed. Peak memory
is one layer's float weights, its quantized copy and the calibration activations (a few [tokens, width] tensors).
The next layer is fed the float layer's output (AWQ's choice; the GPTQ paper feeds the quantized layer's output):
each layer is calibrated on the activations of the float model it must imitate.

Output: what compressed-tensors writes for these schemes (its `QuantizationConfig`, its compressors' tensors:
`weight` + `weight_scale` for float-quantized, `weight_packed` / `weight_scale` / `weight_shape` for
pack-quantized), experts per expert (`mlp.experts.{e}.gate_proj`, as vLLM and HF transformers read them), the router
gates and lm_head in `ignore` (embeddings and norms are not Linear modules, so no scheme targets them), one shard per
decoder layer plus one for the embeddings, final norm and head, with an index, and the tokenizer files copied.

Methods (W4A16, symmetric, `group_size` columns per scale): `rtn`, `awq` (`quant.awq`) and `gptq` (`quant.gptq`).
A MoE expert is calibrated on the tokens routed to it; one that receives fewer than `min_expert_tokens` calibration
tokens is quantized by RTN (and reported).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import awq as awq_mod
from . import fp8, int4
from .gptq import Hessian, gptq

SCHEMES = ("fp8-block", "fp8-channel", "w4a16")
METHODS = ("rtn", "awq", "gptq")
IGNORE = ["lm_head", "re:.*mlp\\.router\\.gate$"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class MemoryBudgetError(ValueError):
    pass


@dataclass(slots=True)
class QuantizeOptions:
    scheme: str = "w4a16"
    method: str = "rtn"
    group_size: int = 128
    calibration: str | None = None
    num_samples: int = 128
    max_tokens: int = 512  # per calibration conversation
    min_expert_tokens: int = 32
    ignore: list[str] = field(default_factory=list)
    max_memory: int | None = None  # bytes of peak RSS growth allowed (None: no check)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme {self.scheme!r}: allowed {', '.join(SCHEMES)}")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: allowed {', '.join(METHODS)}")
        if self.scheme != "w4a16" and self.method != "rtn":
            raise ValueError(f"--method {self.method} is for w4a16; FP8 weights are rounded to nearest (rtn)")
        if self.group_size < 1 or self.num_samples < 1:
            raise ValueError("--group-size and --num-samples must be >= 1")


# ------------------------------------------------------------------------------------------------ memory
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """The process's high-water mark of resident memory (VmHWM; ru_maxrss where /proc is missing)."""
    kb = _status_kb("VmHWM") if os.path.exists("/proc/self/status") else 0
    if not kb:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


# ------------------------------------------------------------------------------------------------ reading
class SourceCheckpoint:
    """Tensor names -> files of a float HF checkpoint; tensors read on demand, one group at a time."""

    def __init__(self, path: str):
        from safetensors import safe_open

        from ..model.checkpoint import checkpoint_files

        self.path = path
        self.file_of: dict[str, str] = {}
        for file, names in checkpoint_files(path).items():
            if names is None:
                with safe_open(file, "pt") as f:
                    names = list(f.keys())
            self.file_of.update({n: file for n in names})
        self.nbytes = sum(os.path.getsize(f) for f in set(self.file_of.values()))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out = {}
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        for file, group in by_file.items():
            with safe_open(file, "pt") as f:  # closed after: the file's mapping (and its resident pages) goes
                for n in group:
                    out[n] = f.get_tensor(n).clone()
        return out

    def layer_names(self, i: int) -> list[str]:
        prefix = f"model.layers.{i}."
        return [n for n in self.file_of if n.startswith(prefix)]


def _per_expert(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's tensors (names without the layer prefix) with stacked experts split per expert (HF names)."""
    out = {}
    for name, t in local.items():
        if name == "mlp.experts.gate_up_proj":  # [E, 2I, H]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"mlp.experts.{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"mlp.experts.{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name == "mlp.experts.down_proj":  # [E, H, I]
            for e in range(t.shape[0]):
                out[f"mlp.experts.{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t
    return out


def _build_layer(config, i: int, w: dict[str, torch.Tensor]):
    """The float decoder layer (fp32) holding `w` (per-expert HF names without the layer prefix)."""
    from ..model.model import DecoderLayer

    with torch.device("meta"):
        layer = DecoderLayer(config, i)
    layer = layer.to_empty(device="cpu")
    params = dict(layer.named_parameters())
    inter = config.moe_intermediate_size
    covered = set()
    with torch.no_grad():
        for name, t in w.items():
            m = _EXPERT.match(name)
            if m:
                e, proj = int(m[1]), m[2]
                if proj == "down_proj":
                    params["mlp.experts.down_proj"][e].copy_(t)
                else:
                    half = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
                    params["mlp.experts.gate_up_proj"][e, half].copy_(t)
                covered.add(f"mlp.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}")
            elif name in params:
                params[name].copy_(t)
                covered.add(name)
            else:
                raise ValueError(f"layer {i}: unexpected tensor {name!r} in the checkpoint")
    missing = set(params) - covered
    if missing:
        raise ValueError(f"layer {i}: the checkpoint lacks {', '.join(sorted(missing))}")
    return layer.eval()


# ------------------------------------------------------------------------------------------------ calibration pass
@torch.no_grad()
def _layer_pass(layer, x: torch.Tensor, rope, attn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x [T, H] (the layer's input, fp32) -> (the layer's output, the inputs its projections see)."""
    from ..kernels.moe import route_reference
    from ..model.moe import MoEBlock

    acts: dict[str, torch.Tensor] = {}
    xn = layer.input_layernorm(x)
    acts["attn"] = xn
    a = layer.self_attn.gated_attention(xn, rope, attn)
    acts["o"] = a
    r = x + layer.post_attention_layernorm(layer.self_attn.o_proj(a))
    xm = layer.pre_mlp_layernorm(r)
    acts["mlp"] = xm
    mlp = layer.mlp
    if isinstance(mlp, MoEBlock):
        _, ids = route_reference(xm, mlp.router.gate.weight.float(), mlp.expert_bias, mlp.top_k, mlp.route_norm,
                                 mlp.route_scale)
        acts["ids"] = ids
    out = r + layer.post_mlp_layernorm(mlp(xm))
    return out, acts


# The layer runs over the calibration tokens this many at a time (whole sequences): its intermediates (attention,
# SwiGLU, routed experts' gathers) then scale with a chunk, not with the calibration set; only the layer's input,
# output and the inputs its projections see are held whole.
PASS_CHUNK_TOKENS = 2048


def _layer_pass_chunked(layer, x: torch.Tensor, rope, seq_lens: list[int]):
    """`_layer_pass` over chunks of whole sequences, concatenated: the same values, a chunk's intermediates at a
    time."""
    from ..model.attention import PackedSequences

    outs, parts, masks, start, lens = [], [], {}, 0, []

    def run(lens: list[int]) -> None:
        nonlocal start
        end = start + sum(lens)
        out, acts = _layer_pass(layer, x[start:end], (rope[0][start:end], rope[1][start:end]),
                                PackedSequences(lens, masks))
        outs.append(out)
        parts.append(acts)
        start = end

    for n in seq_lens:
        if lens and sum(lens) + n > PASS_CHUNK_TOKENS:
            run(lens)
            lens = []
        lens.append(n)
    if lens:
        run(lens)
    return torch.cat(outs), {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _swiglu_input(w: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    """silu(gate(x)) * up(x): down_proj's input (float weights)."""
    return F.silu(x @ w[f"{prefix}.gate_proj.weight"].T) * (x @ w[f"{prefix}.up_proj.weight"].T)


def _mlp_units(w: dict[str, torch.Tensor], acts: dict, num_experts: int) -> list[tuple[str, torch.Tensor | None]]:
    """(SwiGLU prefix, its input tokens [N, H] or None when the expert got none) for the layer's MLPs."""
    xm = acts["mlp"]
    if "ids" not in acts:
        return [("mlp", xm)]
    units: list[tuple[str, torch.Tensor | None]] = [("mlp.shared_experts", xm)]
    for e in range(num_experts):
        rows = (acts["ids"] == e).any(dim=-1)
        units.append((f"mlp.experts.{e}", xm[rows] if rows.any() else None))
    return units


# ------------------------------------------------------------------------------------------------ per layer
@dataclass(slots=True)
class LayerReport:
    index: int
    rtn_fallback: list[str] = field(default_factory=list)  # experts with too few calibration tokens
    awq_alpha: dict[str, float] = field(default_factory=dict)
    clip: dict[str, float] = field(default_factory=dict)


class Quantizer:
    def __init__(self, opts: QuantizeOptions, config, scale_dtype: torch.dtype):
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        self.opts, self.config, self.scale_dtype = opts, config, scale_dtype
        if opts.scheme == "w4a16":
            self.args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=opts.group_size,
                                         symmetric=True, dynamic=False)
            self.format = "pack-quantized"
        else:
            strategy = opts.scheme.removeprefix("fp8-")
            self.args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False,
                                         block_structure=[128, 128] if strategy == "block" else None)
            self.format = "float-quantized"
        self.lib_scheme = QuantizationScheme(targets=["Linear"], weights=self.args, format=self.format)
        self.ignore = IGNORE + list(opts.ignore)

    # -------------------------------------------------------------- names
    def ignored(self, module: str) -> bool:
        return any(re.match(p[3:], module) if p.startswith("re:") else p == module for p in self.ignore)

    def targeted(self, full_name: str) -> bool:
        return full_name.endswith("proj.weight") and not self.ignored(full_name.removesuffix(".weight"))

    def quantization_config(self) -> dict:
        from compressed_tensors.quantization import QuantizationConfig

        config = QuantizationConfig(config_groups={"group_0": self.lib_scheme}, format=self.format,
                                    quantization_status="compressed", ignore=self.ignore).to_dict()
        # compressed-tensors 0.20's own serialisation adds `moe_sparsity_config: null`, a field that carries nothing
        # when null and that trinity's scheme reader (quant/scheme.py, which refuses unknown fields) does not list
        if config.get("moe_sparsity_config") is None:
            config.pop("moe_sparsity_config", None)
        return config

    # -------------------------------------------------------------- compression (the library's compressors)
    def compress(self, module: str, w: torch.Tensor, deq: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of one weight. FP8: from w. W4A16: from the dequantized weight `deq` and its
        scales, which the library's compressor rounds back to exactly the codes they were made from."""
        if self.format == "float-quantized":
            from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor

            block = (128, 128) if self.args.strategy == "block" else (1, w.shape[1])
            _, scale = fp8.quantize(w, block)
            out = FloatQuantizationCompressor.compress({"weight": w.float(), "weight_scale": scale},
                                                       self.lib_scheme)
            return {f"{module}.weight": out["weight"], f"{module}.weight_scale": scale}
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

        out = PackedQuantizationCompressor.compress({"weight": deq, "weight_scale": scale.to(self.scale_dtype)},
                                                    self.lib_scheme)
        return {f"{module}.{part}": t for part, t in out.items()}

    def rtn(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = int4.quantize(w, self.opts.group_size, True, scale_dtype=self.scale_dtype)
        return int4.dequantize(q, torch.float32), q.scale

    # -------------------------------------------------------------- AWQ: scales folded into the float weights
    def _awq(self, w: dict[str, torch.Tensor], acts: dict, report: LayerReport, prefix: str) -> dict[str, torch.Tensor]:
        """Rescale the layer's float weights in place (the float function unchanged), then clip each targeted
        weight but q/k (whose errors pass through the softmax: AWQ leaves them unclipped) on the input it sees
        after the scales; returns the clipped weights to quantize, by name."""
        g, dt = self.opts.group_size, self.scale_dtype
        q = lambda name: self.targeted(prefix + name)  # noqa: E731
        inputs: dict[str, torch.Tensor] = {}  # weight name -> its calibration input once the scales are folded
        # attention: 1 / s into input_layernorm, s into q/k/v/gate columns
        names = [f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "gate_proj")]
        xn = acts["attn"]
        if any(q(n) for n in names):
            s, alpha, _ = awq_mod.search_scales([(xn, [w[n] for n in names if q(n)])], xn.abs().mean(0), g, dt)
            for n in names:
                w[n] = w[n] * s
            w["input_layernorm.weight"] = w["input_layernorm.weight"] / s
            report.awq_alpha["attn"] = alpha
            inputs.update({n: xn / s for n in names[2:]})
        inputs["self_attn.o_proj.weight"] = acts["o"]  # no op to fold a scale into: clipping only
        # MLP gate/up (shared expert, routed experts on their tokens): 1 / s into pre_mlp_layernorm, s into their
        # columns and the router's (it reads the same normed input and stays in float)
        all_units = _mlp_units(w, acts, self.config.num_experts)  # every expert takes the norm's 1 / s
        units = [(unit, x) for unit, x in all_units if x is not None and x.shape[0] >= self._min_tokens(unit)]
        pairs = []
        for unit, x in units:
            gu = [f"{unit}.gate_proj.weight", f"{unit}.up_proj.weight"]
            if any(q(n) for n in gu):
                pairs.append((x, [w[n] for n in gu if q(n)]))
        downs = {unit: _swiglu_input(w, unit, x) for unit, x in units if q(f"{unit}.down_proj.weight")}
        s_mlp = torch.ones(w["pre_mlp_layernorm.weight"].shape[0])
        if pairs:
            xm = acts["mlp"]
            s_mlp, alpha, _ = awq_mod.search_scales(pairs, xm.abs().mean(0), g, dt)
            for unit, _ in all_units:
                for p in ("gate_proj", "up_proj"):
                    w[f"{unit}.{p}.weight"] = w[f"{unit}.{p}.weight"] * s_mlp
            if "mlp.router.gate.weight" in w:
                w["mlp.router.gate.weight"] = w["mlp.router.gate.weight"].float() * s_mlp
            w["pre_mlp_layernorm.weight"] = w["pre_mlp_layernorm.weight"] / s_mlp
            report.awq_alpha["mlp"] = alpha
        for unit, x in units:
            inputs.update({f"{unit}.{p}.weight": x / s_mlp for p in ("gate_proj", "up_proj")})
        # down_proj: 1 / s into up_proj's rows (silu(gate) * up is linear in up), s into down's columns
        for unit, z in downs.items():
            down = f"{unit}.down_proj.weight"
            s, alpha, _ = awq_mod.search_scales([(z, [w[down]])], z.abs().mean(0), g, dt)
            w[down] = w[down] * s
            w[f"{unit}.up_proj.weight"] = w[f"{unit}.up_proj.weight"] / s[:, None]
            if unit in ("mlp", "mlp.shared_experts"):
                report.awq_alpha["down" if unit == "mlp" else "shared_down"] = alpha
            inputs[down] = z / s
        clipped = {}
        for name, x in inputs.items():
            if q(name) and name in w:
                clipped[name], ratio = awq_mod.search_clip(w[name], x, g, dt)
                if not name.startswith("mlp.experts."):  # per expert would flood the report
                    report.clip[name.removesuffix(".weight")] = round(ratio, 3)
        return clipped

    def _min_tokens(self, unit: str) -> int:
        return self.opts.min_expert_tokens if ".experts." in unit else 1

    # -------------------------------------------------------------- one layer
    def quantize_layer(self, i: int, w: dict[str, torch.Tensor], acts: dict | None,
                       report: LayerReport) -> dict[str, torch.Tensor]:
        """w: the layer's fp32 tensors (per-expert HF names without the prefix; changed in place by AWQ) -> the
        quantized layer's checkpoint tensors (full names) for the targeted projections; the others are left in w."""
        prefix = f"model.layers.{i}."
        targets = [n for n in w if self.targeted(prefix + n)]
        out: dict[str, torch.Tensor] = {}
        if self.format == "float-quantized":
            for n in targets:
                out.update(self.compress(prefix + n.removesuffix(".weight"), w.pop(n)))
            return out
        method = self.opts.method
        clipped = self._awq(w, acts, report, prefix) if method == "awq" else {}
        units = dict(_mlp_units(w, acts, self.config.num_experts)) if acts is not None else {}
        for unit, x in units.items():
            if ".experts." in unit and (x is None or x.shape[0] < self.opts.min_expert_tokens):
                report.rtn_fallback.append(f"{i}.{unit.removeprefix('mlp.experts.')}")
        hessians: dict[str, torch.Tensor | None] = {}  # by input: q/k/v/gate share one, gate/up one per unit
        for n in targets:
            weight = clipped.get(n, w[n])
            h = self._hessian(n, w, acts, units, hessians) if method == "gptq" else None
            if h is not None:
                deq, scale = gptq(weight, h, self.opts.group_size, self.scale_dtype)
            else:
                deq, scale = self.rtn(weight)
            out.update(self.compress(prefix + n.removesuffix(".weight"), weight, deq, scale))
        for n in targets:  # after the loop: a down_proj's Hessian reads its unit's float gate/up
            del w[n]
        return out

    def _hessian(self, name: str, w: dict[str, torch.Tensor], acts: dict, units: dict,
                 cache: dict) -> torch.Tensor | None:
        """H = 2 X^T X / n of the projection's calibration inputs (float weights before it); None: too few tokens
        (an expert quantized by RTN)."""
        module = name.removesuffix(".weight")
        unit, proj = module.rsplit(".", 1)
        if unit == "self_attn":
            key = "o" if proj == "o_proj" else "attn"
        else:
            key = f"{unit}.down" if proj == "down_proj" else unit
        if key not in cache:
            if unit == "self_attn":
                x = acts[key]
            else:
                x = units[unit]
                if x is not None and x.shape[0] < self._min_tokens(unit):
                    x = None
            if x is None:
                cache[key] = None
            else:
                down = unit != "self_attn" and proj == "down_proj"
                h = Hessian(w[f"{unit}.down_proj.weight"].shape[1] if down else x.shape[1])
                for rows in x.split(PASS_CHUNK_TOKENS):  # down_proj's input, made a chunk at a time
                    h.add(_swiglu_input(w, unit, rows) if down else rows)
                cache[key] = h.value()
        return cache[key]


# ------------------------------------------------------------------------------------------------ the command
def _scale_dtype(config: dict) -> torch.dtype:
    """Scales in the activations' dtype, as a quantization tool writes them for the model's dtype (vLLM's kernels
    take them in that dtype); the codes are made with the rounded scales."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def quantize_checkpoint(model: str, out: str, opts: QuantizeOptions, log=None) -> dict:
    """Quantize the float checkpoint folder `model` (or `trinity-tiny`) into `out`; returns the report."""
    from safetensors.torch import save_file

    from ..config import TrinityConfig
    from ..loading import BUILTIN_MODEL, builtin_model_path
    from ..model.layers import RotaryEmbedding

    # imported before the baseline: code is not weights
    import compressed_tensors.compressors  # noqa: F401
    import safetensors.torch  # noqa: F401

    from .. import synthetic, tokenizer  # noqa: F401
    from ..model import model as _model  # noqa: F401

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    # the baseline: the process's high-water mark before any weight is read (the interpreter, torch, the libraries)
    start, start_rss = time.perf_counter(), peak_rss_bytes()
    path = builtin_model_path() if model == BUILTIN_MODEL else model
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        raw_config = json.load(f)
    if raw_config.get("quantization_config"):
        raise ValueError(f"{model} is already quantized ({raw_config['quantization_config'].get('quant_method')}); "
                         "quantize a float checkpoint")
    config = TrinityConfig.from_pretrained(path)
    if os.path.abspath(out) == os.path.abspath(path):
        raise ValueError("--out must be another folder than the model's")
    source = SourceCheckpoint(path)
    quantizer = Quantizer(opts, config, _scale_dtype(raw_config))
    calibrate = opts.scheme == "w4a16" and opts.method != "rtn"
    notes: list[str] = []

    x = rope = attn = None  # calibration: hidden states, rotary tables, sequence lengths
    tokens = 0
    if calibrate:
        from .calibration import calibration_ids

        seqs, notes = calibration_ids(path, config.vocab_size, opts.calibration, opts.num_samples, opts.max_tokens,
                                      opts.seed)
        ids = torch.cat(seqs)
        tokens = ids.numel()
        embed = source.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
        x = embed[ids].float()
        del embed
        if config.mup_enabled:
            x = x * config.hidden_size ** 0.5
        positions = torch.cat([torch.arange(s.numel()) for s in seqs])
        rope = RotaryEmbedding(config.head_dim, config.rope_theta).cos_sin(positions, torch.float32)
        attn = [s.numel() for s in seqs]
    for note in notes:
        log(note)

    os.makedirs(out, exist_ok=True)
    for stale in os.listdir(out):  # a previous run's shards must not mix with these
        if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
            os.remove(os.path.join(out, stale))
    n_layers = config.num_hidden_layers
    shards = n_layers + 1
    weight_map: dict[str, str] = {}
    total = 0
    reports: list[LayerReport] = []

    def write(index: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(v.numel() * v.element_size() for v in tensors.values())

    for i in range(n_layers):
        t0 = time.perf_counter()
        prefix = f"model.layers.{i}."
        raw = _per_expert({n[len(prefix):]: t for n, t in source.read(source.layer_names(i)).items()})
        dtypes = {n: t.dtype for n, t in raw.items()}
        w = {n: t.float() for n, t in raw.items()}
        del raw
        acts = None
        if calibrate:
            layer = _build_layer(config, i, w)
            x_next, acts = _layer_pass_chunked(layer, x, rope, attn)
            del layer
        report = LayerReport(i)
        tensors = quantizer.quantize_layer(i, w, acts, report)
        # what stays in float (norms, router, expert bias, ignored projections), in its checkpoint dtype
        tensors.update({prefix + n: t.to(dtypes[n]) for n, t in w.items()})
        write(i, tensors)
        del tensors, w, acts
        if calibrate:
            x = x_next
        reports.append(report)
        extra = f", RTN for experts {', '.join(report.rtn_fallback)} (< {opts.min_expert_tokens} tokens)" \
            if report.rtn_fallback else ""
        alphas = f", awq alpha {report.awq_alpha}" if report.awq_alpha else ""
        log(f"layer {i + 1}/{n_layers} quantized in {time.perf_counter() - t0:.1f}s{alphas}{extra}; "
            f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")
    rest = [n for n in source.file_of if not n.startswith("model.layers.")]
    write(n_layers, source.read(rest))

    with open(os.path.join(out, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    raw_config["quantization_config"] = quantizer.quantization_config()
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw_config, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(path, name)):
            shutil.copy(os.path.join(path, name), os.path.join(out, name))

    peak = peak_rss_bytes()
    result = {
        "model": model, "out": out, "scheme": opts.scheme, "method": opts.method if opts.scheme == "w4a16" else "rtn",
        "group_size": opts.group_size if opts.scheme == "w4a16" else None, "calibration_tokens": tokens,
        "rtn_fallback_experts": [e for r in reports for e in r.rtn_fallback],
        "awq_alpha": {r.index: r.awq_alpha for r in reports if r.awq_alpha},
        "awq_clip": {r.index: r.clip for r in reports if r.clip},
        "checkpoint_bytes": source.nbytes, "output_bytes": total, "seconds": round(time.perf_counter() - start, 2),
        "baseline_rss_mib": round(start_rss / 2**20, 1), "peak_rss_mib": round(peak / 2**20, 1),
        "peak_growth_mib": round((peak - start_rss) / 2**20, 1), "notes": notes,
    }
    if opts.max_memory is not None and peak - start_rss > opts.max_memory:
        raise MemoryBudgetError(f"peak RSS grew by {(peak - start_rss) / 2**20:.0f} MiB, over --max-memory "
                                f"{opts.max_memory / 2**20:.0f} MiB")
    return result
