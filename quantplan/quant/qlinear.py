"""QuantLinear: a linear layer computed from packed weights by the quantized kernels (Triton on CUDA, torch on the CPU).

It computes what `quant.modules.FakeQuantLinear` simulates, `y = Q_a(x / s) @ Q_w(W diag(s))^T + b`, with the
same scheme, activation parameters and pre-scale, but in integer arithmetic from the stored codes: the two agree
to float rounding, so the search optimizes what is deployed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from quantplan.quant.act_handlers import ActParams, act_handler
from quantplan.quant.kernels.cpu import CPU_KERNEL_MODES, INT4PACK_ROWS, int4pack_serves, prepare_int4pack
from quantplan.quant.kernels.dispatch import Kernel, quantized_linear, select_kernel, weight_row_sums
from quantplan.quant.kernels.runtime import KernelError, resolve_backend
from quantplan.quant.kernels.w4a8 import dense_weight, uses_dense
from quantplan.quant.packing import PackedWeight, pack_weight
from quantplan.quant.plan import LayerSpec
from quantplan.quant.quantizers import quantize_weight
from quantplan.quant.schemes import ActScheme, LayerScheme

FAST_KERNELS = ("w4a8", "w4a16")  # the kernels whose CPU products cpu_kernels="fast" replaces (quant.kernels.cpu)


class QuantLinear(nn.Module):
    """Packed weights (buffers `codes`, `scales`, `zeros`) plus the activation strategy and its parameters.

    Everything a forward needs is decided once, when the layer is built: the kernel, the activation strategy's
    handler, the (validated) packed weight, and on the torch backend the weight in the layout the torch path
    multiplies (int8, 1 byte per weight; int16 for asymmetric w8 at a16; nothing for w8a8, whose codes are
    already int8), prepared at the first forward. The prepared layout is not part of the state dict and is
    rebuilt when the codes move, are loaded, or (outside inference mode) change in place. The activation
    parameters are buffers under their names (`act_scale`: the static scale of the built-in strategies).
    """

    def __init__(
        self,
        packed: PackedWeight,
        act: ActScheme,
        bias: torch.Tensor | None = None,
        *,
        act_scale: torch.Tensor | None = None,
        inv_pre_scale: torch.Tensor | None = None,
        backend: str | None = None,
        act_params: ActParams | None = None,
        kernel: Kernel | None = None,
        cpu_kernels: str = "exact",
    ) -> None:
        super().__init__()
        self.scheme = LayerScheme(packed.scheme, act)
        self.kernel = kernel or select_kernel(self.scheme)  # unsupported schemes fail here, not at the first forward
        self.handler = act_handler(act)
        params = {**({} if act_scale is None else {"act_scale": act_scale.detach().float()}), **(act_params or {})}
        if self.kernel.int8_activations:
            self.handler.check_params(params, packed.in_features)
        shapes = self.handler.param_shapes(packed.in_features)
        params = {k: v.detach().reshape(shapes[k]) if k in shapes else v.detach() for k, v in params.items()}
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.backend = backend
        self.register_buffer("codes", packed.codes)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("act_scale", params.pop("act_scale", None))
        for key, value in params.items():
            self.register_buffer(key, value)
        self._param_names = ("act_scale", *params)
        self.register_buffer("inv_pre_scale", inv_pre_scale)
        self._packed = packed
        self._prepared: dict[str, tuple[tuple[int, torch.device, int], Any]] = {}
        self._fast = False
        self.cpu_kernels = cpu_kernels  # decided once per layer: which kernel family runs it on the CPU
        self.register_load_state_dict_post_hook(QuantLinear._forget_prepared)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: LayerSpec,
        *,
        act_scale: torch.Tensor | None = None,
        pre_scale: torch.Tensor | None = None,
        backend: str | None = None,
        act_params: ActParams | None = None,
    ) -> QuantLinear:
        """Quantize and pack `weight` [N, K] (already multiplied by the equalization s, as FakeQuantLinear takes it)."""
        kernel = select_kernel(spec.scheme)  # before the quantization work
        packed = pack_weight(quantize_weight(weight.detach(), spec.scheme.weight, spec.clip))
        inv = None if pre_scale is None else (1.0 / pre_scale).to(weight.dtype)  # as FakeQuantLinear rounds it
        return cls(packed, spec.scheme.act, bias, act_scale=act_scale, inv_pre_scale=inv, backend=backend,
                   act_params=act_params, kernel=kernel)

    @property
    def packed(self) -> PackedWeight:
        return self._packed

    @property
    def act_params(self) -> dict[str, torch.Tensor]:
        """The calibrated activation parameters by name (those that are set)."""
        return {k: t for k in self._param_names if (t := getattr(self, k)) is not None}

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """What an artifact stores for this layer, in its order: packed weight, activation parameters, 1/s."""
        pre = {} if self.inv_pre_scale is None else {"inv_pre_scale": self.inv_pre_scale}
        return {**self._packed.tensors(), **self.act_params, **pre}

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> QuantLinear:
        super()._apply(fn, *args, **kwargs)  # .to(), .cuda(), ... replace the buffers: re-wrap them once
        self._packed = PackedWeight(self.codes, self.scales, self.zeros, self.in_features, self.scheme.weight)
        self._prepared = {}
        return self

    def _forget_prepared(self, incompatible_keys: object) -> None:
        self._prepared = {}  # load_state_dict copies into the same storage: data_ptr alone would not notice

    def _cached(self, what: str, make: Callable[[PackedWeight], Any]) -> Any:
        """`make(packed)`, computed once per codes tensor (its storage, device and version)."""
        version = -1 if self.codes.is_inference() else self.codes._version  # inference tensors keep no counter
        key = (self.codes.data_ptr(), self.codes.device, version)
        hit = self._prepared.get(what)
        if hit is None or hit[0] != key:
            hit = self._prepared[what] = (key, make(self._packed))
        return hit[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on_torch = resolve_backend(x.device, self.backend) == "torch"
        fast = on_torch and self._fast and x.numel() // self.in_features <= INT4PACK_ROWS
        prepare = self.kernel.prepare
        return quantized_linear(
            x,
            self._packed,
            self.scheme.act,
            inv_pre_scale=self.inv_pre_scale,
            bias=self.bias,
            backend=self.backend,
            prepared=self._cached("weight", prepare) if on_torch and prepare is not None and not fast else None,
            kernel=self.kernel,
            act_params=self.act_params,
            row_sums=self._cached("row_sums", weight_row_sums) if self.handler.offsets else None,
            int4pack=self._cached("int4pack", prepare_int4pack) if fast else None,
            dense=self._dense(x) if on_torch and not self._fast else None,  # fast mode keeps no fp32 copy
        )

    def _dense(self, x: torch.Tensor) -> torch.Tensor | None:
        """The exact W4A8 path's dequantized fp32 weight, kept once a call is large enough to use it (evaluation
        batches: `w4a8.uses_dense`); None for other kernels and smaller calls (nothing is kept for decoding)."""
        if self.kernel.name != "w4a8" or not uses_dense(self._packed, x.numel() // self.in_features):
            return None
        prepared = self._cached("weight", self.kernel.prepare)
        return self._cached("dense", lambda pw: dense_weight(pw, prepared))

    @property
    def cpu_kernels(self) -> str:
        """'exact' (the integer and fp32 torch paths: what evaluations measure) or 'fast' (torch's bf16 int4 GEMM
        for calls of at most INT4PACK_ROWS rows, decoding; the exact paths otherwise) on the CPU. Only 4-bit grouped
        weights it packs take it (`int4pack_serves`); the others are exact in both modes."""
        return "fast" if self._fast else "exact"

    @cpu_kernels.setter
    def cpu_kernels(self, mode: str) -> None:
        if mode not in CPU_KERNEL_MODES:
            raise KernelError(f"unknown CPU kernel mode {mode!r}: use one of {', '.join(CPU_KERNEL_MODES)}")
        self._fast = mode == "fast" and self.kernel.name in FAST_KERNELS and int4pack_serves(self._packed)
        self._prepared.pop("int4pack", None)

    def extra_repr(self) -> str:
        extra = ", pre_scale" if self.inv_pre_scale is not None else ""
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme}, kernel={self.kernel.name}{extra}"


def set_cpu_kernels(model: nn.Module, mode: str) -> int:
    """Set `cpu_kernels` ('exact' or 'fast') on every QuantLinear of `model`; returns how many layers it set."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.cpu_kernels = mode
    return len(layers)
