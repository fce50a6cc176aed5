"""Quantizers as pure tensor functions: group-wise RTN weights, int8 activations, equalization scales.

Conventions (docs/QUANTIZATION.md): W is [N, K] (out, in); groups are `g` consecutive weights along K of one
row. K that is not a multiple of g is zero-padded up to the next multiple; the padded codes are stored (and
counted by `quant.plan.weight_cost`), and zero padding never changes a group's scale because the range always
includes 0. Scales are rounded to fp16, the precision the packed format stores, so the simulation matches
the kernels. Computation runs in float32, or float64 when the input is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantplan.errors import SchemeError
from quantplan.quant.schemes import ActScheme, WeightScheme

SCALE_DTYPE = torch.float16
_MIN_SCALE = 2.0**-24  # smallest fp16 subnormal: keeps all-zero groups finite
ACT_QMAX = 127  # int8 activations are symmetric in [-127, 127]
CLIP_GRID = tuple(round(1.0 - 0.025 * i, 4) for i in range(21))  # 1.0 ... 0.5


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes with per-group scales (and zero-points): `W ~ (codes - zeros) * scales` per group."""

    codes: torch.Tensor  # [N, K_pad] int16 (int range of the scheme)
    scales: torch.Tensor  # [N, G] float16
    zeros: torch.Tensor | None  # [N, G] int16 when asymmetric
    in_features: int  # real K (codes beyond it are padding)
    scheme: WeightScheme

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """[N, K] -> [N, G, g], zero-padding K up to a multiple of g."""
    n, k = w.shape
    pad = -k % g
    return F.pad(w, (0, pad)).reshape(n, (k + pad) // g, g)


def _check_group(scheme: WeightScheme, k: int) -> int:
    g = scheme.group_size(k)
    if g > k:
        raise SchemeError(f"group size {g} is larger than in_features K={k}; use a smaller group or per-channel")
    return g


def quantize_weight(w: torch.Tensor, scheme: WeightScheme, clip: float | torch.Tensor = 1.0) -> QuantizedWeight:
    """Round-to-nearest quantization of W [N, K]; `clip` (a float, or [N, 1] per row) shrinks each group's range
    to clip * range."""
    if not scheme.quantized:
        raise SchemeError("w16 is unquantized: there is nothing to quantize")
    n, k = w.shape
    wg = _grouped(w.to(_compute_dtype(w)), _check_group(scheme, k))  # [N, G, g]
    qmax = scheme.qmax
    if scheme.asymmetric:
        lo = wg.amin(-1).clamp(max=0) * clip  # the range always contains 0 (exact zero padding)
        hi = wg.amax(-1).clamp(min=0) * clip
        s = round_scale((hi - lo) / qmax, down=True)
        z = torch.round(-lo / s).clamp(0, qmax)
        q = (torch.round(wg / s[..., None]) + z[..., None]).clamp(0, qmax)
        zeros = z.to(torch.int16)
    else:
        s = round_scale(wg.abs().amax(-1) * clip / qmax)
        q = torch.round(wg / s[..., None]).clamp(-qmax - 1, qmax)
        zeros = None
    return QuantizedWeight(q.reshape(n, -1).to(torch.int16), s.to(SCALE_DTYPE), zeros, k, scheme)


def round_scale(s: torch.Tensor, down: bool = False) -> torch.Tensor:
    """Round scales to the stored fp16 precision (through fp32, as torch converts) and keep them positive.

    Asymmetric scales round down (`down`), so the range spans at least qmax steps: the group's min lands on
    code 0 and its max on qmax, which makes re-quantizing a quantized group reproduce it exactly.
    """
    s16 = s.clamp_min(_MIN_SCALE).float().to(SCALE_DTYPE)
    if down:
        over = (s16.to(s.dtype) > s * (1 + 1e-6)) & (s16.view(torch.int16) > 1)
        s16 = torch.where(over, (s16.view(torch.int16) - 1).view(SCALE_DTYPE), s16)  # next fp16 below
    return s16.to(s.dtype)


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes back to a float [N, K] weight (padding dropped)."""
    n, g = qw.codes.shape[0], qw.group_size
    q = qw.codes.to(dtype).reshape(n, -1, g)
    if qw.zeros is not None:
        q = q - qw.zeros.to(dtype)[..., None]
    return (q * qw.scales.to(dtype)[..., None]).reshape(n, -1)[:, : qw.in_features]


def fake_quantize_weight(w: torch.Tensor, scheme: WeightScheme, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Quantize then dequantize W, in W's dtype: the float simulation of the stored weight."""
    if not scheme.quantized:
        return w
    return dequantize_weight(quantize_weight(w, scheme, clip), _compute_dtype(w)).to(w.dtype)


def weight_error(
    w: torch.Tensor, scheme: WeightScheme, clip: float = 1.0, importance: torch.Tensor | None = None
) -> torch.Tensor:
    """sum importance * (W - Q(W))^2 (importance = 1 gives the squared error; a Fisher diagonal gives
    twice the predicted loss increase)."""
    err = (w.to(torch.float64) - fake_quantize_weight(w.to(torch.float64), scheme, clip)) ** 2
    return (err if importance is None else err * importance.to(torch.float64)).sum()


def search_clip(
    w: torch.Tensor,
    scheme: WeightScheme,
    importance: torch.Tensor | None = None,
    grid: tuple[float, ...] = CLIP_GRID,
) -> float:
    """The clip ratio from `grid` minimizing the (importance-weighted) squared weight error."""
    if not scheme.quantized:
        return 1.0
    errors = [float(weight_error(w, scheme, r, importance)) for r in grid]
    return grid[min(range(len(grid)), key=errors.__getitem__)]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    ref = reference.to(torch.float64)
    noise = (ref - approx.to(torch.float64)).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


# -- activations --------------------------------------------------------------------------------------
def act_scale_per_token(x: torch.Tensor) -> torch.Tensor:
    """One int8 scale per token (row over the last dim), shape [..., 1]."""
    return (x.abs().amax(-1, keepdim=True).float() / ACT_QMAX).clamp_min(1e-8)


def quantize_act_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes of x for a broadcastable scale (per tensor or per token)."""
    return torch.round(x.float() / scale).clamp(-ACT_QMAX, ACT_QMAX).to(torch.int8)


def fake_quantize_act(x: torch.Tensor, scheme: ActScheme, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Simulate symmetric int8 activation quantization of x (already equalized for a8-lae/a8-smooth): per token
    when the scheme says so, else with the calibrated per-tensor scale. Other strategies: `quant.act_handlers`."""
    if not scheme.quantized:
        return x
    if scheme.per_token:
        scale = act_scale_per_token(x)
    elif static_scale is None:
        raise SchemeError(f"{scheme} needs a calibrated static scale; apply the plan with calibration data")
    else:
        scale = static_scale.float()
    return (quantize_act_int8(x, scale).float() * scale).to(x.dtype)


def static_scale_from_absmax(absmax: torch.Tensor | float) -> torch.Tensor:
    """Per-tensor int8 scale that maps the calibrated max|X| to 127."""
    return (torch.as_tensor(absmax, dtype=torch.float32) / ACT_QMAX).clamp_min(1e-8)


# -- equalization (inputs are divided by s per channel, weights multiplied by s) --------------------------
def lae_scales(x_absmax: torch.Tensor) -> torch.Tensor:
    """FPTQ logarithmic activation equalization (arXiv 2308.15987): s_j = max|X_j| / log2(2 + max|X_j|)."""
    m = x_absmax.float()
    s = m / torch.log2(2 + m)
    return torch.where(m > 0, s, torch.ones_like(s))  # dead channels keep their scale


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant (arXiv 2211.10438): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), per input channel j."""
    m, w = x_absmax.float().clamp_min(1e-5), w_absmax.float().clamp_min(1e-5)
    return (m.pow(alpha) / w.pow(1 - alpha)).clamp_min(1e-5)
