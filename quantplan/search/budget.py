"""Memory budgets: average bits per weight or total bytes, counted exactly as `Plan.cost` counts them.

A layer's size is its exact storage (`quant.plan.weight_cost`: codes with K padded to whole groups, fp16
scales, zero-points). An average-bits budget bounds the sum of bits over the quantizable layers by
floor(B * params) (exact rational arithmetic on the decimal B as written, so a plan within it reports
`avg_bits <= B` up to the last bit of B's float); a bytes budget
bounds the sum of per-layer bytes, each rounded up, as `PlanCost.bytes` sums them. 1 MB = 1,000,000 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from quantplan.errors import QuantPlanError

MB = 1_000_000


class BudgetError(QuantPlanError, ValueError):
    """A budget that is missing, malformed, or smaller than the smallest plan in the search space."""


@dataclass(frozen=True)
class Budget:
    """Exactly one of an average bits-per-weight bound and a megabyte bound."""

    avg_bits: float | None = None
    megabytes: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.avg_bits, self.megabytes) if v is not None]
        if len(given) != 1:
            raise BudgetError("give exactly one budget: --budget-bits B (average bits per weight) or --budget-mb MB")
        value = given[0]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise BudgetError(f"a budget must be a positive number, got {value!r}")

    @property
    def unit(self) -> Literal["bits", "bytes"]:
        return "bits" if self.avg_bits is not None else "bytes"

    def size(self, bits: int) -> int:
        """A layer's size in this budget's unit (bytes are rounded up per layer, as PlanCost does)."""
        return bits if self.unit == "bits" else -(-bits // 8)

    def limit(self, params: int) -> int:
        """The largest total size (in `unit`) within the budget, for `params` quantizable weights."""
        # Fraction(repr(x)): the decimal the user typed (0.12 MB is 120,000 bytes, not 119,999)
        if self.avg_bits is not None:
            return math.floor(Fraction(repr(float(self.avg_bits))) * params)
        return math.floor(Fraction(repr(float(self.megabytes))) * MB)

    def describe(self) -> str:
        return f"{self.avg_bits:g} avg bits" if self.avg_bits is not None else f"{self.megabytes:g} MB"

    def infeasible(self, smallest: int, params: int) -> BudgetError:
        """The error for a budget below `smallest` (in `unit`): it states the smallest feasible budget."""
        if self.avg_bits is not None:
            need = math.ceil(smallest / params * 1000) / 1000  # rounded up: passing it back is feasible
            fix = f"raise --budget-bits to at least {need:.3f}"
            have = f"{smallest / params:.4f} avg bits ({-(-smallest // 8):,} bytes)"
        else:
            fix = f"raise --budget-mb to at least {smallest / MB:.6f}"
            have = f"{smallest:,} bytes ({smallest / MB:.6f} MB)"
        return BudgetError(
            f"budget {self.describe()} is infeasible: the smallest plan in this search space takes {have}; "
            f"{fix}, or widen the space (--low-bits adds 2/3-bit weights)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"avg_bits": self.avg_bits, "megabytes": self.megabytes}
