"""Quantized GEMM kernels: one Triton kernel per module with its torch reference beside it, plus dispatch.

- `act_quant`: activations to int8 (per-token dynamic or per-tensor static, optional fused pre-scale)
- `w4a8`: int8 activations x 2/4-bit (and grouped 8-bit) packed weights, float accumulation per group
- `w8a8`: int8 activations x int8 per-channel weights, one int32 accumulator over K
- `w4a16`: 16/32-bit activations x packed weights dequantized in the kernel
- `dispatch`: picks the kernel for a layer scheme and the backend (Triton on CUDA, torch on the CPU)
"""
