"""The search-job spec and its one table of defaults: what a user submits (`quantplan run`, `quantplan submit`,
`POST /v1/jobs`) and what `quantplan search` runs.

A spec is plain JSON stored in the `jobs` table; `JobSpec.parse` validates it with one readable message. Field
names match the `quantplan search` flags (`--budget-bits` -> `budget_bits`), and `DEFAULTS` is the one table of
their defaults: the JobSpec fields, the `quantplan search` options, the `run`/`submit` help and the API's OpenAPI
schema all read it. Everything a job's input can get wrong without the model is checked here, at submission:
the budget, the data spec syntax (the paths are the runner's), the weight schemes, the skip regex. torch-free, so
the HTTP API validates submissions without loading the ML stack.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantplan.errors import QuantPlanError
from quantplan.quant.schemes import WeightScheme
from quantplan.workers.dataspec import parse_syntax

if TYPE_CHECKING:
    from quantplan.search.budget import Budget
    from quantplan.search.space import SearchSpace

# The defaults of every option with one (see docs/SERVICE.md, "The job spec"). Options whose default depends on
# the model or on another option (seq_len, eval_data, eval_samples, select_data, select_samples, ...) are None.
DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "act_bits": 8,  # W4A8/W8A8 plans
    "trials": 300,  # Optuna trials take milliseconds (the search sees numbers), the knapsack seeds the study
    "eval_top": 3,  # measured plans besides the baselines: each costs one evaluation on the held-out windows
    "eval_baselines": True,
    "materialize_top": 1,
    "samples": 128,  # calibration windows: the `quantplan sensitivity` default, so its cached table is reused
    "space": "structured",
    "symmetry": "both",
    "low_bits": False,
    "select": "kl",
    "refine": 0,
    "refine_tol": 0.001,
    "seed": 0,
    "workers": 1,
    "dtype": "float32",
    "target": "quantplan",  # the deployment format the plans must export to (`--target`)
})
SELECT = ("kl", "perplexity")
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # strings: no NUL or other control characters (they end up in paths and logs)
# exactly one budget, as JSON Schema says it (a null budget counts as absent, as the validator below treats it)
ONE_BUDGET = {"oneOf": [{"required": [name], "properties": {name: {"type": "number"}}}
                        for name in ("budget_bits", "budget_mb")]}


class SpecError(QuantPlanError):
    """A job spec that does not validate."""


class JobSpec(BaseModel):
    """A search job: model, data, one memory budget and the search options (defaults: `DEFAULTS`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, json_schema_extra=ONE_BUDGET)

    model: str = Field(min_length=1, max_length=1024, pattern=PRINTABLE,
                       description="Hugging Face id or a directory the runner sees.")
    data: str = Field(min_length=1, max_length=4096, pattern=PRINTABLE,
                      description="Calibration and evaluation data: wikitext2 | wikitext2:<dir> | text:<file>,...")
    eval_data: str | None = Field(None, max_length=4096, pattern=PRINTABLE,
                                  description="Held-out data (default: data, test split).")
    budget_bits: float | None = Field(None, gt=0, le=32, description="Average bits per weight, scales included.")
    budget_mb: float | None = Field(None, gt=0, le=1e9, description="Bytes of the quantizable weights, in MB (10^6).")
    act_bits: Literal[8, 16] = Field(DEFAULTS["act_bits"], description="8: int8 activations; 16: weight-only.")
    trials: int = Field(DEFAULTS["trials"], ge=0, le=100_000, description="Completed trials the study should hold.")
    eval_top: int = Field(DEFAULTS["eval_top"], ge=0, le=32,
                          description="Measure this many best Pareto plans (plus the baselines).")
    eval_baselines: bool = Field(DEFAULTS["eval_baselines"],
                                 description="Measure the fixed baselines too when eval_top > 0.")
    materialize_top: int = Field(DEFAULTS["materialize_top"], ge=0, le=8,
                                 description="Materialize this many measured plans, best first (jobs only).")
    samples: int = Field(DEFAULTS["samples"], ge=1, le=100_000, description="Calibration windows.")
    seq_len: int | None = Field(None, ge=2, le=32_768, description="Window length (default: min(512, max)).")
    eval_samples: int | None = Field(None, ge=1, le=100_000, description="Evaluate at most N windows.")
    skip: str | None = Field(None, max_length=1024, pattern=PRINTABLE,
                             description="Regex of module names to keep unquantized.")
    max_dynamic_share: float | None = Field(None, ge=0, le=1)
    space: Literal["structured", "per-layer"] = DEFAULTS["space"]
    symmetry: Literal["sym", "asym", "both"] = DEFAULTS["symmetry"]
    low_bits: bool = Field(DEFAULTS["low_bits"], description="Also search 2/3-bit weights (simulation only).")
    weights: list[Annotated[str, Field(max_length=64, pattern=PRINTABLE)]] | None = Field(
        None, max_length=64, description="Only these weight schemes.")
    select: Literal["kl", "perplexity"] = Field(DEFAULTS["select"], description="Pick the plan by measured KL, or "
                                                "by perplexity on a validation slice disjoint from the reported "
                                                "windows.")
    select_data: str | None = Field(None, max_length=4096, pattern=PRINTABLE,
                                    description="Selection text (default: data, validation split).")
    select_samples: int | None = Field(None, ge=1, le=100_000)
    refine: int = Field(DEFAULTS["refine"], ge=0, le=10_000,
                        description="Measured refinement steps (needs select=perplexity).")
    refine_tol: float = Field(DEFAULTS["refine_tol"], ge=0, le=1)
    seed: int = Field(DEFAULTS["seed"], ge=0, le=2**31 - 1)
    workers: int = Field(DEFAULTS["workers"], ge=1, le=1024)
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = DEFAULTS["dtype"]
    target: Literal["quantplan", "compressed-tensors"] = Field(
        DEFAULTS["target"], description="Deployment format: compressed-tensors (vLLM) keeps the search to the schemes "
        "that format expresses, fused layers (q/k/v, gate/up) sharing one scheme.")
    fused_groups: bool | None = Field(None, description="Layers a server fuses share one scheme (default: on for "
                                      "target compressed-tensors).")

    @field_validator("data", "eval_data", "select_data")
    @classmethod
    def _data_syntax(cls, value: str | None) -> str | None:
        if value is not None:
            _as_value_error(parse_syntax, value)  # the paths are checked where the job runs
        return value

    @field_validator("weights")
    @classmethod
    def _weight_schemes(cls, value: list[str] | None) -> list[str] | None:
        for name in value or ():
            _as_value_error(WeightScheme.parse, name)
        return value

    @field_validator("skip")
    @classmethod
    def _skip_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except (re.error, OverflowError, RecursionError) as e:  # "a{9999999999}" overflows
                raise ValueError(f"{value!r} is not a valid regular expression: {e}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if (self.budget_bits is None) == (self.budget_mb is None):
            raise ValueError("give exactly one budget: budget_bits or budget_mb")
        if self.refine and self.select != "perplexity":
            raise ValueError("refine measures candidates on the selection slice: it needs select='perplexity' "
                             "(with select='kl' it would choose on the reported windows)")
        _as_value_error(self.budget)
        _as_value_error(self.search_space)  # weights in canonical form, served in this space
        return self

    @classmethod
    def parse(cls, spec: Mapping[str, Any] | Any, *, flags: bool = False) -> JobSpec:
        """Validate a stored or submitted spec; a `SpecError` names every bad field (as `--flags` with `flags`)."""
        if not isinstance(spec, Mapping):
            raise SpecError(f"a job spec must be a JSON object, got {type(spec).__name__}")
        try:
            return cls.model_validate(dict(spec))
        except ValidationError as e:
            raise SpecError(f"invalid {'options' if flags else 'job spec'}: {describe(e, flags=flags)}") from None

    def to_json(self) -> dict[str, Any]:
        """The spec as stored: every field set by the user, defaults left out (so defaults can evolve)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def budget(self) -> Budget:
        from quantplan.search.budget import Budget

        return Budget(self.budget_bits, self.budget_mb)

    def search_space(self) -> SearchSpace:
        from quantplan.search.space import SearchSpace

        weights = tuple(self.weights) if self.weights is not None else None
        return SearchSpace(act_bits=self.act_bits, symmetry=self.symmetry, low_bits=self.low_bits, weights=weights,
                           skip=self.skip, max_dynamic_share=self.max_dynamic_share, target=self.target,
                           fused_groups=self.fused_groups)


def _as_value_error(check: Any, *args: Any) -> Any:
    """`check(*args)`, its `QuantPlanError` turned into the ValueError pydantic reports under the field."""
    try:
        return check(*args)
    except QuantPlanError as e:
        raise ValueError(str(e)) from None


def describe(e: ValidationError, *, flags: bool = False) -> str:
    """pydantic's errors as one line a person reads: `field: problem; field: problem` (`--field` with flags)."""
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        if flags and err["loc"]:
            where = "--" + str(err["loc"][0]).replace("_", "-")
        parts.append(f"{where}: {error_message(err)}")
    return "; ".join(parts)


def error_message(err: Mapping[str, Any]) -> str:
    """One pydantic error's message as a person reads it (the API's 422 uses it too)."""
    if err.get("type") == "string_pattern_mismatch" and (err.get("ctx") or {}).get("pattern") == PRINTABLE:
        return "must not contain NUL or other control characters; remove them"
    return str(err.get("msg", "invalid")).removeprefix("Value error, ")
