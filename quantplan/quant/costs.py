"""The torch-free view of a sensitivity table: per-layer predicted costs that search reads (no tensors).

`workers.table.SensitivityTable` adds the tensors (channel statistics, block scores) and computes/saves
tables; `search` only needs the numbers here, and `read_table_info` reads them from a table file without torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantplan.errors import QuantPlanError

TABLE_FORMAT = "quantplan.sensitivity"
TABLE_VERSION = 1


class TableError(QuantPlanError):
    """A sensitivity table file that is missing, corrupt, or of another format version."""


@dataclass(frozen=True)
class LayerSensitivity:
    """Predicted loss increase (nats/token) of each scheme on one layer, and its activation statistics."""

    name: str
    shape: tuple[int, int]  # (N out_features, K in_features)
    feeder: str | None  # the norm whose output this layer reads (layers sharing it share an act scheme)
    weight_cost: Mapping[str, float]  # weight scheme -> cost at its best clip ratio ("w16" -> 0)
    clip: Mapping[str, float]  # weight scheme -> best Fisher-weighted clip ratio
    act_cost: Mapping[str, float]  # act scheme -> cost ("a16" -> 0)
    act_absmax: float  # max|X| over calibration tokens (FPTQ's layer rule reads it)
    act_percentiles: Mapping[str, float] = field(default_factory=dict)  # "p99.9" -> |x| percentile

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "params": self.params,
            "feeder": self.feeder,
            "weight_cost": dict(self.weight_cost),
            "clip": dict(self.clip),
            "act_cost": dict(self.act_cost),
            "act_absmax": self.act_absmax,
            "act_percentiles": dict(self.act_percentiles),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerSensitivity:
        return cls(
            d["name"],
            tuple(d["shape"]),
            d["feeder"],
            d["weight_cost"],
            d["clip"],
            d["act_cost"],
            d["act_absmax"],
            d.get("act_percentiles", {}),
        )


@dataclass(frozen=True)
class TableInfo:
    """A table's identity and per-layer costs (everything but tensors)."""

    key: str
    model: Mapping[str, Any]  # name, fingerprint
    calibration: Mapping[str, Any]  # CalibrationSet.spec_dict()
    estimator: Mapping[str, Any]  # micro_batch, batches, tokens, mean loss
    layers: tuple[LayerSensitivity, ...]

    def layer(self, name: str) -> LayerSensitivity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def summary(self) -> list[dict[str, Any]]:
        """Per layer: name, params, weight_cost, act_cost, act_absmax (the `--json` contract)."""
        return [
            {
                "name": l.name,
                "params": l.params,
                "weight_cost": dict(l.weight_cost),
                "act_cost": dict(l.act_cost),
                "act_absmax": l.act_absmax,
            }
            for l in self.layers
        ]

    def metadata(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "key": self.key,
            "model": dict(self.model),
            "calibration": dict(self.calibration),
            "estimator": dict(self.estimator),
            "layers": [l.to_dict() for l in self.layers],
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], where: str = "table") -> TableInfo:
        if meta.get("format") != TABLE_FORMAT or meta.get("version") != TABLE_VERSION:
            raise TableError(
                f"{where} has table format {meta.get('format')!r} version {meta.get('version')!r}; this QuantPlan "
                f"reads version {TABLE_VERSION}: recompute it"
            )
        layers = tuple(LayerSensitivity.from_dict(d) for d in meta["layers"])
        return cls(meta["key"], meta["model"], meta["calibration"], meta["estimator"], layers)


def read_table_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON metadata stored in a table file's safetensors header (no tensors are read, no torch)."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"sensitivity table not found: {path}; compute one with `quantplan sensitivity`")
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < 1 << 30 else {}
        return json.loads(header["__metadata__"][TABLE_FORMAT])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TableError(
            f"{path} is not a QuantPlan sensitivity table ({type(e).__name__}: {e}); recompute it"
        ) from None


def read_table_info(path: str | os.PathLike[str]) -> TableInfo:
    """A table file's costs without its tensors (what search needs)."""
    return TableInfo.from_metadata(read_table_metadata(path), str(path))
