"""Pipelines over workers: evaluate a model under a plan; get or compute (and cache) a sensitivity table."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import platformdirs
import torch
from torch import nn

from quantplan.quant.apply import apply_plan
from quantplan.quant.plan import Plan
from quantplan.workers.data import CalibrationSet
from quantplan.workers.evaluate import EvalResult, evaluate
from quantplan.workers.models import model_fingerprint
from quantplan.workers.sensitivity import CLIP_GRID, ESTIMATOR_VERSION, WEIGHT_SCHEMES, act_set_start
from quantplan.workers.table import SensitivityTable, table_key

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
) -> PlanEval:
    """Perplexity and KL(base || quantized) of `base` under `plan`; `base` itself is left untouched."""
    if base_result is None:
        base_result = evaluate(base, windows, batch_size=batch_size, progress=progress)
    model = copy.deepcopy(base)
    report = apply_plan(model, plan, calibration, batch_size=batch_size)
    log.info("evaluating %s: %d layers quantized", plan_label(plan), len(report.replaced))
    result = evaluate(model, windows, reference=base, batch_size=batch_size, progress=progress)
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


def sensitivity_cache_dir() -> Path:
    """Where computed tables are kept for reuse: $QUANTPLAN_CACHE_DIR/sensitivity or the user cache dir."""
    root = os.environ.get("QUANTPLAN_CACHE_DIR") or platformdirs.user_cache_dir("quantplan")
    return Path(root) / "sensitivity"


def table_identity(model: nn.Module, calibration: CalibrationSet, *, micro_batch: int = 1,
                   act_samples: int | None = None, fingerprint: str | None = None) -> tuple[str, str, dict]:
    """(key, model fingerprint, estimator settings) of the table for this model and calibration set; pass the
    model's `fingerprint` when it is known (hashing every weight again costs time on a large model)."""
    fingerprint = fingerprint or model_fingerprint(model)
    tokens = calibration.tokens
    estimator = {"version": ESTIMATOR_VERSION, "micro_batch": micro_batch, "schemes": [str(s) for s in WEIGHT_SCHEMES],
                 "clip_grid": CLIP_GRID,
                 "act_samples": tokens.shape[0] - act_set_start(tokens, micro_batch, act_samples)}
    return table_key(fingerprint, calibration.spec_dict(), estimator), fingerprint, estimator


def cached_table_path(key: str) -> Path:
    """Where the table with `key` is cached (whether or not it is there)."""
    return sensitivity_cache_dir() / f"{key}.safetensors"


def sensitivity_table(
    model: nn.Module,
    calibration: CalibrationSet,
    *,
    model_name: str = "",
    workers: int = 1,
    micro_batch: int = 1,
    act_samples: int | None = None,
    address: str | None = None,
    cache: bool = True,
    progress: bool = False,
    fingerprint: str | None = None,
) -> tuple[SensitivityTable, bool]:
    """The table for (model weights, calibration spec, estimator): from the cache when present, else computed
    on Ray and cached. Returns (table, cached)."""
    from quantplan.workers.tasks import compute_sensitivity  # Ray is imported only when a table must be computed

    key, fingerprint, estimator = table_identity(model, calibration, micro_batch=micro_batch, act_samples=act_samples,
                                                 fingerprint=fingerprint)
    path = cached_table_path(key)
    if cache and path.is_file():
        log.info("reusing cached sensitivity table %s", path)
        return SensitivityTable.load(path), True
    log.info("computing sensitivity table %s on %d worker(s)", key, workers)
    table = compute_sensitivity(
        model, calibration.tokens, workers=workers, micro_batch=micro_batch, act_samples=act_samples, address=address,
        progress=progress,
        key=key, model_info={"name": model_name, "fingerprint": fingerprint}, calibration=calibration.spec_dict(),
        estimator=estimator,
    )
    if cache:
        table.save(path)
    return table, False
