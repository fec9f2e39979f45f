"""TrinityForCausalLM: single-device model code for `AfmoeForCausalLM`.

The main forward takes a flat batch: `input_ids[T]`, `positions[T]` and attention metadata that says
how those tokens split into sequences and where their keys/values live. Parallelism and caching are
applied from outside.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..config import TrinityConfig
from ..kernels import embed as kernel_embed
from .attention import AttentionMetadata, PackedSequences
from .layers import Embedding, GatedAttention, Linear, RMSNorm, RotaryEmbedding, SwiGLU
from .moe import MoEBlock


class DecoderLayer(nn.Module):
    """Depth-scaled sandwich norm: each sublayer's output is normalised again before the residual add."""

    def __init__(self, config: TrinityConfig, layer_idx: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = GatedAttention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_mlp_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp: nn.Module = MoEBlock(config, layer_idx) if config.is_moe_layer(layer_idx) \
            else SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                attn: AttentionMetadata, next_norm: RMSNorm | None = None,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer on the residual stream, (x, residual) -> (x, residual) [T, hidden] each, in one of two forms:

        - chained, given `next_norm` (the norm after this layer: the next layer's input norm or the final norm;
          inference only): x arrives normed by this layer's input norm and leaves normed by `next_norm`. Each
          sublayer's post-norm, the residual add and the norm after it are one step (`RMSNorm.forward` with
          `post`): one pass on the fast paths, at decode sizes inside the launch of the projection before it.
        - vLLM's (training): x is the previous layer's output still to be added to `residual` (None before the
          first layer); the layer returns its own output beside the residual and leaves the add to the norm that
          follows. A layer then touches only its own weights (FSDP gathers each layer's for its forward alone).

        `rows`: keep only these rows after the attention (see `TrinityModel.forward`)."""
        chained = next_norm is not None
        if not chained:
            x, residual = self.input_layernorm(x, residual) if residual is not None \
                else (self.input_layernorm(x), x)
        a = self.self_attn.gated_attention(x, rope, attn, rows)
        if rows is not None:
            residual = residual[rows]
            if rows.numel() == 0:  # a chunk that samples nothing: only its K/V (written above) were wanted
                return residual, residual
        if not chained:
            h, residual = self.pre_mlp_layernorm(self.post_attention_layernorm(self.self_attn.o_proj(a)), residual)
            return self.post_mlp_layernorm(self.mlp(h, attn)), residual
        # A MoE block on the Triton path runs the norm step after it itself (summing its per-choice outputs: no
        # combine launch; at decode inside its down GEMM's launch), and takes its input in fp32 too, written by the
        # norm before it (no cast launch for the router).
        fp32_copy = isinstance(self.mlp, MoEBlock) and self.mlp.fuses_norm(a)
        h, residual, *h_fp32 = self.pre_mlp_layernorm(a, residual, post=self.post_attention_layernorm,
                                                      proj=self.self_attn.o_proj, fp32_copy=fp32_copy)
        return self.mlp(h, attn, (residual, self.post_mlp_layernorm, next_norm), *h_fp32)


class TrinityModel(nn.Module):
    def __init__(self, config: TrinityConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.embed_scale = config.hidden_size ** 0.5 if config.mup_enabled else None
        # Set by `TrinityForCausalLM.fuse_projections()` (inference): the layers run chained (`DecoderLayer.forward`),
        # each applying the norm after it. Never under training: there a layer must not touch the next layer's
        # weights (FSDP gathers each layer's parameters only inside its own forward).
        self.fused_norms = False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T] (int64, or int32 as a decode table holds them) -> final-normed hidden
        states [T, hidden], or [N, hidden] at `rows` ([N] indices into the batch).

        With `rows`, the last layer keeps only those rows: every row's keys and values still reach the cache, the
        attention computes only those rows' queries where the metadata can (the engine's paged attention on the
        CPU; elsewhere it picks them after), and nothing after the attention mixes rows, so the other rows' o_proj,
        MLP and norms in that layer would only make hidden states no logit reads. A prefill that samples one token per prompt
        skips most of a layer (1/8 of the built-in model's, 1/32 of Mini's); a chunk that samples none, all of it
        after the attention. The last MoE layer's expert counts then cover only the kept rows."""
        chained = self.fused_norms and not torch.is_grad_enabled() and len(self.layers) > 0
        # the embedding, the muP scale and the first input norm: one launch on the Triton path, where the embedding
        # is whole (a vocab-parallel one is `foldable` False: its lookups are summed over ranks first)
        if chained and getattr(self.embed_tokens, "foldable", True):
            first = self.layers[0].input_layernorm
            x, residual = kernel_embed.embed_rms_norm(input_ids, self.embed_tokens.weight, self.embed_scale,
                                                      first.weight, first.eps)
        elif chained:
            residual = self.embed_tokens(input_ids)
            if self.embed_scale is not None:
                residual = residual * self.embed_scale
            x = self.layers[0].input_layernorm(residual)
        else:
            x, residual = self.embed_tokens(input_ids), None
            if self.embed_scale is not None:  # muP input scaling
                x = x * self.embed_scale
        rope = self.rotary.cos_sin(positions, x.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            following = (self.layers[i + 1].input_layernorm if i < last else self.norm) if chained else None
            x, residual = layer(x, residual, rope, attn, following, rows if i == last else None)
        if chained:
            return x
        if residual is None:  # no layers
            return self.norm(x if rows is None else x[rows])
        return self.norm(x, residual)[0]


class TrinityForCausalLM(nn.Module):
    # Parameters kept in fp32 whatever the model dtype: small, and precision-critical (as in HF).
    FP32_PARAM_SUFFIXES = ("layernorm.weight", "q_norm.weight", "k_norm.weight", "model.norm.weight", "expert_bias")

    def __init__(self, config: TrinityConfig):
        super().__init__()
        self.config = config
        self.model = TrinityModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attn: AttentionMetadata | None = None, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Two ways in.

        - flat batch: `input_ids[T]`, `positions[T]`, `attn` -> logits [T, V] (or [N, V] at `logits_indices`).
        - convenience: `input_ids[B, T]` whole sequences, no cache -> logits [B, T, V].
        """
        if input_ids.dim() == 2:
            b, t = input_ids.shape
            positions = torch.arange(t, device=input_ids.device).repeat(b)
            hidden = self.model(input_ids.reshape(-1), positions, PackedSequences([t] * b))
            return self.lm_head(hidden).view(b, t, -1)
        if positions is None or attn is None:
            raise ValueError("a flat batch (input_ids of shape [T]) needs positions and attention metadata")
        return self.lm_head(self.model(input_ids, positions, attn, logits_indices))

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the embedding's: an FP8 model's projections hold another)."""
        return self.model.embed_tokens.weight.dtype

    def fuse_projections(self) -> "TrinityForCausalLM":
        """For inference: each attention's q/k/v/gate and each SwiGLU's gate/up projections as one GEMM
        (`layers.FusedLinears`: the parameters become views of the fused weight; nothing else changes), each MoE
        block's shared expert stacked with its routed experts, and the sandwich norms chained across layers."""
        self.model.fused_norms = True
        for m in self.modules():  # a MoE block before its shared expert: it may place the expert's weights itself
            if isinstance(m, MoEBlock):
                m.fuse_projections()
            elif isinstance(m, (GatedAttention, SwiGLU)) and (m.fused is None or not m.fused.valid()):
                m.fuse_projections()
        return self

    def keeps_fp32(self, name: str) -> bool:
        return name.endswith(self.FP32_PARAM_SUFFIXES)

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, config: TrinityConfig, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", shard=None, quant=None) -> "TrinityForCausalLM":
        """A model with uninitialised storage allocated once in its final dtype/device (no fp32 detour).

        `shard` (a `parallel.sharding.ShardPlan`): this rank's part only, restructured while still on the meta
        device, so the full model is never allocated; the vocabulary's padding rows are zero."""
        with torch.device("meta"):
            model = cls(config)
        if quant is not None:  # `quant.scheme.QuantConfig`: FP8 modules in place of the quantized ones
            from ..quant.modules import quantize_structure

            quantize_structure(model, quant)
        if shard is not None:
            from ..parallel.sharding import meta_local, restructure

            restructure(model, shard, meta_local(shard))
        made: dict[int, nn.Parameter] = {}  # a tied weight is allocated once, for both its modules
        for prefix, module in model.named_modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                if id(param) not in made:
                    full = f"{prefix}.{name}" if prefix else name
                    want = torch.float32 if model.keeps_fp32(full) else dtype
                    if getattr(module, "keeps_dtypes", False):  # FP8 weights and their fp32 scales
                        want = param.dtype
                    storage = torch.empty(param.shape, dtype=want, device=device)
                    split = shard.split(full) if shard is not None else None
                    if split is not None and split.pad:  # rows past the vocabulary: no checkpoint tensor fills them
                        storage.zero_()
                    made[id(param)] = nn.Parameter(storage, requires_grad=param.requires_grad)
                module._parameters[name] = made[id(param)]
        return model

    @classmethod
    def random(cls, config: TrinityConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               seed: int = 0) -> "TrinityForCausalLM":
        """Random weights (normal, std = initializer_range; norms at 1; zero expert bias), reproducible by seed."""
        from .init import init_random_

        model = cls.empty(config, dtype, device)
        init_random_(model, seed)
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu", progress: bool | None = None,
                        shard=None, quantization: str | None = None) -> "TrinityForCausalLM":
        """Load a local HF-layout safetensors checkpoint (single file or sharded; per-expert or stacked experts).
        `shard` (a `parallel.sharding.ShardPlan`): only this rank's part, read from the files and held. A checkpoint
        with a compressed-tensors FP8 `quantization_config` loads with its weights in FP8; `quantization="fp8"`
        quantizes an unquantized one while loading (`quant/`)."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(cls, path, dtype=dtype, device=device, progress=progress, shard=shard,
                               quantization=quantization)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                        expert_layout: str = "per_expert", dtype: torch.dtype | str | None = None) -> None:
        """Write HF names and layout (`config.json` + safetensors, sharded by size with an index)."""
        from .checkpoint import save_checkpoint

        save_checkpoint(self, path, max_shard_size=max_shard_size, expert_layout=expert_layout, dtype=dtype)
