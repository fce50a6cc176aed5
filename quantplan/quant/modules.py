"""Fake-quant modules: float simulations of quantized linear layers that `apply_plan` swaps in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantplan.quant.act_handlers import ActParams, act_handler
from quantplan.quant.plan import LayerSpec
from quantplan.quant.quantizers import fake_quantize_weight
from quantplan.quant.schemes import ActScheme

try:  # GPT-2 style layers store the weight transposed ([in, out]) in a Conv1D
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep quant importable without it
    Conv1D = None  # type: ignore[assignment,misc]

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)


def linear_layout(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor of `module` (its weight, gradient, Fisher) in nn.Linear layout [N, K]."""
    return t.t() if Conv1D is not None and isinstance(module, Conv1D) else t


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear or a GPT-2 Conv1D in nn.Linear layout [N, K]."""
    return linear_layout(module, module.weight)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features N, in_features K) of an nn.Linear or Conv1D."""
    n, k = linear_weight(module).shape
    return int(n), int(k)


class FakeQuantLinear(nn.Module):
    """y = Q_a(x / s) @ Q_w(W diag(s))^T + b, simulated in float.

    `s` (equalization) is applied here only when it could not be folded into a preceding norm
    (`pre_scale`); a folded `s` is already in the norm and in the stored weight. Q_a is the activation
    strategy's handler (`quant.act_handlers`), fed the layer's calibrated parameters (`act_params`, buffers by
    their names; `act_scale` is the static per-tensor scale of the built-in strategies).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: LayerSpec,
        *,
        act_scale: torch.Tensor | None = None,
        pre_scale: torch.Tensor | None = None,
        quantize_activations: bool = True,
        act_params: ActParams | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.out_features, self.in_features = weight.shape
        w = fake_quantize_weight(weight.detach(), spec.scheme.weight, spec.clip)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.act = spec.scheme.act if quantize_activations else ActScheme.A16
        self.handler = act_handler(self.act)
        params = {**({} if act_scale is None else {"act_scale": act_scale}), **(act_params or {})}
        self.register_buffer("act_scale", params.pop("act_scale", None))
        for key, value in params.items():
            self.register_buffer(key, value)
        self._param_names = ("act_scale", *params)
        self.register_buffer("inv_pre_scale", None if pre_scale is None else (1.0 / pre_scale).to(weight.dtype))

    @classmethod
    def from_module(cls, module: nn.Module, spec: LayerSpec, **kwargs: object) -> FakeQuantLinear:
        return cls(linear_weight(module), module.bias, spec, **kwargs)  # type: ignore[arg-type]

    @property
    def act_params(self) -> dict[str, torch.Tensor]:
        """The calibrated activation parameters by name (those that are set)."""
        return {k: t for k in self._param_names if (t := getattr(self, k)) is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fresh = self.inv_pre_scale is not None  # x becomes a tensor of our own
        if fresh:
            x = x * self.inv_pre_scale
        if self.spec.scheme.act.quantized:
            if x.dtype == torch.float32 and not torch.is_grad_enabled():  # evaluation: the same float ops in place
                x = self.handler.fake_quantize_into(x if fresh else torch.empty_like(x), x, self.act_params)
            else:
                x = self.handler.fake_quantize(x, self.act_params)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        extra = ", pre_scale" if self.inv_pre_scale is not None else ""
        return f"in={self.in_features}, out={self.out_features}, scheme={self.spec.scheme}{extra}"
