"""The "fast" CPU kernel (bf16 products) of the W4A8 and W4A16 layers: torch's int4 weight-only GEMM for small M
(decoding). QuantLinear uses it when built (or set) with `cpu_kernels="fast"` (what `quantplan generate` runs), for
the calls and weights it serves; "exact" (the default, what evaluations measure) keeps the integer and fp32 torch
paths everywhere.

torch ships the CPU int4 GEMM that torchao uses on the CPU: `aten._convert_weight_to_int4pack_for_cpu` packs
unsigned 4-bit codes once, `aten._weight_int4pack_mm_for_cpu` multiplies bf16 activations by them, dequantizing
each group on the fly as `w = (q - 8) * scale + zero` with bf16 scales and zeros, accumulating in fp32. It reads
half a byte per weight where an fp32 GEMV reads four, so it wins where the product is memory-bound (small M);
its fp32 and fp16 variants are scalar fallbacks (10-100x slower, measured), so only bf16 is used.

Both QuantPlan weight families map onto it exactly before rounding to bf16:
- symmetric `w = c * s`, c in [-8, 7]: q = c + 8, zero = 0;
- asymmetric `w = (q - z) * s`, q, z in [0, 15]: zero = (8 - z) * s.

So the result differs from the fp32 reference by bf16 rounding only: of the activations (or of the int8 codes'
dequantized values for W4A8: none, integers up to 256 are exact in bf16), of the scales and zeros (8 bits of
mantissa: 2^-9 relative), and of the output. `INT4PACK_RTOL` is the tolerance the tests hold it to.

Constraints of the packing: N a multiple of 16, g in {32, 64, 128, 256} dividing K_pad (`int4pack_serves`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantplan.quant.packing import PackedWeight, unpack_codes, unpack_zeros

INT4PACK_GROUPS = (32, 64, 128, 256)
# M up to this: the int4pack GEMM; above, the exact paths (a bf16 GEMM on the weight dequantized per call measured
# 0.06-0.23x an fp32 GEMM from 64 rows on: the unpacking dominates; docs/BENCHMARKS.md, "CPU kernels")
INT4PACK_ROWS = 16
INT4PACK_RTOL = 2e-2  # relative to max |Y| (bf16 activations and scales: ~1e-3 typical, tested on odd shapes)


def int4pack_serves(pw: PackedWeight) -> bool:
    """Whether the int4pack GEMM can take this packed weight (4-bit, grouped, shapes it packs)."""
    return (pw.bits == 4 and not pw.per_channel and pw.group_size in INT4PACK_GROUPS
            and pw.out_features % 16 == 0 and pw.k_pad % pw.group_size == 0 and pw.codes.device.type == "cpu")


@dataclass(frozen=True)
class Int4Pack:
    """A packed weight in int4pack's layout: the packed codes and the [G, N, 2] bf16 scales and zeros."""

    codes: torch.Tensor
    scales_zeros: torch.Tensor
    group_size: int
    k_pad: int


def prepare_int4pack(pw: PackedWeight) -> Int4Pack:
    """Repack `pw` for `int4pack_mm` (once per layer: QuantLinear caches it)."""
    if not int4pack_serves(pw):
        raise ValueError(f"{pw.scheme} [{pw.out_features} x {pw.in_features}] is not int4pack-able")
    codes = unpack_codes(pw).to(torch.int32)  # [N, K_pad]
    scales = pw.scales.float()  # [G, N]
    zeros = unpack_zeros(pw)  # [N, G] or None
    if zeros is None:
        q, zero = codes + 8, torch.zeros_like(scales)
    else:
        q, zero = codes, (8 - zeros.t().float()) * scales
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    scales_zeros = torch.stack([scales, zero], dim=-1).to(torch.bfloat16).contiguous()
    return Int4Pack(packed, scales_zeros, pw.group_size, pw.k_pad)


def int4pack_mm(x: torch.Tensor, w: Int4Pack) -> torch.Tensor:
    """fp32 [M, N] = x [M, K] @ W^T through the bf16 int4pack GEMM (x padded to K_pad with zeros)."""
    xb = F.pad(x, (0, w.k_pad - x.shape[1])).to(torch.bfloat16)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w.codes, w.group_size, w.scales_zeros).float()


CPU_KERNEL_MODES = ("exact", "fast")  # QuantLinear.cpu_kernels: "fast" runs `int4pack_mm` where it serves
