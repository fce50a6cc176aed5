"""Quantized GEMM kernels: one Triton kernel per module with its torch reference beside it, plus dispatch.

- `act_quant`: activations to int8 (per-token dynamic or per-tensor static, optional fused pre-scale)
- `w4a8`: int8 activations x 2/4-bit (and grouped symmetric 8-bit) packed weights, fp32 accumulation per group
- `w8a8`: int8 activations x int8 per-channel weights, one int32 accumulator over K
- `w4a16`: fp16/fp32 activations x packed weights dequantized in the kernel
- `dispatch`: the kernel registry; picks the kernel for a layer scheme and the backend (Triton on CUDA, torch on
  the CPU) and refuses what no kernel computes
- `runtime`: optional Triton, errors, tile configs, autotuning and launching; `intmath`: exact int8 products for
  the torch references

The packed weight format is `quant.packing` (docs/FORMAT.md); the layer built on all this is `quant.qlinear`.
"""
