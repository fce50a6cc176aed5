"""Kernel dispatch: which kernel computes a layer scheme and on which backend; unsupported combinations raise.

`KERNELS` pairs each row of the torch-free table `quant.kernels.served.SERVED` (which weight schemes a kernel
takes, with int8 or float activations; the search space reads the same table) with its implementations, in the
table's order: the first kernel that takes the weight scheme for the layer's activation width runs it. Backends:
'triton' (compiled on CUDA, interpreted on CPU tensors) and 'torch' (the references: the same integer
arithmetic, `torch._int_mm` on the CPU); 'auto' picks Triton on CUDA and torch on the CPU. Activations are
quantized by their strategy's handler (`quant.act_handlers`), whatever the strategy. Nothing falls back
silently: a scheme no kernel takes, a dtype no kernel handles, or a missing Triton raises a `KernelError` that
says what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import torch

from quantplan.quant.act_handlers import ActParams, act_handler
from quantplan.quant.kernels import w4a8, w4a16, w8a8
from quantplan.quant.kernels.cpu import Int4Pack, int4pack_mm
from quantplan.quant.kernels.runtime import KernelInputError, UnsupportedSchemeError, resolve_backend
from quantplan.quant.kernels.served import Served, served
from quantplan.quant.packing import PackedWeight, unpack_weight
from quantplan.quant.quantizers import dequantize_weight
from quantplan.quant.schemes import ActScheme, LayerScheme, WeightScheme


@dataclass(frozen=True)
class Kernel:
    """One registered GEMM: its row of the served table and its two implementations."""

    serves: Served
    triton: Callable[..., torch.Tensor]
    torch: Callable[..., torch.Tensor]
    prepare: Callable[[PackedWeight], torch.Tensor] | None = None  # the torch path's weight layout, if it has one

    @property
    def name(self) -> str:
        return self.serves.kernel

    @property
    def int8_activations(self) -> bool:
        return self.serves.act_bits == 8

    def check(self, scheme: WeightScheme) -> None:
        reason = self.serves.refusal(scheme)
        if reason is not None:
            raise UnsupportedSchemeError(reason)


KERNELS: tuple[Kernel, ...] = (
    Kernel(served("w8a8"), w8a8.w8a8_triton, w8a8.w8a8_ref),
    Kernel(served("w4a8"), w4a8.w4a8_triton, w4a8.w4a8_cpu, w4a8.prepare),
    Kernel(served("w4a16"), w4a16.w4a16_triton, w4a16.w4a16_ref, w4a16.prepare),
)


def select_kernel(scheme: LayerScheme) -> Kernel:
    """The kernel that computes `scheme`, or UnsupportedSchemeError with every kernel's reason."""
    if not scheme.weight.quantized:
        raise UnsupportedSchemeError(
            f"{scheme}: w16 weights are not quantized; keep the layer as nn.Linear (activation-only int8 has no kernel)"
        )
    reasons = []
    for kernel in (k for k in KERNELS if k.serves.act_bits == scheme.act.bits):
        reason = kernel.serves.refusal(scheme.weight)
        if reason is None:
            return kernel
        reasons.append(f"{kernel.name}: {reason}")
    if not reasons:
        reasons.append(f"no kernel takes {scheme.act.bits}-bit activations")
    raise UnsupportedSchemeError(f"no kernel computes {scheme} ({'; '.join(reasons)})")


def _static_params(act_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {} if act_scale is None else {"act_scale": act_scale}


def quantize_activations(
    x: torch.Tensor,
    act: ActScheme,
    act_scale: torch.Tensor | None = None,
    inv_pre_scale: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 codes, fp32 scales) under `act` (its handler: dynamic per token, or static with the
    calibrated scale, ...)."""
    return act_handler(act).quantize(x, _static_params(act_scale), inv_pre_scale, backend)[:2]


def _int4pack_run(packed: Int4Pack, int8_activations: bool, x: torch.Tensor, *args: object) -> torch.Tensor:
    """The bf16 CPU product with a kernel's torch-path signature: (x, pw, bias, out_dtype) for 16-bit activations,
    (x_q, x_scale, pw, bias, out_dtype) for int8 codes (exact in bf16) and their scales."""
    x_scale = args[0] if int8_activations else None
    bias, out_dtype = args[-2:]
    assert isinstance(out_dtype, torch.dtype) and (bias is None or isinstance(bias, torch.Tensor))
    y = int4pack_mm(x if x_scale is None else x.float(), packed)
    if isinstance(x_scale, torch.Tensor):
        y = y * (x_scale.reshape(-1, 1) if x_scale.numel() > 1 else x_scale)
    return (y if bias is None else y + bias.float()).to(out_dtype)


def weight_row_sums(pw: PackedWeight) -> torch.Tensor:
    """sum_k W[n, k] of the dequantized weight, fp32 [N]: what an activation offset multiplies."""
    return dequantize_weight(unpack_weight(pw)).sum(1)


def quantized_linear(
    x: torch.Tensor,
    pw: PackedWeight,
    act: ActScheme,
    *,
    act_scale: torch.Tensor | None = None,
    inv_pre_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
    prepared: torch.Tensor | None = None,
    kernel: Kernel | None = None,
    act_params: ActParams | None = None,
    row_sums: torch.Tensor | None = None,
    int4pack: Int4Pack | None = None,
    dense: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y [..., N] = Q_a(x * inv_pre_scale) @ W^T + bias for x [..., K], in `out_dtype` (default: x's dtype).

    `prepared` (the kernel's `prepare(pw)`), `kernel` (`select_kernel` of the scheme) and `row_sums` (for
    strategies whose codes carry an offset: `weight_row_sums(pw)`) are what a caller such as QuantLinear keeps
    from one call to the next; without them they are worked out here. `act_params` are the strategy's calibrated
    tensors (`act_scale` is the static scale of the built-in strategies). `int4pack` (`prepare_int4pack(pw)`): the torch
    backend computes the product with torch's bf16 int4 GEMM (`quant.kernels.cpu`) instead of the exact path.
    `dense` (`w4a8.dense_weight(pw)`, W4A8 on the torch backend): the dequantized weight its float GEMM
    multiplies, kept by the caller instead of rebuilt per call.
    """
    kernel = kernel or select_kernel(LayerScheme(pw.scheme, act))
    chosen = resolve_backend(x.device, backend)
    if x.ndim == 0 or x.shape[-1] != pw.in_features:
        raise KernelInputError(f"input of shape {tuple(x.shape)} does not end in in_features={pw.in_features}")
    x2 = x.reshape(-1, pw.in_features)
    out_dtype = out_dtype or x.dtype
    extra = {"prepared": prepared} if chosen == "torch" and prepared is not None else {}
    if chosen == "torch" and dense is not None:
        extra["dense"] = dense
    run = kernel.triton if chosen == "triton" else kernel.torch
    if int4pack is not None and chosen == "torch":
        run, extra = partial(_int4pack_run, int4pack, kernel.int8_activations), {}
    if not kernel.int8_activations:
        y = run(x2 if inv_pre_scale is None else x2 * inv_pre_scale, pw, bias, out_dtype, **extra)
        return y.reshape(*x.shape[:-1], pw.out_features)
    params: Mapping[str, torch.Tensor] = act_params if act_params is not None else _static_params(act_scale)
    x_q, x_scale, offset = act_handler(act).quantize(x2, params, inv_pre_scale, chosen)
    y = run(x_q, x_scale, pw, bias, out_dtype, **extra)
    if offset is not None:  # x = codes * scale + offset (per token): Y += offset sum_k W[n, k]
        sums = weight_row_sums(pw) if row_sums is None else row_sums
        y = y.float().add_(offset.reshape(-1, 1).float() * sums).to(out_dtype)
    return y.reshape(*x.shape[:-1], pw.out_features)
