"""The search space: which (weight, activation) combinations a layer may take, as knobs and registries.

The searched weight families (`FAMILIES`) are int4 weights with any group size, per-channel int8 weights and
unquantized w16:a16, each with the activation widths the kernels serve it with, read from the kernels' own
table (`quant.kernels.served`: W4A8, W4A16, W8A8, ...); 2- and 3-bit weights enter the space only with
`low_bits=True` (simulation only). The activation schemes are every registered strategy (`ACTS`, read live
from `quant.schemes`); those that need a feeding norm (their scale folds into it: `a8-lae`, `a8-smooth`) are
offered only where such a norm exists (`ACT_REQUIREMENTS`).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from quantplan.errors import QuantPlanError, SchemeError
from quantplan.quant.costs import LayerSensitivity
from quantplan.quant.kernels.served import served_act_bits
from quantplan.quant.schemes import GROUP_SIZES, PER_CHANNEL, ActNames, ActScheme, WeightScheme
from quantplan.quant.targets import CT_TARGET, TARGETS

# a16, a8-static, a8-dynamic, a8-lae, a8-smooth, then any registered strategy: a live tuple of names
ACTS: ActNames = ActNames()
DYNAMIC = ActScheme.DYNAMIC.name
SYMMETRY: dict[str, tuple[bool, ...]] = {"sym": (False,), "asym": (True,), "both": (False, True)}


class SearchError(QuantPlanError, ValueError):
    """A search setting that cannot be used (bad knob, a study created with other settings, ...)."""


def _grid(bits: tuple[int, ...]) -> tuple[WeightScheme, ...]:
    groups = (*GROUP_SIZES, PER_CHANNEL)
    return tuple(WeightScheme(b, g, a) for b, g, a in itertools.product(bits, groups, (False, True)))


@dataclass(frozen=True)
class Family:
    """A registered family of weight schemes and the activation widths its kernels serve them with."""

    name: str
    weights: tuple[WeightScheme, ...]
    act_bits: tuple[int, ...]  # 8 and/or 16
    opt_in: bool = False  # searched only with low_bits=True


def _served(name: str, weights: tuple[WeightScheme, ...]) -> Family:
    """A family with the activation widths the kernels serve every one of its weights with."""
    widths = set.intersection(*(set(served_act_bits(w)) for w in weights))
    return Family(name, weights, tuple(sorted(widths)))


FAMILIES: tuple[Family, ...] = (
    _served("w4 (W4A8 / W4A16 kernels)", _grid((4,))),
    _served("w8 per-channel (W8A8 / W8A16 kernels)", (WeightScheme(8),)),
    _served("w16 (unquantized)", (WeightScheme(16),)),
    Family("w2/w3 (simulation only: no kernel)", _grid((2, 3)), (8, 16), opt_in=True),
)


def _has_feeder(layer: LayerSensitivity) -> bool:
    return layer.feeder is not None


class _Requirements(Mapping[str, Callable[[LayerSensitivity], bool]]):
    """Activation scheme name -> its requirement on a layer, for the registered strategies that have one: those
    that need a feeding norm (FPTQ's and SmoothQuant's s fold into it, arXiv 2308.15987 / 2211.10438)."""

    def __getitem__(self, name: str) -> Callable[[LayerSensitivity], bool]:
        if name in ActScheme and ActScheme(name).needs_norm:
            return _has_feeder
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (a.name for a in ActScheme if a.needs_norm)

    def __len__(self) -> int:
        return sum(1 for _ in self)


# Activation schemes with a requirement on the layer; the rest apply everywhere.
ACT_REQUIREMENTS: Mapping[str, Callable[[LayerSensitivity], bool]] = _Requirements()


def layer_type(name: str) -> str:
    """The name without its block prefix: 'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj'."""
    return re.sub(r"^.*?\.\d+\.", "", name)


@dataclass(frozen=True)
class SearchSpace:
    """The knobs a user sets: activation width, weight symmetry, 2/3-bit opt-in, skipped modules, caps."""

    act_bits: int | None = None  # 8 or 16 forces the activation width; None searches both
    symmetry: str = "both"  # "sym", "asym" or "both": which w4 (and w2/w3) variants are searched
    low_bits: bool = False  # add 2/3-bit weights (simulation only: no kernel serves them)
    weights: tuple[str, ...] | None = None  # restrict the weight schemes to these (canonical names)
    skip: str | None = None  # regex (re.search) of module names kept at w16:a16
    max_dynamic_share: float | None = None  # at most this share of searched layers use a8-dynamic
    target: str = "quantplan"  # deployment format: "compressed-tensors" keeps to the schemes it expresses
    fused_groups: bool | None = None  # layers a server fuses (q/k/v, gate/up) share one scheme; None: per target

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise SearchError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.act_bits not in (None, 8, 16):
            raise SearchError(f"--act-bits must be 8 or 16, got {self.act_bits}")
        if self.symmetry not in SYMMETRY:
            raise SearchError(f"weight symmetry must be one of {sorted(SYMMETRY)}, got {self.symmetry!r}")
        share = self.max_dynamic_share
        if share is not None and not (isinstance(share, (int, float)) and math.isfinite(share) and 0 <= share <= 1):
            raise SearchError(f"--max-dynamic-share must be a fraction in [0, 1], got {share!r}")
        if self.skip is not None:
            try:
                re.compile(self.skip)
            except re.error as e:
                raise SearchError(f"--skip {self.skip!r} is not a valid regular expression: {e}") from None
        if self.weights is not None:
            self._check_weights(self.weights)

    def _check_weights(self, names: tuple[str, ...]) -> None:
        if not names:
            raise SearchError("the weight scheme list is empty; name at least one, e.g. w4g128,w8")
        served = {str(w) for f in FAMILIES if self.low_bits or not f.opt_in for w in f.weights}
        for name in names:
            scheme = str(WeightScheme.parse(name))  # SchemeError for an unknown scheme
            if scheme != name:
                raise SchemeError(f"write weight scheme {name!r} in its canonical form {scheme!r}")
            if scheme not in served:
                hint = "; 2/3-bit weights need --low-bits" if WeightScheme.parse(name).bits < 4 else ""
                raise SchemeError(f"weight scheme {name!r} is not served by any kernel in this space{hint}")

    # -- what a layer may take ----------------------------------------------------------------------
    def families(self) -> tuple[Family, ...]:
        return tuple(f for f in FAMILIES if self.low_bits or not f.opt_in)

    def weight_acts(self) -> dict[WeightScheme, tuple[ActScheme, ...]]:
        """Searched weight scheme -> the activation schemes served with it (before layer requirements)."""
        out: dict[WeightScheme, tuple[ActScheme, ...]] = {}
        for family in self.families():
            acts = tuple(ActScheme(a) for a in ACTS if ActScheme(a).bits in family.act_bits and self._act_ok(a))
            for w in family.weights:
                if self._weight_ok(w) and acts:
                    out[w] = acts
        return out

    def _weight_ok(self, w: WeightScheme) -> bool:
        # the symmetry knob picks w2/w3/w4 variants; w8 is symmetric (the W8A8 kernel's format), w16 has none
        sym_ok = w.asymmetric in SYMMETRY[self.symmetry] if w.bits < 8 else not w.asymmetric
        return sym_ok and (self.weights is None or str(w) in self.weights)

    def _act_ok(self, act: str) -> bool:
        return self.act_bits is None or ActScheme(act).bits == self.act_bits

    def layer_acts(self, layer: LayerSensitivity) -> tuple[ActScheme, ...]:
        """Activation schemes this layer may use (its group may narrow them further)."""
        return tuple(ActScheme(a) for a in ACTS
                     if self._act_ok(a) and ACT_REQUIREMENTS.get(a, lambda _l: True)(layer))

    @property
    def fused(self) -> bool:
        """Whether fused layers share one scheme: `fused_groups`, by default on for compressed-tensors."""
        return self.target == CT_TARGET if self.fused_groups is None else self.fused_groups

    def skipped(self, name: str) -> bool:
        return self.skip is not None and re.search(self.skip, name) is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "act_bits": self.act_bits,
            "symmetry": self.symmetry,
            "low_bits": self.low_bits,
            "weights": list(self.weights) if self.weights is not None else None,
            "skip": self.skip,
            "max_dynamic_share": self.max_dynamic_share,
            # only when set: the studies stored before these knobs keep their configuration
            **({"target": self.target} if self.target != "quantplan" else {}),
            **({"fused_groups": self.fused_groups} if self.fused_groups is not None else {}),
        }
