"""What the quantized-checkpoint tests (test_fp8, test_int4, test_quantize) share: fp32 logits of a model on a few
ids, their relative difference, and the weight a loaded quantized model computes with for an HF module name."""

from __future__ import annotations

import torch

IDS = torch.tensor([[1, 5, 9, 22, 7, 3, 100, 42, 17, 250]])


def logits(m, ids=IDS):
    with torch.inference_mode():
        return m(ids).float()


def rel(a, b):
    """Largest difference relative to the reference's largest value."""
    return ((a - b).abs().max() / b.abs().max()).item()


def loaded_weight(model, module: str) -> torch.Tensor:
    """What the loaded model computes with for an HF module name (fp32): a projection's dequantized weight, or one
    expert's gate, up or down."""
    if ".mlp.experts." in module:
        prefix, e, proj = module.rsplit(".", 2)
        gate_up, down = model.get_submodule(prefix).expert_weights(int(e), torch.float32)
        i = down.shape[1]
        return {"gate_proj": gate_up[:i], "up_proj": gate_up[i:], "down_proj": down}[proj]
    return model.get_submodule(module).dequantized(torch.float32)
