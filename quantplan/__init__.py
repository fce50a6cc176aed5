"""QuantPlan: mixed-precision quantization plans for LLMs under a memory budget.

Subpackages (the design's components, imported explicitly; importing `quantplan` loads nothing heavy):
`quant` (schemes, plans, quantizers, kernels, artifacts), `workers` (models, data, sensitivities, evaluation
on Ray), `search` (knapsack + Optuna, torch-free), `storage` (SQL database and artifact store, torch-free) and
`service` (pipeline runner, HTTP API, CLI). `quantplan.errors` holds the error hierarchy shared by all of them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("quantplan")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
