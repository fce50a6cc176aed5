"""Activation-strategy handlers: the torch side of every registered `ActScheme`, one handler object each.

A handler owns everything that depends on how a strategy quantizes activations, so the modules that apply,
calibrate, score, store and run layers ask the handler instead of testing which strategy they hold:

    equalization(x_absmax, w_absmax, alpha) -> s [K]     equalizing strategies: input channels are divided by s
    calibrate(x_absmax) -> params                         per-layer tensors from the calibrated max|X| per channel
                                                          (after equalization), e.g. {"act_scale": [1]}
    param_shapes(K)                                       the names and shapes of those tensors, in artifact order
    fake_quantize(x, params) / fake_quantize_into(...)    the float simulation (apply_plan, the sensitivity pass)
    quantize(x, params, inv_pre_scale, backend)           int8 codes for the kernels (QuantLinear)

A new strategy is `register_act_scheme(...)` (torch-free facts, `quant.schemes`) plus a handler registered with
`@register_act_handler(scheme)`, both in one file (docs/ARCHITECTURE.md, "Extending QuantPlan").
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import NamedTuple, TypeVar

import torch

from quantplan.errors import SchemeError
from quantplan.quant.kernels import act_quant
from quantplan.quant.kernels.runtime import KernelInputError, UnsupportedSchemeError, resolve_backend
from quantplan.quant.quantizers import (
    ACT_QMAX,
    act_scale_per_token,
    fake_quantize_act,
    lae_scales,
    smooth_scales,
    static_scale_from_absmax,
)
from quantplan.quant.schemes import ActScheme

ActParams = Mapping[str, torch.Tensor]  # a layer's calibrated tensors, by the names the artifact stores


class QuantizedActs(NamedTuple):
    """Activations as the int8 kernels take them: x ~ codes * scale (+ offset), per token ([M]) or tensor ([1])."""

    codes: torch.Tensor  # int8 [M, K]
    scale: torch.Tensor  # fp32 [M] or [1]
    offset: torch.Tensor | None = None  # fp32 [M] or [1]: asymmetric strategies; the GEMM adds offset * sum_k W


class ActHandler:
    """The torch side of one activation strategy; subclasses override what their strategy does differently.

    The base class is a strategy without parameters that has no simulation: `fake_quantize` must be given.
    """

    offsets = False  # `quantize` returns an offset (asymmetric codes): the layer keeps its weight's row sums

    def __init__(self, scheme: ActScheme) -> None:
        self.scheme = scheme

    def param_shapes(self, in_features: int) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each per-layer tensor `calibrate` returns, in the order an artifact stores them."""
        return {}

    def calibrate(self, x_absmax: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer parameters from max|X| per input channel [K] over the calibration tokens (equalized)."""
        return {}

    def equalization(self, x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
        """s [K] (inputs divided by s, weight columns multiplied by it); w_absmax spans every layer sharing s."""
        raise NotImplementedError(f"{self.scheme} does not equalize")

    def equalization_key(self, alpha: float) -> Hashable:
        """Layers reading one norm share its s only when their strategies and these keys agree."""
        return ()

    def fake_quantize(self, x: torch.Tensor, params: ActParams) -> torch.Tensor:
        """Q(x) simulated in float, in x's dtype (x already equalized)."""
        raise NotImplementedError(f"{type(self).__name__} must define fake_quantize")

    def fake_quantize_into(self, out: torch.Tensor, x: torch.Tensor, params: ActParams) -> torch.Tensor:
        """Q(x) written into `out` (float32; `out` may be `x`): the sensitivity pass's form, faster in place."""
        return out.copy_(self.fake_quantize(x, params))

    def quantize(
        self, x: torch.Tensor, params: ActParams, inv_pre_scale: torch.Tensor | None, backend: str | None
    ) -> QuantizedActs:
        """x [M, K] (times inv_pre_scale when given) as int8 codes for the kernels."""
        raise UnsupportedSchemeError(f"{self.scheme} activations have no kernel-side quantization")

    def check_params(self, params: ActParams, in_features: int) -> None:
        """KernelInputError unless `params` holds every tensor the strategy needs."""
        missing = [k for k in self.param_shapes(in_features) if params.get(k) is None]
        if missing:
            raise KernelInputError(
                f"{self.scheme} needs a calibrated activation scale ({', '.join(missing)}); calibrate the layer "
                "first (apply the plan with calibration data)"
            )


H = TypeVar("H", bound=type[ActHandler])
_HANDLERS: dict[str, ActHandler] = {}


def register_act_handler(scheme: ActScheme) -> Callable[[H], H]:
    """Class decorator: `@register_act_handler(MY_SCHEME) class MyHandler(ActHandler): ...`."""

    def register(cls: H) -> H:
        if scheme.name in _HANDLERS:
            raise SchemeError(f"{scheme} already has a handler ({type(_HANDLERS[scheme.name]).__name__})")
        _HANDLERS[scheme.name] = cls(scheme)
        return cls

    return register


def unregister_act_handler(scheme: ActScheme) -> None:
    _HANDLERS.pop(scheme.name, None)


def registered_param_names() -> set[str]:
    """The names of every registered strategy's per-layer parameters (what an artifact may store)."""
    return {key for handler in _HANDLERS.values() for key in handler.param_shapes(1)}


def act_handler(scheme: ActScheme) -> ActHandler:
    handler = _HANDLERS.get(scheme.name)
    if handler is None or handler.scheme is not scheme:
        raise SchemeError(f"activation scheme {scheme} has no handler; register one with register_act_handler")
    return handler


# -- the built-in strategies -----------------------------------------------------------------------------
@register_act_handler(ActScheme.A16)
class FloatActs(ActHandler):
    """a16: activations stay in floating point."""

    def fake_quantize(self, x: torch.Tensor, params: ActParams) -> torch.Tensor:
        return x

    def fake_quantize_into(self, out: torch.Tensor, x: torch.Tensor, params: ActParams) -> torch.Tensor:
        return out if out is x else out.copy_(x)

    def quantize(self, x, params, inv_pre_scale, backend) -> QuantizedActs:  # noqa: ANN001
        raise UnsupportedSchemeError("a16 activations are not quantized")


class SymmetricInt8(ActHandler):
    """int8 codes in [-127, 127]: one scale per token at run time (per_token), else one calibrated per tensor."""

    def param_shapes(self, in_features: int) -> dict[str, tuple[int, ...]]:
        return {} if self.scheme.per_token else {"act_scale": (1,)}

    def calibrate(self, x_absmax: torch.Tensor) -> dict[str, torch.Tensor]:
        return {} if self.scheme.per_token else {"act_scale": static_scale_from_absmax(x_absmax.max())}

    def fake_quantize(self, x: torch.Tensor, params: ActParams) -> torch.Tensor:
        return fake_quantize_act(x, self.scheme, params.get("act_scale"))

    def fake_quantize_into(self, out: torch.Tensor, x: torch.Tensor, params: ActParams) -> torch.Tensor:
        # quantize_act_int8 then dequantize as the same float operations in place (the int8 round trip of an
        # integer in [-127, 127] is exact, so it is left out)
        scale = act_scale_per_token(x) if self.scheme.per_token else params["act_scale"]
        return torch.div(x, scale, out=out).round_().clamp_(-ACT_QMAX, ACT_QMAX).mul_(scale)

    def quantize(
        self, x: torch.Tensor, params: ActParams, inv_pre_scale: torch.Tensor | None, backend: str | None
    ) -> QuantizedActs:
        static = None if self.scheme.per_token else params.get("act_scale")
        if static is None and not self.scheme.per_token:
            raise KernelInputError(
                f"{self.scheme} needs a calibrated per-tensor activation scale (act_scale); calibrate first"
            )
        triton = resolve_backend(x.device, backend) == "triton"
        run = act_quant.quantize_act_triton if triton else act_quant.quantize_act_ref
        return QuantizedActs(*run(x, static, inv_pre_scale))


register_act_handler(ActScheme.STATIC)(SymmetricInt8)
register_act_handler(ActScheme.DYNAMIC)(SymmetricInt8)


@register_act_handler(ActScheme.LAE)
class LogEqualized(SymmetricInt8):
    """FPTQ logarithmic activation equalization (arXiv 2308.15987), then per-tensor static int8."""

    def equalization(self, x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
        return lae_scales(x_absmax)


@register_act_handler(ActScheme.SMOOTH)
class SmoothEqualized(SymmetricInt8):
    """SmoothQuant (arXiv 2211.10438): s_j = max|X_j|^alpha / max|W_j|^(1-alpha), then per-tensor static int8."""

    def equalization(self, x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
        return smooth_scales(x_absmax, w_absmax, alpha)

    def equalization_key(self, alpha: float) -> Hashable:
        return alpha
