"""Plan: the frozen, versioned, JSON-round-trippable map from module names to layer schemes (torch-free).

A plan is data. Search emits it, storage keeps it, `apply_plan` consumes it. JSON form (version 1):

    {
      "format": "quantplan.plan", "version": 1,
      "model": {"name": "stories260K", "revision": null, "fingerprint": null},
      "default": "w16:a16",
      "layers": {
        "model.layers.0.mlp.down_proj": "w8:a8-static",
        "re:.*\\.self_attn\\.[qkv]_proj": {"scheme": "w4g128:a8-lae", "clip": 0.95},
        "re:.*\\.mlp\\.(gate|up)_proj": {"scheme": "w4g64:a8-smooth", "alpha": 0.6}
      },
      "meta": {}
    }

Resolution of a module name: an exact key wins; otherwise the first `re:` pattern (in file order) that
matches the whole name (`re.fullmatch`); otherwise the default.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from quantplan.errors import PlanError, QuantPlanError
from quantplan.quant.schemes import SCALE_BITS, UNQUANTIZED, LayerScheme, WeightScheme

PLAN_FORMAT = "quantplan.plan"
PLAN_VERSION = 1
REGEX_PREFIX = "re:"

_PLAN_KEYS = {"format", "version", "model", "default", "layers", "meta"}
_MODEL_KEYS = {"name", "revision", "fingerprint"}
_LAYER_KEYS = {"scheme", "clip", "alpha"}


@dataclass(frozen=True)
class LayerSpec:
    """A layer scheme plus its per-layer parameters."""

    scheme: LayerScheme
    clip: float = 1.0  # weight clip ratio: the quantization range is clip * max|W| of each group
    alpha: float = 0.5  # SmoothQuant migration strength (used by a8-smooth only)

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, (int, float)) and 0.0 < self.clip <= 1.0):
            raise PlanError(f"clip ratio must be a number in (0, 1], got {self.clip!r}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise PlanError(f"SmoothQuant alpha must be a number in [0, 1], got {self.alpha!r}")

    @classmethod
    def parse(cls, value: str | Mapping[str, Any], where: str) -> LayerSpec:
        if isinstance(value, str):
            return cls(LayerScheme.parse(value))
        if not isinstance(value, Mapping):
            raise PlanError(f"{where}: expected a scheme string or an object with 'scheme', got {value!r}")
        _reject_unknown(value, _LAYER_KEYS, where)
        if "scheme" not in value:
            raise PlanError(f"{where}: missing 'scheme' (e.g. \"w4g128:a8-dynamic\")")
        return cls(LayerScheme.parse(value["scheme"]), value.get("clip", 1.0), value.get("alpha", 0.5))

    def to_json(self) -> str | dict[str, Any]:
        """The short string form when parameters are at their defaults, else an object."""
        out: dict[str, Any] = {"scheme": str(self.scheme)}
        if self.clip != 1.0:
            out["clip"] = self.clip
        if self.alpha != 0.5:
            out["alpha"] = self.alpha
        return out if len(out) > 1 else out["scheme"]


@dataclass(frozen=True)
class ModelRef:
    """Which base model a plan was made for."""

    name: str = ""
    revision: str | None = None
    fingerprint: str | None = None


@dataclass(frozen=True)
class LayerCost:
    """Storage of one layer's weights under a scheme, in bits, counting padding, scales and zero-points."""

    params: int  # N * K real weights
    code_bits: int  # N * K_pad * b (padding to a whole number of groups is stored)
    scale_bits: int  # N * groups * 16
    zero_bits: int  # N * groups * b when asymmetric

    @property
    def bits(self) -> int:
        return self.code_bits + self.scale_bits + self.zero_bits

    @property
    def bytes(self) -> int:
        return math.ceil(self.bits / 8)

    @property
    def avg_bits(self) -> float:
        return self.bits / self.params


@dataclass(frozen=True)
class PlanCost:
    """Exact storage of a plan's quantizable layers, and average bits per real weight."""

    layers: Mapping[str, LayerCost]

    @property
    def params(self) -> int:
        return sum(c.params for c in self.layers.values())

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.layers.values())

    @property
    def avg_bits(self) -> float:
        return sum(c.bits for c in self.layers.values()) / max(self.params, 1)


def weight_cost(scheme: WeightScheme, out_features: int, in_features: int, name: str = "layer") -> LayerCost:
    """Storage of an [N, K] weight under `scheme`; K is padded up to a whole number of groups."""
    n, k = out_features, in_features
    if not scheme.quantized:
        return LayerCost(n * k, n * k * 16, 0, 0)
    g = scheme.group_size(k)
    if g > k:
        raise PlanError(
            f"{name}: group size {g} is larger than in_features K={k}; use a smaller group or per-channel "
            f"(w{scheme.bits}{'a' if scheme.asymmetric else ''})"
        )
    groups = -(-k // g)  # ceil
    return LayerCost(n * k, n * groups * g * scheme.bits, n * groups * SCALE_BITS, n * groups * scheme.zero_bits)


def specs_cost(specs: Mapping[str, LayerSpec], shapes: Mapping[str, tuple[int, int]]) -> PlanCost:
    """`Plan.cost` for specs already resolved (name -> spec for every name of `shapes`)."""
    return PlanCost({name: weight_cost(specs[name].scheme.weight, n, k, name) for name, (n, k) in shapes.items()})


@dataclass(frozen=True)
class Plan:
    """An ordered map from module name (or `re:` pattern) to a LayerSpec, with a default."""

    layers: tuple[tuple[str, LayerSpec], ...] = ()
    default: LayerSpec = field(default_factory=lambda: LayerSpec(UNQUANTIZED))
    model: ModelRef = field(default_factory=ModelRef)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keys = [k for k, _ in self.layers]
        if len(set(keys)) != len(keys):
            raise PlanError("plan lists a module or pattern twice; each key may appear once")
        for key in keys:
            if key.startswith(REGEX_PREFIX):
                _compile(key)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def uniform(cls, scheme: str | LayerScheme, *, model: ModelRef | None = None, **params: float) -> Plan:
        """Every quantizable layer gets the same scheme."""
        layer_scheme = LayerScheme.parse(scheme) if isinstance(scheme, str) else scheme
        return cls(default=LayerSpec(layer_scheme, **params), model=model or ModelRef())

    @classmethod
    def from_layers(cls, layers: Mapping[str, str | LayerSpec], **kwargs: Any) -> Plan:
        specs = tuple((k, v if isinstance(v, LayerSpec) else LayerSpec.parse(v, k)) for k, v in layers.items())
        return cls(layers=specs, **kwargs)

    # -- resolution -----------------------------------------------------------------------------
    @cached_property
    def _exact(self) -> dict[str, LayerSpec]:
        return {k: v for k, v in self.layers if not k.startswith(REGEX_PREFIX)}

    @cached_property
    def _patterns(self) -> list[tuple[re.Pattern[str], LayerSpec]]:
        return [(_compile(k), v) for k, v in self.layers if k.startswith(REGEX_PREFIX)]

    def resolve(self, name: str) -> LayerSpec:
        """The spec for module `name`: exact key, else first matching `re:` pattern, else the default."""
        if name in self._exact:
            return self._exact[name]
        for pattern, spec in self._patterns:
            if pattern.fullmatch(name):
                return spec
        return self.default

    def cost(self, shapes: Mapping[str, tuple[int, int]]) -> PlanCost:
        """Exact storage of the quantizable layers `shapes` (name -> (out_features, in_features))."""
        return specs_cost({name: self.resolve(name) for name in shapes}, shapes)

    def unused_keys(self, names: Iterable[str]) -> list[str]:
        """Plan keys that match none of `names` (usually a typo in a module name)."""
        names = list(names)
        return [
            k
            for k, _ in self.layers
            if not (any(_compile(k).fullmatch(n) for n in names) if k.startswith(REGEX_PREFIX) else k in names)
        ]

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": {"name": self.model.name, "revision": self.model.revision,
                      "fingerprint": self.model.fingerprint},
            "default": self.default.to_json(),
            "layers": {k: v.to_json() for k, v in self.layers},
            "meta": dict(self.meta),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, Mapping):
            raise PlanError("a plan must be a JSON object with 'version', 'default' and 'layers'")
        _reject_unknown(data, _PLAN_KEYS, "plan")
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise PlanError(f"not a QuantPlan plan: format is {data.get('format')!r}, expected {PLAN_FORMAT!r}")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(
                f"unsupported plan version {data.get('version')!r}; this QuantPlan reads version {PLAN_VERSION}"
            )
        model = data.get("model") or {}
        if not isinstance(model, Mapping):
            raise PlanError("plan 'model' must be an object with name, revision, fingerprint")
        _reject_unknown(model, _MODEL_KEYS, "plan.model")
        layers = data.get("layers") or {}
        if not isinstance(layers, Mapping):
            raise PlanError("plan 'layers' must be an object mapping module names or re: patterns to schemes")
        meta = data.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise PlanError("plan 'meta' must be an object")
        return cls(
            layers=tuple((str(k), LayerSpec.parse(v, f"layers[{k!r}]")) for k, v in layers.items()),
            default=LayerSpec.parse(data.get("default", str(UNQUANTIZED)), "default"),
            model=ModelRef(str(model.get("name", "")), model.get("revision"), model.get("fingerprint")),
            meta=dict(meta),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise PlanError(f"cannot read plan file {path}: {e.strerror or e}") from None
        try:
            return cls.from_json(text)
        except QuantPlanError as e:
            raise PlanError(f"{path}: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_text(Path(path), self.to_json())


def atomic_write_text(path: Path, text: str) -> Path:
    """Write to a temporary file in the same directory, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _compile(key: str) -> re.Pattern[str]:
    try:
        return re.compile(key[len(REGEX_PREFIX):])
    except re.error as e:
        raise PlanError(f"invalid regular expression in plan key {key!r}: {e}") from None


def _reject_unknown(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {sorted(allowed)}")
