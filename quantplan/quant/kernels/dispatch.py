"""Kernel dispatch: which kernel computes a layer scheme and on which backend; unsupported combinations raise.

`KERNELS` is the registry, tried in order: the first kernel whose `check` accepts the weight scheme (for the
layer's activation width) runs it. A new kernel is a new entry. Backends: 'triton' (compiled on CUDA, interpreted
on CPU tensors) and 'torch' (the references: the same integer arithmetic, `torch._int_mm` on the CPU); 'auto'
picks Triton on CUDA and torch on the CPU. Nothing falls back silently: a scheme no kernel takes, a dtype no
kernel handles, or a missing Triton raises a `KernelError` that says what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantplan.quant.kernels import act_quant, w4a8, w4a16, w8a8
from quantplan.quant.kernels.runtime import KernelInputError, UnsupportedSchemeError, resolve_backend
from quantplan.quant.packing import PackedWeight
from quantplan.quant.schemes import ActScheme, LayerScheme, WeightScheme


@dataclass(frozen=True)
class Kernel:
    """One registered GEMM: which weights it takes, with int8 or float activations, and its two implementations."""

    name: str
    int8_activations: bool
    check: Callable[[WeightScheme], None]  # raises UnsupportedSchemeError with the reason
    triton: Callable[..., torch.Tensor]
    torch: Callable[..., torch.Tensor]
    prepare: Callable[[PackedWeight], torch.Tensor] | None = None  # the torch path's weight layout, if it has one


KERNELS: tuple[Kernel, ...] = (
    Kernel("w8a8", True, w8a8.check_supported, w8a8.w8a8_triton, w8a8.w8a8_ref),
    Kernel("w4a8", True, w4a8.check_supported, w4a8.w4a8_triton, w4a8.w4a8_ref, w4a8.prepare),
    Kernel("w4a16", False, w4a16.check_supported, w4a16.w4a16_triton, w4a16.w4a16_ref, w4a16.prepare),
)


def select_kernel(scheme: LayerScheme) -> Kernel:
    """The kernel that computes `scheme`, or UnsupportedSchemeError with every kernel's reason."""
    if not scheme.weight.quantized:
        raise UnsupportedSchemeError(
            f"{scheme}: w16 weights are not quantized; keep the layer as nn.Linear (activation-only int8 has no kernel)"
        )
    int8 = scheme.act is not ActScheme.A16
    reasons = []
    for kernel in (k for k in KERNELS if k.int8_activations == int8):
        try:
            kernel.check(scheme.weight)
            return kernel
        except UnsupportedSchemeError as e:
            reasons.append(f"{kernel.name}: {e}")
    raise UnsupportedSchemeError(f"no kernel computes {scheme} ({'; '.join(reasons)})")


def quantize_activations(
    x: torch.Tensor,
    act: ActScheme,
    act_scale: torch.Tensor | None = None,
    inv_pre_scale: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 codes, fp32 scales) under `act`: dynamic per token, or static with the calibrated scale."""
    if act is ActScheme.A16:
        raise UnsupportedSchemeError("a16 activations are not quantized")
    static = None if act is ActScheme.DYNAMIC else act_scale
    if act is not ActScheme.DYNAMIC and static is None:
        raise KernelInputError(f"{act} needs a calibrated per-tensor activation scale (act_scale); calibrate first")
    if resolve_backend(x.device, backend) == "triton":
        return act_quant.quantize_act_triton(x, static, inv_pre_scale)
    return act_quant.quantize_act_ref(x, static, inv_pre_scale)


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
) -> torch.Tensor:
    """Y [..., N] = Q_a(x * inv_pre_scale) @ W^T + bias for x [..., K], in `out_dtype` (default: x's dtype).

    `prepared` (the kernel's `prepare(pw)`, kept by the caller) spares the torch path unpacking the weight on
    every call; the Triton path reads the packed codes.
    """
    kernel = select_kernel(LayerScheme(pw.scheme, act))
    chosen = resolve_backend(x.device, backend)
    if x.ndim == 0 or x.shape[-1] != pw.in_features:
        raise KernelInputError(f"input of shape {tuple(x.shape)} does not end in in_features={pw.in_features}")
    x2 = x.reshape(-1, pw.in_features)
    out_dtype = out_dtype or x.dtype
    extra = {"prepared": prepared} if chosen == "torch" and prepared is not None else {}
    run = kernel.triton if chosen == "triton" else kernel.torch
    if kernel.int8_activations:
        x_q, x_scale = quantize_activations(x2, act, act_scale, inv_pre_scale, chosen)
        y = run(x_q, x_scale, pw, bias, out_dtype, **extra)
    else:
        y = run(x2 if inv_pre_scale is None else x2 * inv_pre_scale, pw, bias, out_dtype, **extra)
    return y.reshape(*x.shape[:-1], pw.out_features)
