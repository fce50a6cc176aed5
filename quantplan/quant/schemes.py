"""Scheme notation: the compact, stable names for weight, activation and layer schemes (torch-free).

The same strings appear on the command line, in plan JSON and in the database, so parsing is strict and
formatting is canonical: `parse(str(x)) == x` for every scheme.

Weight scheme   `w<bits>g<group>[a]`  int weights, one fp16 scale (and zero-point if `a`) per group of K
                `w<bits>[a]`          per-channel (one group per output row)
                `w16`                 unquantized (kept at 16 bits)
Act scheme      `a16` | `a8-static` | `a8-dynamic` | `a8-lae` | `a8-smooth`, or a registered one
                (`register_act_scheme`: each strategy is one interned object carrying its facts)
Layer scheme    `<weight>:<act>`      e.g. `w4g128:a8-dynamic`; a bare weight scheme means `:a16`
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

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


_ACT_NAME_RE = re.compile(r"^a(?P<bits>\d+)(?:-[a-z][a-z0-9]*)?$")
_ACT_REGISTRY: dict[str, ActScheme] = {}  # name -> the one object of that strategy, in registration order


class _ActRegistry(type):
    """Metaclass of ActScheme: the class iterates over the registered strategies, as the Enum it replaces did."""

    def __iter__(cls) -> Iterator[ActScheme]:
        return iter(tuple(_ACT_REGISTRY.values()))

    def __len__(cls) -> int:
        return len(_ACT_REGISTRY)

    def __contains__(cls, item: object) -> bool:
        return isinstance(item, str) and str.__str__(item) in _ACT_REGISTRY


class ActScheme(str, metaclass=_ActRegistry):
    """A registered activation strategy: its scheme suffix and the torch-free facts every layer reads.

    There is one object per name (`ActScheme("a8-dynamic") is ActScheme.DYNAMIC`), it is the string of its name
    (plan JSON, the database and artifacts hold that string), and it pickles back to the registered object.
    New strategies come from `register_act_scheme`; their torch side (fake-quant, calibration, sensitivity
    cost, artifact tensors, kernel-side quantization) from `quant.act_handlers.register_act_handler`.
    """

    A16: ClassVar[ActScheme]
    STATIC: ClassVar[ActScheme]
    DYNAMIC: ClassVar[ActScheme]
    LAE: ClassVar[ActScheme]
    SMOOTH: ClassVar[ActScheme]

    name: str  # the scheme suffix, e.g. "a8-dynamic"
    bits: int  # 16: kept in floating point
    needs_calibration: bool  # calibration statistics are needed (a static scale, an equalization vector)
    equalized: bool  # rescales input channels (and the weight columns inversely) before quantizing
    needs_norm: bool  # only offered where a norm feeds the layer (the equalization folds into it)
    per_token: bool  # one scale per token computed at run time (else per tensor)
    summary: str  # one line for docs and messages

    def __new__(cls, value: str) -> ActScheme:  # lookup, as Enum's ActScheme("a8-dynamic") was
        scheme = _ACT_REGISTRY.get(value) if isinstance(value, str) else None
        if scheme is None:
            raise ValueError(f"{value!r} is not a registered activation scheme")
        return scheme

    @classmethod
    def parse(cls, text: str) -> ActScheme:
        scheme = _ACT_REGISTRY.get(text.strip())
        if scheme is None:
            names = ", ".join(_ACT_REGISTRY)
            raise SchemeError(f"unknown activation scheme {text!r}; use one of {names}")
        return scheme

    @property
    def value(self) -> str:
        """The name (what Enum members called their value)."""
        return self.name

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def equalizes(self) -> bool:
        return self.equalized

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"activation scheme {self.name} is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        # Unpickles through the class (a lookup in `__new__`) to the registered object, so `is` keeps working. Not
        # through `ActScheme.parse`: cloudpickle (Ray) ships a classmethod's function by value, without its globals.
        return ActScheme, (self.name,)

    def __repr__(self) -> str:
        return f"ActScheme({self.name!r})"

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)


def register_act_scheme(
    name: str,
    *,
    needs_calibration: bool = False,
    equalized: bool = False,
    needs_norm: bool | None = None,
    per_token: bool = False,
    summary: str = "",
) -> ActScheme:
    """Register an activation strategy under `name` (`a<bits>-<suffix>`) and return its one object.

    `needs_norm` defaults to `equalized`: an equalization is offered only where it folds into a feeding norm.
    The torch side is registered separately, with `quant.act_handlers.register_act_handler`.
    """
    m = _ACT_NAME_RE.match(name)
    if m is None or name in _ACT_REGISTRY:
        why = "is taken" if m is not None else "is not of the form a<bits>-<suffix>, e.g. a8-dynamic"
        raise SchemeError(f"cannot register activation scheme {name!r}: the name {why}")
    bits = int(m["bits"])
    if not 2 <= bits <= 16 or (bits == 16) != (name == "a16"):
        raise SchemeError(f"cannot register activation scheme {name!r}: activations take 2 to 8 bits (a16: float)")
    scheme = str.__new__(ActScheme, name)
    facts = dict(name=name, bits=bits, needs_calibration=needs_calibration, equalized=equalized,
                 needs_norm=equalized if needs_norm is None else needs_norm, per_token=per_token, summary=summary)
    for key, value in facts.items():
        object.__setattr__(scheme, key, value)
    _ACT_REGISTRY[name] = scheme
    return scheme


def unregister_act_scheme(scheme: ActScheme | str) -> None:
    """Remove a strategy registered with `register_act_scheme` (the built-in ones stay)."""
    name = str(scheme)
    if name in _BUILTIN_ACTS:
        raise SchemeError(f"{name} is built in and cannot be unregistered")
    _ACT_REGISTRY.pop(name, None)


def act_schemes(*, quantized: bool | None = None) -> tuple[ActScheme, ...]:
    """The registered activation strategies in registration order (only the quantized ones with quantized=True)."""
    return tuple(a for a in _ACT_REGISTRY.values() if quantized is None or a.quantized == quantized)


class ActSchemes(Sequence[ActScheme]):
    """The registered strategies (optionally only the quantized ones), read live: a tuple that follows
    registrations, for tables indexed by activation scheme."""

    def __init__(self, *, quantized: bool | None = None) -> None:
        self._quantized = quantized

    def _items(self) -> tuple[ActScheme, ...]:
        return act_schemes(quantized=self._quantized)

    def __getitem__(self, i):  # type: ignore[override]  # noqa: ANN001, ANN204
        return self._items()[i]

    def __len__(self) -> int:
        return len(self._items())

    def __iter__(self) -> Iterator[ActScheme]:
        return iter(self._items())

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, ActSchemes)) else other)

    def __hash__(self) -> int:
        return hash(self._items())

    def __repr__(self) -> str:
        return repr(self._items())


class ActNames(ActSchemes):  # type: ignore[misc]
    """ActSchemes as their names (plain strings)."""

    def _items(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(a.name for a in act_schemes(quantized=self._quantized))


ActScheme.A16 = register_act_scheme("a16", summary="kept in floating point")
ActScheme.STATIC = register_act_scheme("a8-static", needs_calibration=True,
                                       summary="int8, one calibrated scale per tensor (max|X| / 127)")
ActScheme.DYNAMIC = register_act_scheme("a8-dynamic", per_token=True,
                                        summary="int8, one scale per token computed at run time")
ActScheme.LAE = register_act_scheme(  # FPTQ (arXiv 2308.15987)
    "a8-lae", needs_calibration=True, equalized=True,
    summary="FPTQ log equalization s_j = max|X_j| / log2(2 + max|X_j|), then per-tensor static")
ActScheme.SMOOTH = register_act_scheme(  # SmoothQuant (arXiv 2211.10438)
    "a8-smooth", needs_calibration=True, equalized=True,
    summary="SmoothQuant s_j = max|X_j|^alpha / max|W_j|^(1-alpha), then per-tensor static")
_BUILTIN_ACTS = frozenset(_ACT_REGISTRY)


def builtin_act_scheme(scheme: ActScheme | str) -> bool:
    """True for the strategies QuantPlan ships (a16, a8-static, a8-dynamic, a8-lae, a8-smooth)."""
    return str(scheme) in _BUILTIN_ACTS


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
