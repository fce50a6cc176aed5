"""quant: schemes and plans (torch-free data), quantizers, fake-quant modules and apply_plan.

Importing this package does not import torch: the torch-side pieces live in submodules
(`quant.quantizers`, `quant.modules`, `quant.apply`), so `search` and `storage` can use plans freely.
"""

from quant.errors import DataError, ModelLoadError, PlanError, QuantPlanError, SchemeError

__all__ = ["DataError", "ModelLoadError", "PlanError", "QuantPlanError", "SchemeError"]
