"""GPTQ for symmetric group-wise int4 (W4A16), written from the paper's algorithm (Frantar et al., 2022, "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers").

The layer-wise objective is ||W X - Q X||^2 over calibration inputs X; its Hessian is H = 2 X^T X. Columns are
quantized one at a time, left to right, and each column's rounding error is spread over the columns not yet
quantized, weighted by the Cholesky factor of H^-1 (the paper's reformulation of the OBS update, numerically stable
and needing H^-1 once). Updates to columns beyond the current block of 128 are applied in one matrix product per
block ("lazy batch" updates). Each group's scale is fixed when its first column is reached, from the group's
weights as they are at that point (already carrying the earlier columns' error), as the paper's group variant does.
"""

from __future__ import annotations

import torch

from . import int4


class Hessian:
    """Running H = 2 / n * sum x x^T over calibration inputs of one linear layer (fp64 accumulation: sums over
    many tokens of an fp32 square lose digits a Cholesky then amplifies)."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    CHUNK_ROWS = 2048  # rows widened to fp64 at a time: a copy of a chunk, never of every calibration token

    def add(self, x: torch.Tensor) -> None:
        for rows in x.reshape(-1, x.shape[-1]).split(self.CHUNK_ROWS):
            rows = rows.double()
            self.h += rows.T @ rows
            self.n += rows.shape[0]

    def value(self) -> torch.Tensor:
        return (2.0 / max(self.n, 1)) * self.h


def group_scale(w: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Symmetric int4 scale per row of w [out, g] -> [out], as `int4.quantize` makes it (absmax / 7.5, rounded to
    the checkpoint's scale dtype; an all-zero group gets 1)."""
    scale = w.abs().amax(dim=1) / (int4.MAX_CODE / 2)
    return torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype).float()


def quantize_column(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest of a column [out] on the symmetric grid (codes -8..7) -> the dequantized column."""
    return torch.clamp(torch.round(w / scale), -int4.SYMMETRIC_ZERO, int4.MAX_CODE - int4.SYMMETRIC_ZERO) * scale


def gptq(w: torch.Tensor, h: torch.Tensor, group: int, scale_dtype: torch.dtype = torch.float32,
         damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in], h [in, in] -> (the dequantized weight Q [out, in] fp32, scales [out, G] fp32).

    Q is exactly (code - 8) * scale for int4 codes, so `int4.quantize`-style packing of Q with these scales (or the
    compressed-tensors compressor given them) recovers the codes. The block is widened to a multiple of the group,
    so a group's columns are all inside one block when its scale is chosen."""
    out, inp = w.shape
    w = w.detach().float().clone()
    h = h.detach().double().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their columns do not matter, quantize them to 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    mean_diag = torch.diag(h).mean()
    for attempt in range(4):  # a Hessian from few, collinear tokens may need more damping to be positive definite
        try:
            damped = h + damp * 10 ** attempt * mean_diag * torch.eye(inp, dtype=h.dtype)
            # U: the upper Cholesky factor of H^-1; row i spreads column i's error over the columns after it
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(damped))
            u = torch.linalg.cholesky(hinv, upper=True).float()
            break
        except torch.linalg.LinAlgError:
            if attempt == 3:
                raise

    block = max(group, (block // group) * group)
    q = torch.zeros_like(w)
    scales = torch.zeros(out, int4.num_groups(inp, group))
    for i1 in range(0, inp, block):
        i2 = min(i1 + block, inp)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col = i1 + j
            if col % group == 0:  # the group's scale, from its columns as the earlier errors left them
                scales[:, col // group] = group_scale(w1[:, j:j + group], scale_dtype)
            scale = scales[:, col // group]
            qc = quantize_column(w1[:, j], scale)
            q[:, col] = qc
            e = (w1[:, j] - qc) / u[col, col]
            w1[:, j:] -= e[:, None] * u[col, col:i2][None, :]
            err1[:, j] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return q, scales
