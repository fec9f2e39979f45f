"""The dense building blocks of a Trinity layer: RMSNorm, rotary embedding, gated GQA attention, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrinityConfig
from ..kernels import norm as kernel_norm
from ..kernels.linear import linear
from ..kernels.linear_norm import linear_norm_add_rms_norm
from .attention import AttentionMetadata


class Linear(nn.Linear):
    """nn.Linear without PyTorch's default init: weights come from a checkpoint or from `init_random_`.
    Skipping it saves a full pass over every weight at load time (and, on the meta device, the import of
    torch's Python decompositions that init would trigger)."""

    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class FusedLinears:
    """Several bias-free projections of the same input as one GEMM, for inference.

    The modules' weights become row slices (views) of one concatenated weight, so the parameters, their names,
    `state_dict` and loading stay exactly as before and no memory is duplicated; `__call__` runs the single GEMM
    and splits its output. At decode one GEMM of the summed width reads the same bytes as the separate ones but
    costs one launch instead of several (small separate GEMMs fall far short of the bandwidth). Used only without
    autograd: gradients belong to the separate parameters.
    """

    def __init__(self, modules: list[nn.Linear], weight: torch.Tensor | None = None):
        """`weight`: storage that already holds the concatenated weights (the MoE block places its shared
        expert's gate/up inside the stacked expert tensor); by default a new concatenation."""
        if any(m.bias is not None for m in modules):
            raise ValueError("only bias-free projections can be fused")
        self.modules = modules
        self.weight = torch.cat([m.weight.detach() for m in modules]) if weight is None else weight
        self.sizes = [m.weight.shape[0] for m in modules]
        start = 0
        for m, n in zip(modules, self.sizes):
            m.weight = nn.Parameter(self.weight[start:start + n], requires_grad=m.weight.requires_grad)
            start += n

    def valid(self) -> bool:
        """Still the parameters' storage: `.to()`, `load_state_dict(assign=True)` and the like replace the
        parameters, after which this weight is stale and the separate projections must run."""
        return self.modules[0].weight.data_ptr() == self.weight.data_ptr()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return linear(x, self.weight).split(self.sizes, dim=-1)


def fuse_linears(modules: list[nn.Module]):
    """Projections of one input as one GEMM: `FusedLinears` for plain ones, the modules' own `fuse` for another
    form (`quant.modules.Fp8Linear`), or None where they cannot be fused."""
    if all(isinstance(m, nn.Linear) for m in modules):
        return FusedLinears(modules)
    fuse = getattr(type(modules[0]), "fuse", None)
    return fuse(modules) if fuse is not None else None


def fused_projections_usable(fused) -> bool:
    return fused is not None and not torch.is_grad_enabled() and fused.valid()


class Embedding(nn.Embedding):
    """nn.Embedding without the default init, for the same reason as `Linear`."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; the weight is kept in fp32 even in a bf16 model (as HF keeps it)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, post: RMSNorm | None = None,
                proj: nn.Linear | None = None, fp32_copy: bool = False):
        """RMSNorm(x). With `residual` (the residual stream), the add folded in as vLLM's norms do it:
        r = residual + x -> (RMSNorm(r), r).

        `post` and `proj` fold in the sandwich-norm step that ends a Trinity sublayer: x is the sublayer's output
        before its own post-norm `post` (or, with `proj`, the input of its last bias-free projection), and
        r = residual + post(proj(x)); on the fast paths one pass (`kernels.norm.norm_add_rms_norm`, or with `proj`
        `kernels.linear_norm.linear_norm_add_rms_norm`, one launch at decode sizes). `fp32_copy` (with `post`):
        also the normed output widened to fp32, written by the same pass (the MoE router's input). A `proj` whose
        output must be completed first (a tensor-parallel row-parallel projection: `foldable` False) runs here."""
        if proj is not None and not getattr(proj, "foldable", True):
            x, proj = proj(x), None
        if residual is None:
            return kernel_norm.rms_norm(x, self.weight, self.eps)
        if post is None:
            return kernel_norm.add_rms_norm(x, residual, self.weight, self.eps)
        if proj is None:
            return kernel_norm.norm_add_rms_norm(x, residual, post.weight, self.weight, self.eps, fp32_copy)
        return linear_norm_add_rms_norm(x, proj.weight, residual, post.weight, self.weight, self.eps, fp32_copy)


class RotaryEmbedding:
    """Neox-style RoPE tables for arbitrary positions; inverse frequencies in fp32, cached per device.

    `reserve(n, device, dtype)` precomputes cos and sin for positions 0..n-1 as one [n, 2 * head_dim] table
    (cos in the first half of a row, sin in the second), so `cos_sin` then costs one gather instead of six
    elementwise launches; the table is made by the very ops `cos_sin` computes with, so the values are the same
    bits. The gathered cos and sin are views [T, head_dim] with unit stride and a row stride of 2 * head_dim.
    """

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
            self._inv_freq[device] = 1.0 / (self.theta ** exponents)
        return self._inv_freq[device]

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def reserve(self, num_positions: int, device: torch.device | str, dtype: torch.dtype) -> None:
        """Precompute the table for positions 0..num_positions-1 on `device` in `dtype`: afterwards `cos_sin` on
        that device and dtype gathers from it, and its positions must then all be below num_positions (the
        gather does not check them)."""
        positions = torch.arange(num_positions, device=device)
        cos, sin = self._compute(positions, dtype)
        self._tables[(positions.device, dtype)] = torch.cat((cos, sin), dim=-1)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] (int32 or int64) -> cos, sin [T, head_dim] in `dtype` (rounded like HF so bf16 results
        match); from the reserved table when there is one for this device and dtype."""
        table = self._tables.get((positions.device, dtype))
        if table is None:
            return self._compute(positions, dtype)
        rows = table.index_select(0, positions)
        return rows[:, :self.head_dim], rows[:, self.head_dim:]


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.fused = None  # gate and up as one GEMM, after fuse_projections()

    def fuse_projections(self) -> None:
        self.fused = fuse_linears([self.gate_proj, self.up_proj])

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate(x)) * up(x): the input of down_proj."""
        if fused_projections_usable(self.fused):
            gate, up = self.fused(x)
            return kernel_norm.silu_mul(gate, up)  # one launch on the GPU
        return F.silu(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor, step: AttentionMetadata | None = None, norm: tuple | None = None):
        """x: [T, H] -> [T, H]. `step` is unused (the MoE block's signature). `norm` = (residual, post_norm,
        next_norm): the decoder layer's norm step after the MLP too, with down_proj folded into it
        -> (next_norm(r), r), r = residual + post_norm(down(...)) (see `RMSNorm.forward`)."""
        if norm is None:
            return self.down_proj(self.hidden(x))
        residual, post, following = norm
        return following(self.hidden(x), residual, post=post, proj=self.down_proj)


class GatedAttention(nn.Module):
    """GQA with per-head q/k RMSNorm, RoPE on sliding layers only (NoPE on full layers), and a sigmoid output gate."""

    def __init__(self, config: TrinityConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.is_sliding = config.is_sliding_layer(layer_idx)
        self.window = config.sliding_window if self.is_sliding else None
        h, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(h, q_dim, bias=False)
        self.k_proj = Linear(h, kv_dim, bias=False)
        self.v_proj = Linear(h, kv_dim, bias=False)
        self.o_proj = Linear(q_dim, h, bias=False)
        self.gate_proj = Linear(h, q_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.fused = None  # q, k, v and gate as one GEMM, after fuse_projections()

    def fuse_projections(self) -> None:
        self.fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj, self.gate_proj])

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if fused_projections_usable(self.fused):
            return self.fused(x)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x), self.gate_proj(x)

    def gated_attention(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                        attn: AttentionMetadata, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Everything before o_proj: [T, hidden] -> the gated attention output [T, heads * head_dim] (the decoder
        layer folds o_proj into the norm step after it). With `rows` ([N] indices), only those rows' output
        [N, ...]: every row's K/V still reaches the cache (`AttentionMetadata.attend_gated`)."""
        t = x.shape[0]  # x: [T, hidden]
        q, k, v, gate = self._project(x)
        # per-head q/k RMSNorm, then RoPE on sliding layers only (full layers are NoPE), applied by the metadata
        # (a fast path folds them into its attention kernel)
        qk_norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, *rope, self.is_sliding)
        o = attn.attend_gated(self.layer_idx, q.view(t, self.num_heads, self.head_dim),
                              k.view(t, self.num_kv_heads, self.head_dim), v.view(t, self.num_kv_heads, self.head_dim),
                              self.window, self.scale, gate.view(t, self.num_heads, self.head_dim), qk_norm, rows)
        return o.reshape(o.shape[0], self.num_heads * self.head_dim)
