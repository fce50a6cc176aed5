"""Scheme notation: the compact, stable names for weight, activation and layer schemes (torch-free).

The same strings appear on the command line, in plan JSON and in the database, so parsing is strict and
formatting is canonical: `parse(str(x)) == x` for every scheme.

Weight scheme   `w<bits>g<group>[a]`  int weights, one fp16 scale (and zero-point if `a`) per group of K
                `w<bits>[a]`          per-channel (one group per output row)
                `w16`                 unquantized (kept at 16 bits)
Act scheme      `a16` | `a8-static` | `a8-dynamic` | `a8-lae` | `a8-smooth`
Layer scheme    `<weight>:<act>`      e.g. `w4g128:a8-dynamic`; a bare weight scheme means `:a16`
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from quantplan.errors import SchemeError

WEIGHT_BITS = (2, 3, 4, 8, 16)
GROUP_SIZES = (32, 64, 128)
PER_CHANNEL = -1
SCALE_BITS = 16  # every group stores one fp16 scale

_WEIGHT_RE = re.compile(r"^w(?P<bits>\d+)(?:g(?P<group>\d+))?(?P<asym>a)?$")


@dataclass(frozen=True, order=True)
class WeightScheme:
    """Round-to-nearest integer weights with one scale per group of `group` weights along K."""

    bits: int
    group: int = PER_CHANNEL  # PER_CHANNEL: one group spans the whole row
    asymmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in WEIGHT_BITS:
            raise SchemeError(f"weight bits {self.bits} not supported; use one of {WEIGHT_BITS}")
        if self.bits == 16 and (self.group != PER_CHANNEL or self.asymmetric):
            raise SchemeError("w16 means unquantized weights: it takes no group size and no 'a' suffix")
        if self.group != PER_CHANNEL and self.group not in GROUP_SIZES:
            raise SchemeError(
                f"group size {self.group} not supported; use one of {GROUP_SIZES} or omit it for per-channel"
            )

    @classmethod
    def parse(cls, text: str) -> WeightScheme:
        m = _WEIGHT_RE.match(text.strip())
        if m is None:
            raise SchemeError(
                f"unknown weight scheme {text!r}; expected w<bits>[g<group>][a], e.g. w4g128, w8, w4g64a, w16"
            )
        group = int(m["group"]) if m["group"] else PER_CHANNEL
        try:
            return cls(int(m["bits"]), group, bool(m["asym"]))
        except SchemeError as e:
            raise SchemeError(f"unknown weight scheme {text!r}: {e}") from None

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def qmax(self) -> int:
        """Largest code: 2^(b-1)-1 for symmetric, 2^b-1 for asymmetric (codes 0..qmax)."""
        return (1 << self.bits) - 1 if self.asymmetric else (1 << (self.bits - 1)) - 1

    @property
    def zero_bits(self) -> int:
        """Bits stored per group for the zero-point: one code of the weight's width, 0 when symmetric."""
        return self.bits if self.asymmetric else 0

    def group_size(self, in_features: int) -> int:
        """The effective group length for a layer with `in_features` = K."""
        return in_features if self.group == PER_CHANNEL else self.group

    def __str__(self) -> str:
        if not self.quantized:
            return "w16"
        group = "" if self.group == PER_CHANNEL else f"g{self.group}"
        return f"w{self.bits}{group}{'a' if self.asymmetric else ''}"


class ActScheme(str, Enum):
    """How a layer's input activations are quantized."""

    A16 = "a16"  # kept in floating point
    STATIC = "a8-static"  # int8, one calibrated scale per tensor
    DYNAMIC = "a8-dynamic"  # int8, one scale per token computed at run time
    LAE = "a8-lae"  # FPTQ log-equalization (arXiv 2308.15987), then per-tensor static
    SMOOTH = "a8-smooth"  # SmoothQuant equalization (arXiv 2211.10438), then per-tensor static

    @classmethod
    def parse(cls, text: str) -> ActScheme:
        try:
            return cls(text.strip())
        except ValueError:
            names = ", ".join(a.value for a in cls)
            raise SchemeError(f"unknown activation scheme {text!r}; use one of {names}") from None

    @property
    def bits(self) -> int:
        return 16 if self is ActScheme.A16 else 8

    @property
    def equalized(self) -> bool:
        """True when the scheme rescales input channels (and the weights inversely) before quantizing."""
        return self in (ActScheme.LAE, ActScheme.SMOOTH)

    @property
    def needs_calibration(self) -> bool:
        """True when calibration statistics are needed (static scales or equalization vectors)."""
        return self in (ActScheme.STATIC, ActScheme.LAE, ActScheme.SMOOTH)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LayerScheme:
    """A weight scheme and an activation scheme for one linear layer."""

    weight: WeightScheme
    act: ActScheme = ActScheme.A16

    @classmethod
    def parse(cls, text: str) -> LayerScheme:
        if not isinstance(text, str):
            raise SchemeError(f"a layer scheme must be a string like 'w4g128:a8-dynamic', got {text!r}")
        weight, sep, act = text.strip().partition(":")
        return cls(WeightScheme.parse(weight), ActScheme.parse(act) if sep else ActScheme.A16)

    @property
    def quantized(self) -> bool:
        return self.weight.quantized or self.act is not ActScheme.A16

    def __str__(self) -> str:
        return f"{self.weight}:{self.act}"


UNQUANTIZED = LayerScheme(WeightScheme(16), ActScheme.A16)
