"""SensitivityTable: the per-layer cost table, saved as one safetensors file with its JSON metadata inside.

The file holds tensors (per-channel max|X| per layer, per-group block scores per layer and weight scheme) and,
in the safetensors header, a JSON document under the key `quantplan.sensitivity` with everything else: the
cache key, the model fingerprint, the calibration spec, the estimator settings and per-layer costs
(`quant.costs.TableInfo`, which search reads without torch).
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
from safetensors.torch import load_file, save_file

from quantplan.quant.costs import (
    TABLE_FORMAT,
    TABLE_VERSION,
    LayerSensitivity,
    TableError,
    TableInfo,
    read_table_metadata,
)

__all__ = ["LayerSensitivity", "SensitivityTable", "TableError", "table_key"]


@dataclass(frozen=True)
class SensitivityTable(TableInfo):
    """Every quantizable layer's costs plus tensors, keyed by (model fingerprint, calibration, estimator)."""

    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def channel_absmax(self, name: str) -> torch.Tensor:
        return self.tensors[f"channel_absmax/{name}"]

    def block_scores(self, name: str, scheme: str) -> torch.Tensor:
        """[N, G] per-group predicted loss increase of `scheme` on layer `name`."""
        return self.tensors[f"blocks/{name}/{scheme}"]

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
        info = TableInfo.from_metadata(read_table_metadata(path), str(path))
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise TableError(f"{path} is not a readable sensitivity table ({e}); recompute it") from None
        return cls(info.key, info.model, info.calibration, info.estimator, info.layers, tensors)


def table_key(model_fingerprint: str, calibration: Mapping[str, Any], estimator: Mapping[str, Any]) -> str:
    """Cache key: a hash of what determines the table (model weights/config, data, estimator settings)."""
    doc = json.dumps(
        {"model": model_fingerprint, "calibration": calibration, "estimator": estimator, "version": TABLE_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(doc.encode()).hexdigest()[:24]
