"""QuantLinear: a linear layer computed from packed weights by the quantized kernels (Triton on CUDA, torch on the CPU).

It computes what `quant.modules.FakeQuantLinear` simulates, `y = Q_a(x / s) @ Q_w(W diag(s))^T + b`, with the
same scheme, activation scale and pre-scale, but in integer arithmetic from the stored codes: the two agree to
float rounding, so the search optimizes what is deployed.
"""

from __future__ import annotations

import torch
from torch import nn

from quantplan.quant.kernels.dispatch import quantized_linear, select_kernel
from quantplan.quant.kernels.runtime import KernelInputError, resolve_backend
from quantplan.quant.packing import PackedWeight, pack_weight
from quantplan.quant.plan import LayerSpec
from quantplan.quant.quantizers import quantize_weight
from quantplan.quant.schemes import ActScheme, LayerScheme


class QuantLinear(nn.Module):
    """Packed weights (buffers `codes`, `scales`, `zeros`) plus the activation scheme and its scales.

    On the torch backend the first forward keeps the weight unpacked in the layout the torch path multiplies
    (int8, 1 byte per weight; int16 for asymmetric w8 at a16; nothing for w8a8, whose codes are already int8),
    so later calls skip unpacking. It is not part of the state dict and is rebuilt when the codes move, are
    loaded, or (outside inference mode) change in place.
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
    ) -> None:
        super().__init__()
        self.scheme = LayerScheme(packed.scheme, act)
        self.kernel = select_kernel(self.scheme)  # unsupported schemes fail here, not at the first forward
        if act.needs_calibration and act_scale is None:
            raise KernelInputError(f"{act} needs a calibrated activation scale (act_scale); calibrate the layer first")
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.backend = backend
        self.register_buffer("codes", packed.codes)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("act_scale", None if act_scale is None else act_scale.detach().float().reshape(1))
        self.register_buffer("inv_pre_scale", inv_pre_scale)
        self._prepared: tuple[tuple[int, torch.device, int], torch.Tensor] | None = None
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
    ) -> QuantLinear:
        """Quantize and pack `weight` [N, K] (already multiplied by the equalization s, as FakeQuantLinear takes it)."""
        select_kernel(spec.scheme)
        packed = pack_weight(quantize_weight(weight.detach(), spec.scheme.weight, spec.clip))
        inv = None if pre_scale is None else (1.0 / pre_scale).to(weight.dtype)  # as FakeQuantLinear rounds it
        return cls(packed, spec.scheme.act, bias, act_scale=act_scale, inv_pre_scale=inv, backend=backend)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.codes, self.scales, self.zeros, self.in_features, self.scheme.weight)

    def _forget_prepared(self, incompatible_keys: object) -> None:
        self._prepared = None  # load_state_dict copies into the same storage: data_ptr alone would not notice

    def _torch_weight(self) -> torch.Tensor | None:
        """The kernel's torch-path weight layout, prepared once per codes tensor (None: it needs none)."""
        if self.kernel.prepare is None:
            return None
        version = -1 if self.codes.is_inference() else self.codes._version  # inference tensors keep no counter
        key = (self.codes.data_ptr(), self.codes.device, version)
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, self.kernel.prepare(self.packed))
        return self._prepared[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on_torch = resolve_backend(x.device, self.backend) == "torch"
        return quantized_linear(
            x,
            self.packed,
            self.scheme.act,
            act_scale=self.act_scale,
            inv_pre_scale=self.inv_pre_scale,
            bias=self.bias,
            backend=self.backend,
            prepared=self._torch_weight() if on_torch else None,
        )

    def extra_repr(self) -> str:
        extra = ", pre_scale" if self.inv_pre_scale is not None else ""
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme}, kernel={self.kernel.name}{extra}"
