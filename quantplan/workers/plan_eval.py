"""A model measured under a plan: `evaluate_plan` (fake-quant simulation) and its result, `PlanEval`.

Below both the Ray tasks (`workers.tasks`, one plan per task) and the pipeline (`workers.pipeline`), so neither
imports the other to reach it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from quantplan.quant.apply import apply_plan
from quantplan.quant.plan import Plan
from quantplan.workers.evaluate import EvalResult, evaluate, increments

__all__ = ["PlanEval", "evaluate_plan", "plan_label"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanEval:
    """Measured quality and exact size of a model under a plan."""

    plan: str  # a short label: the uniform scheme, or "custom"
    perplexity: float
    nll: float
    kl: float
    tokens: int
    avg_bits: float
    bytes: int
    base_perplexity: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_label(plan: Plan) -> str:
    """The default scheme for a uniform plan, else 'custom (N rules)'."""
    return str(plan.default.scheme) if not plan.layers else f"custom ({len(plan.layers)} rules)"


def evaluate_plan(
    base: nn.Module,
    plan: Plan,
    windows: torch.Tensor,
    calibration: torch.Tensor | None = None,
    *,
    base_result: EvalResult | None = None,
    batch_size: int = 8,
    progress: bool = False,
    on_windows: Callable[[int], None] | None = None,
) -> PlanEval:
    """Perplexity and KL(base || quantized) of `base` under `plan`; `base` itself is left untouched.
    `on_windows(k)` counts the windows of the plan's evaluation as they are done (not the base's)."""
    if base_result is None:
        base_result = evaluate(base, windows, batch_size=batch_size, progress=progress)
    model = copy.deepcopy(base)
    report = apply_plan(model, plan, calibration, batch_size=batch_size)
    log.info("evaluating %s: %d layers quantized", plan_label(plan), len(report.replaced))
    result = evaluate(model, windows, reference=base, batch_size=batch_size, progress=progress,
                      on_progress=increments(on_windows))
    assert report.cost is not None and result.kl is not None
    return PlanEval(
        plan=plan_label(plan),
        perplexity=result.perplexity,
        nll=result.nll,
        kl=result.kl,
        tokens=result.tokens,
        avg_bits=report.cost.avg_bits,
        bytes=report.cost.bytes,
        base_perplexity=base_result.perplexity,
    )

