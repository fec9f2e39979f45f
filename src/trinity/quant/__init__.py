"""Quantized weights: FP8 (e4m3) with block, channel or tensor scales.

- `fp8`: quantizing and dequantizing over a grid of blocks; the activations' FP8 emulation.
- `scheme`: a checkpoint's compressed-tensors `quantization_config` (or online FP8) -> `QuantConfig`; what cannot
  run is refused by name.
- `modules`: `Fp8Linear`, `Fp8Experts` and the model restructured around them.
"""
