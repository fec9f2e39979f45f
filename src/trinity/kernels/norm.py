"""RMSNorm-family ops, each beside its pure-torch reference, dispatched at run time.

The references reproduce the model's module code operation for operation (fp32 norm with an fp32 weight,
output in x's dtype; residual adds and RoPE in the activation dtype), so they equal it exactly.

Dispatch (`use_triton`, the same rule as `kernels.attention`): the Triton kernels (`kernels.norm_triton`)
run on CUDA tensors, and on CPU tensors under `TRINITY_KERNELS=triton` with `TRITON_INTERPRET=1` (Triton's
interpreter, for tests; set both before triton is imported); the references run when
`TRINITY_KERNELS=reference` / `use_reference(True)`, when autograd must see the op, when Triton is missing,
and on the CPU otherwise.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from . import interpreting, kernels_mode, reference_forced, triton_importable, use_triton  # noqa: F401


# --------------------------------------------------------------------------------------------- references
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Exactly `model.layers.RMSNorm.forward`."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual (in the dtype, like the decoder layer's add); normed = RMSNorm(new_residual)."""
    new_residual = residual + x
    return rms_norm_reference(new_residual, weight, eps), new_residual


def norm_add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, post_weight: torch.Tensor,
                                next_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sandwich-norm step: new_residual = residual + RMSNorm_post(x); normed = RMSNorm_next(new_residual)."""
    return add_rms_norm_reference(rms_norm_reference(x, post_weight, eps), residual, next_weight, eps)


def sum_norm_add_rms_norm_reference(parts: torch.Tensor, residual: torch.Tensor, post_weight: torch.Tensor,
                                    next_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sandwich-norm step after a MoE layer whose combine is left to it: parts [T, k, H] fp32 (each choice's
    weighted expert output) summed in fp32, rounded to the residual's dtype as the combine rounds, then
    `norm_add_rms_norm_reference`."""
    return norm_add_rms_norm_reference(parts.sum(dim=1).to(residual.dtype), residual, post_weight, next_weight, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qk_norm_rope_reference(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                           eps: float, cos: torch.Tensor | None, sin: torch.Tensor | None,
                           apply_rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """As the attention layer norms q and k: per-head RMSNorm (fp32, cast to the dtype), then neox RoPE in the dtype
    with cos/sin [T, D] already in the dtype. q: [T, Hq, D], k: [T, Hkv, D]."""
    q = rms_norm_reference(q, q_weight, eps)
    k = rms_norm_reference(k, k_weight, eps)
    if apply_rope:
        c, s = cos[:, None, :], sin[:, None, :]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
    return q, k


def sigmoid_gate_reference(o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return o * torch.sigmoid(gate)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU activation as the MLP modules write it."""
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------- native CPU
# Longest row the C kernels take (`MAX_ROW` in norm_cpu.c).
NATIVE_MAX_ROW = 8192


def native_wanted(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """The C kernels (`norm_cpu.c`): CPU activations in fp32 or bf16 (x and the other activations alike), rows
    up to NATIVE_MAX_ROW, no autograd, `native.library()` built."""
    from .native import library

    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.numel() > 0
            and x.shape[-1] <= NATIVE_MAX_ROW and all(t.device.type == "cpu" for t in others)
            and not torch.is_grad_enabled() and not reference_forced() and library() is not None)


def _bf16(x: torch.Tensor) -> int:
    return int(x.dtype == torch.bfloat16)


def _f32(w: torch.Tensor) -> torch.Tensor:
    return w.float().contiguous()  # norm weights are kept in fp32 (a no-op then)


def rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from .native import library

    x = x.contiguous()
    out, w = torch.empty_like(x), _f32(weight)
    library().trinity_rms_norm(x.data_ptr(), _bf16(x), w.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
                               x.shape[-1], eps, torch.get_num_threads())
    return out


def norm_add_rms_norm_native(x: torch.Tensor, residual: torch.Tensor, post_weight: torch.Tensor,
                             next_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from .native import library

    x, residual = x.contiguous(), residual.to(x.dtype).contiguous()
    normed, new_residual = torch.empty_like(x), torch.empty_like(x)
    post, nxt = _f32(post_weight), _f32(next_weight)
    library().trinity_norm_add_rms_norm(x.data_ptr(), residual.data_ptr(), _bf16(x), post.data_ptr(),
                                        nxt.data_ptr(), normed.data_ptr(), new_residual.data_ptr(),
                                        x.numel() // x.shape[-1], x.shape[-1], eps, torch.get_num_threads())
    return normed, new_residual


def qk_norm_rope_native(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                        eps: float, cos: torch.Tensor | None, sin: torch.Tensor | None,
                        apply_rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from .native import library

    q, k = q.contiguous(), k.to(q.dtype).contiguous()
    t, hq, d = q.shape
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    qw, kw = _f32(q_weight), _f32(k_weight)
    if apply_rope:
        cos, sin = cos.to(q.dtype).contiguous(), sin.to(q.dtype).contiguous()
    library().trinity_qk_norm_rope(q.data_ptr(), k.data_ptr(), _bf16(q), qw.data_ptr(), kw.data_ptr(),
                                   cos.data_ptr() if apply_rope else None, sin.data_ptr() if apply_rope else None,
                                   q_out.data_ptr(), k_out.data_ptr(), t, hq, k.shape[1], d, eps,
                                   torch.get_num_threads())
    return q_out, k_out


# --------------------------------------------------------------------------------------------- dispatch
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x, weight):
        from . import norm_triton
        return norm_triton.rms_norm(x, weight, eps)
    if native_wanted(x):
        return rms_norm_native(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (RMSNorm(x + residual), x + residual). Elsewhere than Triton the add, then `rms_norm`'s dispatch."""
    if use_triton(x, residual, weight):
        from . import norm_triton
        return norm_triton.add_rms_norm(x, residual, weight, eps)
    new_residual = residual + x
    return rms_norm(new_residual, weight, eps), new_residual


def norm_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, post_weight: torch.Tensor,
                      next_weight: torch.Tensor, eps: float, fp32_copy: bool = False) -> tuple[torch.Tensor, ...]:
    """-> (RMSNorm_next(r), r) with r = residual + RMSNorm_post(x): a sublayer's post-norm, the residual add
    and the next sublayer's pre-norm in one pass. `fp32_copy`: also the first output widened to fp32 (written by
    the same launch on the Triton path)."""
    if use_triton(x, residual, post_weight, next_weight):
        from . import norm_triton
        return norm_triton.norm_add_rms_norm(x, residual, post_weight, next_weight, eps, fp32_copy)
    if native_wanted(x, residual):
        out = norm_add_rms_norm_native(x, residual, post_weight, next_weight, eps)
    else:
        out = norm_add_rms_norm_reference(x, residual, post_weight, next_weight, eps)
    return (*out, out[0].float()) if fp32_copy else out



def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 cos: torch.Tensor | None, sin: torch.Tensor | None,
                 apply_rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q, k, q_weight, k_weight):
        from . import norm_triton
        return norm_triton.qk_norm_rope(q, k, q_weight, k_weight, eps, cos, sin, apply_rope)
    if native_wanted(q, k) and q.shape[-1] % 2 == 0:
        return qk_norm_rope_native(q, k, q_weight, k_weight, eps, cos, sin, apply_rope)
    return qk_norm_rope_reference(q, k, q_weight, k_weight, eps, cos, sin, apply_rope)


def sigmoid_gate(o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    if use_triton(o, gate):
        from . import norm_triton
        return norm_triton.sigmoid_gate(o, gate)
    return sigmoid_gate_reference(o, gate)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate, up):
        from . import norm_triton
        return norm_triton.silu_mul(gate, up)
    return silu_mul_reference(gate, up)
