"""Quantized weights: FP8 (e4m3) with block, channel or tensor scales; 4-bit integers (W4A16) with group scales.

- `fp8`: quantizing and dequantizing over a grid of blocks; the activations' FP8 emulation.
- `scheme`: a checkpoint's compressed-tensors `quantization_config` (or online FP8) -> `QuantConfig`; what cannot
  run is refused by name.
- `modules`: `Fp8Linear`, `Fp8Experts` and the model restructured around them.
- `int4`: the 4-bit layout the engine keeps (packed codes, group scales, zero points, g_idx), quantizing and
  dequantizing; `int4_formats`: AWQ GEMM, GPTQ and compressed-tensors pack-quantized tensors converted into it;
  `int4_scheme`: their `quantization_config`s; `int4_modules`: `Int4Linear`, `Int4Experts`; `int4_load`: the
  checkpoint's tensors streamed into them.
"""
