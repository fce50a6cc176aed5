"""A model measured under a plan: `evaluate_plan` (fake-quant simulation) and its result, `PlanEval`.

Below both the Ray tasks (`workers.tasks`, one plan per task) and the pipeline (`workers.pipeline`), so neither
imports the other to reach it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from quantplan.quant.apply import CalibrationStats, apply_plan
from quantplan.quant.plan import Plan
from quantplan.workers.evaluate import EvalResult, evaluate, evaluate_many, increments, merge_results

__all__ = ["PlanEval", "evaluate_plan", "evaluate_plans_together", "merge_plan_evals", "plan_label"]

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
    kl_tokens: int | None = None  # the tokens the KL covers, where it was measured on fewer than `tokens`

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


def evaluate_plans_together(
    base: nn.Module,
    plans: Sequence[Plan],
    windows: torch.Tensor,
    calibration: torch.Tensor | None = None,
    *,
    stats: CalibrationStats | None = None,
    batch_size: int = 8,
    on_windows: Callable[[int], None] | None = None,
) -> tuple[EvalResult, list[PlanEval]]:
    """The unquantized model's result and each plan's `PlanEval` on `windows`, in one pass (`evaluate_many`:
    the base model runs once per window for every plan). Each plan holds a copy of `base`, so pass as many plans
    as fit in memory. `stats`: `collect_input_stats` of `base` on `calibration`, shared by the plans (collected
    per plan otherwise). `on_windows(k)` counts plan-windows (a window through every plan counts len(plans))."""
    models, costs = [], []
    for plan in plans:
        model = copy.deepcopy(base)
        report = apply_plan(model, plan, calibration, batch_size=batch_size, stats=stats)
        assert report.cost is not None
        models.append(model)
        costs.append(report.cost)
    count = None if on_windows is None else (lambda k: on_windows(k * len(plans)))
    base_result, results = evaluate_many(base, models, windows, batch_size=batch_size, on_progress=increments(count))
    assert base_result is not None
    evals = []
    for plan, cost, result in zip(plans, costs, results, strict=True):
        assert result.kl is not None
        evals.append(PlanEval(plan=plan_label(plan), perplexity=result.perplexity, nll=result.nll, kl=result.kl,
                              tokens=result.tokens, avg_bits=cost.avg_bits, bytes=cost.bytes,
                              base_perplexity=base_result.perplexity))
    return base_result, evals


def merge_plan_evals(parts: Sequence[PlanEval], base: EvalResult) -> PlanEval:
    """One plan's evaluation from its evaluations on disjoint windows (token-weighted); `base`: the unquantized
    model's merged result on all of them."""
    merged = merge_results([EvalResult(p.perplexity, p.nll, p.tokens, p.kl) for p in parts])
    assert merged.kl is not None
    first = parts[0]
    return PlanEval(plan=first.plan, perplexity=merged.perplexity, nll=merged.nll, kl=merged.kl, tokens=merged.tokens,
                    avg_bits=first.avg_bits, bytes=first.bytes, base_perplexity=base.perplexity)
