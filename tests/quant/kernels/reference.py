"""Float64 references and helpers shared by the kernel tests."""

from __future__ import annotations

import zlib

import torch

from quantplan.quant.packing import PackedWeight, pack_weight
from quantplan.quant.quantizers import QuantizedWeight, dequantize_weight, quantize_weight
from quantplan.quant.schemes import WeightScheme

TOL = 1e-5  # relative error allowed against float64: the integer accumulation is exact
FP16_TOL = 2.0**-10  # one fp16 rounding of the result (plus the fp32 accumulation)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| (NaN when y has an unwritten, poisoned element)."""
    err = (y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)
    return float("nan") if torch.isnan(y).any() else float(err)


def seeded(*key: object) -> torch.Generator:
    """A generator seeded from the test's parameters: different inputs per case, the same on every run."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_weight(
    n: int, k: int, scheme: str | WeightScheme, gen: torch.Generator
) -> tuple[QuantizedWeight, PackedWeight]:
    ws = WeightScheme.parse(scheme) if isinstance(scheme, str) else scheme
    w = torch.randn(n, k, generator=gen) * (0.5 + torch.rand(n, 1, generator=gen))  # rows of different ranges
    qw = quantize_weight(w, ws, clip=0.95)
    return qw, pack_weight(qw)


def ref_a8(x_q: torch.Tensor, x_scale: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """(x_q * x_scale) @ dequant(W)^T + bias in float64."""
    s = x_scale.double().reshape(-1, 1) if x_scale.numel() > 1 else x_scale.double()
    y = (x_q.double() * s) @ dequantize_weight(qw, torch.float64).t()
    return y if bias is None else y + bias.double()


def ref_a16(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias in float64, W dequantized in fp32 and rounded to x's dtype (the kernel's weight)."""
    y = x.double() @ dequantize_weight(qw, torch.float32).to(x.dtype).double().t()
    return y if bias is None else y + bias.double()


def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An output buffer whose unwritten elements fail the checks: NaN, or -128 (no int8 code is ever -128)."""
    fill = -128 if dtype == torch.int8 else float("nan")
    return torch.full(shape, fill, dtype=dtype)
