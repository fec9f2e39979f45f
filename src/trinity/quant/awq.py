"""Activation-aware scaling for int4 weights, written from the idea of the AWQ paper (Lin et al., 2023, "AWQ:
Activation-aware Weight Quantization for LLM Compression and Acceleration").

A few input channels carry much larger activations than the rest; their weights matter most, and round-to-nearest
treats them like any other. Scaling input channel c of a weight by s_c > 1 (and its input by 1 / s_c, folded into
the operation that makes the input, so the float function is unchanged) gives those weights more of the grid. The
scales are s = mean|x|^alpha per channel, with alpha searched on a grid over [0, 1] for the smallest output error
of the layers that share the input, measured on calibration activations; alpha = 0 is s = 1, plain round-to-nearest,
so the chosen scales never do worse than RTN on the calibration data.

Where the 1 / s goes (`trinity.quant.quantize`): into the RMSNorm before q/k/v/gate (attention) and before the MLP's
gate/up (with the router's columns scaled by s, since the router reads the same normed input and stays in float);
down_proj's into the rows of up_proj (silu(gate) * up is linear in up). o_proj's input is attention's gated output,
where a per-channel factor would have to pass through the value heads shared by several query heads and the sigmoid
gate's product: no folding there, o_proj gets only the clipping search. That search (`search_clip`) runs on every
weight but q/k after the scales: each (row, group)'s range shrunk by the ratio that gives its part of the output the
smallest error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import int4


def rtn(w: torch.Tensor, group: int, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Symmetric group-wise round-to-nearest of w [out, in], read back in fp32."""
    return int4.dequantize(int4.quantize(w, group, True, scale_dtype=scale_dtype), torch.float32)


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """||x w^T - x wq^T||^2 summed (x [N, in])."""
    return gram_error(gram(x), w, wq)


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x [in, in] in fp64: the output error of any weight on x, without x (the search tries many weights)."""
    x = x.double()
    return x.T @ x


def gram_error(g: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """||x (w - wq)^T||^2 = sum((D G) * D), D = w - wq, G = x^T x."""
    d = (w - wq).double()
    return float(((d @ g) * d).sum())


def search_scales(pairs: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor]]], mean_abs: torch.Tensor, group: int,
                  scale_dtype: torch.dtype = torch.float32, grid: int = 20) -> tuple[torch.Tensor, float, dict]:
    """The per-channel scale s [in] for weights sharing one input.

    pairs: (x [N_j, in], weights [out, in] that see x): several inputs where the weights see different tokens
    (a MoE block's experts, each on the tokens routed to it, all behind one norm). mean_abs: mean |x| per channel
    over all tokens. Returns (s, best alpha, {alpha: error}); the error is the summed output error of every weight
    quantized as w * s and fed x / s."""
    errors: dict[float, float] = {}
    best = (float("inf"), 0.0, torch.ones_like(mean_abs))
    base = mean_abs.float().clamp(min=1e-5)
    grams = [(gram(x), weights) for x, weights in pairs]
    for k in range(grid + 1):
        alpha = k / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales' range on 1: the fp range stays balanced
        err = 0.0
        inv = (1 / s).double()
        for g, weights in grams:
            gs = g * inv[:, None] * inv[None, :]  # the Gram matrix of x / s
            for w in weights:
                err += gram_error(gs, w * s, rtn(w * s, group, scale_dtype))
        errors[alpha] = err
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], errors


CLIP_RATIOS = tuple(1.0 - 0.05 * k for k in range(11))  # down to half the group's range, as AWQ's clip search


def search_clip(w: torch.Tensor, x: torch.Tensor, group: int, scale_dtype: torch.dtype = torch.float32,
                ratios: Sequence[float] = CLIP_RATIOS) -> tuple[torch.Tensor, float]:
    """w [out, in] with each (row, group) clipped to the ratio of its absolute maximum that gives the smallest
    error of that group's part of the output on x (1.0: no clipping, plain RTN), as AWQ does. The groups' parts
    are judged apart (the Gram matrix's diagonal blocks), so the choice is re-checked on the whole output against
    no clipping and the best single ratio: the result never does worse than RTN on x.
    Returns (the clipped float weight to quantize, the mean ratio)."""
    out, inp = w.shape
    groups = torch.arange(inp) // group
    count = int(groups.max()) + 1
    amax = torch.zeros(out, count).scatter_reduce(1, groups.expand(out, inp), w.abs(), "amax")
    g = gram(x)
    starts = range(0, inp, group)
    candidates, part_errors = [], []
    for r in ratios:
        limit = (r * amax).index_select(1, groups)
        clipped = torch.maximum(torch.minimum(w, limit), -limit)
        d = (w - rtn(clipped, group, scale_dtype)).double()
        part_errors.append(torch.stack([((d[:, a:a + group] @ g[a:a + group, a:a + group]) * d[:, a:a + group])
                                        .sum(1) for a in starts], 1))
        candidates.append(clipped)
    pick = torch.stack(part_errors).argmin(0)  # [out, groups]: the best ratio's index per (row, group)
    per_group = torch.stack(candidates).gather(0, pick.index_select(1, groups)[None]).squeeze(0)
    options = [(gram_error(g, w, rtn(c, group, scale_dtype)), float(r), c) for r, c in zip(ratios, candidates)]
    ratio_mean = float(torch.tensor(ratios, dtype=torch.float64)[pick].mean())
    options.append((gram_error(g, w, rtn(per_group, group, scale_dtype)), ratio_mean, per_group))
    _, ratio, best = min(options, key=lambda o: o[0])
    return best, ratio
