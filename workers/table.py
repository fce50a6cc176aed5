"""SensitivityTable: the per-layer cost table, saved as one safetensors file with its JSON metadata inside.

The file holds tensors (per-channel max|X| per layer, per-group block scores per layer and weight scheme) and,
in the safetensors header, a JSON document under the key `quantplan.sensitivity` with everything else: the
cache key, the model fingerprint, the calibration spec, the estimator settings and per-layer costs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from quant.errors import QuantPlanError

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
            "name": self.name, "shape": list(self.shape), "params": self.params, "feeder": self.feeder,
            "weight_cost": dict(self.weight_cost), "clip": dict(self.clip), "act_cost": dict(self.act_cost),
            "act_absmax": self.act_absmax, "act_percentiles": dict(self.act_percentiles),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerSensitivity:
        return cls(d["name"], tuple(d["shape"]), d["feeder"], d["weight_cost"], d["clip"], d["act_cost"],
                   d["act_absmax"], d.get("act_percentiles", {}))


@dataclass(frozen=True)
class SensitivityTable:
    """Every quantizable layer's costs, keyed by (model fingerprint, calibration spec, estimator)."""

    key: str
    model: Mapping[str, Any]  # name, fingerprint
    calibration: Mapping[str, Any]  # CalibrationSet.spec_dict()
    estimator: Mapping[str, Any]  # micro_batch, batches, tokens, mean loss
    layers: tuple[LayerSensitivity, ...]
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def layer(self, name: str) -> LayerSensitivity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def channel_absmax(self, name: str) -> torch.Tensor:
        return self.tensors[f"channel_absmax/{name}"]

    def block_scores(self, name: str, scheme: str) -> torch.Tensor:
        """[N, G] per-group predicted loss increase of `scheme` on layer `name`."""
        return self.tensors[f"blocks/{name}/{scheme}"]

    def summary(self) -> list[dict[str, Any]]:
        """Per layer: name, params, weight_cost, act_cost, act_absmax (the `--json` contract)."""
        return [
            {"name": l.name, "params": l.params, "weight_cost": dict(l.weight_cost), "act_cost": dict(l.act_cost),
             "act_absmax": l.act_absmax}
            for l in self.layers
        ]

    def metadata(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT, "version": TABLE_VERSION, "key": self.key, "model": dict(self.model),
            "calibration": dict(self.calibration), "estimator": dict(self.estimator),
            "layers": [l.to_dict() for l in self.layers],
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temporary file in the same directory, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            tensors = {k: v.contiguous() for k, v in self.tensors.items()}
            save_file(tensors, tmp, metadata={TABLE_FORMAT: json.dumps(self.metadata())})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SensitivityTable:
        path = Path(path)
        if not path.is_file():
            raise TableError(f"sensitivity table not found: {path}; compute one with `quantplan sensitivity`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[TABLE_FORMAT])
            tensors = load_file(str(path))
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
            raise TableError(f"{path} is not a QuantPlan sensitivity table ({e}); recompute it") from None
        if meta.get("format") != TABLE_FORMAT or meta.get("version") != TABLE_VERSION:
            raise TableError(
                f"{path} has table format {meta.get('format')!r} version {meta.get('version')!r}; this QuantPlan "
                f"reads version {TABLE_VERSION}: recompute it"
            )
        layers = tuple(LayerSensitivity.from_dict(d) for d in meta["layers"])
        return cls(meta["key"], meta["model"], meta["calibration"], meta["estimator"], layers, tensors)


def table_key(model_fingerprint: str, calibration: Mapping[str, Any], estimator: Mapping[str, Any]) -> str:
    """Cache key: a hash of what determines the table (model weights/config, data, estimator settings)."""
    doc = json.dumps({"model": model_fingerprint, "calibration": calibration, "estimator": estimator,
                      "version": TABLE_VERSION}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:24]
