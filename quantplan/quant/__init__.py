"""quant: schemes and plans (torch-free data), quantizers, fake-quant modules, apply_plan, packed artifacts.

Importing this package does not import torch: the torch-side pieces live in submodules
(`quant.quantizers`, `quant.modules`, `quant.apply`, `quant.artifact`), so `search` and `storage` can use plans
freely. `quant.load_quantized`, `quant.materialize` and `quant.ArtifactInfo` import `quant.artifact` (and torch)
on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from quantplan.errors import ArtifactError, DataError, ModelLoadError, PlanError, QuantPlanError, SchemeError

_LAZY = {name: "quantplan.quant.artifact" for name in ("ArtifactInfo", "load_quantized", "materialize")}

__all__ = ["ArtifactError", "DataError", "ModelLoadError", "PlanError", "QuantPlanError", "SchemeError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quant' has no attribute {name!r}")
