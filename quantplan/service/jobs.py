"""The search-job spec: what a user submits (`quantplan run`, `quantplan submit`, `POST /v1/jobs`).

A spec is plain JSON stored in the `jobs` table; `JobSpec.parse` validates it with one readable message. Field
names match the `quantplan search` flags (`--budget-bits` -> `budget_bits`). torch-free, so the HTTP API can
validate submissions without loading the ML stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quantplan.errors import QuantPlanError


class SpecError(QuantPlanError):
    """A job spec that does not validate."""


class JobSpec(BaseModel):
    """A search job: model, data, one memory budget and the search options (defaults as `quantplan search`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=1024, description="Hugging Face id or a directory the runner sees.")
    data: str = Field(min_length=1, max_length=4096,
                      description="Calibration and evaluation data: wikitext2 | wikitext2:<dir> | text:<file>,...")
    eval_data: str | None = Field(None, max_length=4096, description="Held-out data (default: data, test split).")
    budget_bits: float | None = Field(None, gt=0, le=32, description="Average bits per weight, scales included.")
    budget_mb: float | None = Field(None, gt=0, description="Bytes of the quantizable weights, in MB (10^6).")
    act_bits: Literal[8, 16] = 8
    trials: int = Field(100, ge=0, le=100_000)
    eval_top: int = Field(2, ge=0, le=32, description="Measure this many best Pareto plans (plus the baselines).")
    materialize_top: int = Field(1, ge=0, le=8, description="Materialize this many measured plans, best first.")
    samples: int = Field(64, ge=1, le=100_000, description="Calibration windows.")
    seq_len: int | None = Field(None, ge=2, le=32_768)
    eval_samples: int | None = Field(None, ge=1, le=100_000)
    skip: str | None = Field(None, max_length=1024, description="Regex of module names to keep unquantized.")
    max_dynamic_share: float | None = Field(None, ge=0, le=1)
    space: Literal["structured", "per-layer"] = "structured"
    symmetry: Literal["sym", "asym", "both"] = "both"
    weights: list[str] | None = Field(None, max_length=64, description="Only these weight schemes.")
    select: Literal["kl", "perplexity"] = Field("kl", description="Pick the plan by measured KL, or by perplexity "
                                                "on a validation slice disjoint from the reported windows.")
    select_data: str | None = Field(None, max_length=4096, description="Selection text (default: data, "
                                                                       "validation split).")
    select_samples: int | None = Field(None, ge=1, le=100_000)
    refine: int = Field(0, ge=0, le=10_000, description="Measured refinement steps (needs select=perplexity).")
    refine_tol: float = Field(0.001, ge=0, le=1)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    workers: int = Field(1, ge=1, le=1024)
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32"

    @model_validator(mode="after")
    def _one_budget(self) -> JobSpec:
        if (self.budget_bits is None) == (self.budget_mb is None):
            raise ValueError("give exactly one budget: budget_bits or budget_mb")
        if self.refine and self.select != "perplexity":
            raise ValueError("refine needs select='perplexity' (it descends on the selection slice)")
        return self

    @classmethod
    def parse(cls, spec: Mapping[str, Any] | Any) -> JobSpec:
        """Validate a stored or submitted spec; a `SpecError` names every bad field."""
        if not isinstance(spec, Mapping):
            raise SpecError(f"a job spec must be a JSON object, got {type(spec).__name__}")
        try:
            return cls.model_validate(dict(spec))
        except ValidationError as e:
            raise SpecError(f"invalid job spec: {describe(e)}") from None

    def to_json(self) -> dict[str, Any]:
        """The spec as stored: every field set by the user, defaults left out (so defaults can evolve)."""
        return self.model_dump(mode="json", exclude_unset=True)


def describe(e: ValidationError) -> str:
    """pydantic's errors as one line a person reads: `field: problem; field: problem`."""
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
