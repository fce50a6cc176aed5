"""Materialize a plan with measured metrics, and evaluate a materialized artifact against its base model.

`quant.artifact` writes and loads artifacts; this module adds the measurements (perplexity, KL to the base model)
that the manifest records, and the evaluation behind `quantplan eval --artifact`.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantplan.progress import Progress, reporting
from quantplan.quant.artifact import ArtifactInfo, load_quantized, materialize
from quantplan.quant.plan import Plan
from quantplan.workers.evaluate import EvalResult, evaluate
from quantplan.workers.plan_eval import PlanEval, plan_label

log = logging.getLogger(__name__)


def evaluate_artifact(
    base: nn.Module,
    artifact: str | os.PathLike[str],
    windows: torch.Tensor,
    *,
    base_result: EvalResult | None = None,
    batch_size: int = 8,
    backend: str | None = None,
    progress: bool | Progress = False,
    workers: int | None = None,
    address: str | None = None,
) -> PlanEval:
    """Perplexity and KL(base || quantized) of the real quantized model: a copy of `base` with the artifact loaded.

    In this process by default; with `workers`, on that many Ray workers, the windows sharded between them, the
    unquantized model's result coming from the same pass (`workers.tasks.evaluate_models`: `base_result` is then
    not needed)."""
    model = copy.deepcopy(base)
    info = load_quantized(model, artifact, backend=backend)
    if workers:
        from quantplan.workers.tasks import evaluate_models  # Ray only when asked for

        measured, (result,) = evaluate_models(base, [model], windows, workers=workers, address=address,
                                              progress=progress)
        base_result = base_result or measured
    else:
        if base_result is None:
            base_result = evaluate(base, windows, batch_size=batch_size, progress=progress, step="unquantized model")
        result = evaluate(model, windows, reference=base, batch_size=batch_size, progress=progress,
                          step="quantized model")
    assert result.kl is not None
    return PlanEval(
        plan=plan_label(info.plan()),
        perplexity=result.perplexity,
        nll=result.nll,
        kl=result.kl,
        tokens=result.tokens,
        avg_bits=float(info.metrics["avg_bits"]),
        bytes=int(info.metrics["bytes"]),
        base_perplexity=base_result.perplexity,
    )


def materialize_plan(
    base: nn.Module,
    plan: Plan,
    calibration: Any,
    out_dir: str | os.PathLike[str],
    *,
    windows: torch.Tensor | None = None,
    eval_info: Mapping[str, Any] | None = None,
    model_info: Mapping[str, Any] | None = None,
    base_result: EvalResult | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    progress: bool | Progress = False,
    workers: int | None = None,
    address: str | None = None,
) -> tuple[ArtifactInfo, PlanEval | None]:
    """Materialize `plan` into `out_dir`; with `windows`, measure the staged artifact and record the metrics.

    The measurement loads the written files into a copy of `base` (the same path `quantplan apply` takes), so the
    recorded perplexity and KL are those of the artifact as a user will load it. `eval_info` (e.g. the data spec
    and seq_len) is recorded beside them. Returns the artifact and the measurement (None without `windows`).
    `workers`/`address`: measure on Ray workers (`evaluate_artifact`).
    """
    measured: list[PlanEval] = []
    with reporting(progress) as reporter:  # one display for the layers and the measurement

        def measure(staged: Path) -> dict[str, Any]:
            result = evaluate_artifact(base, staged, windows, base_result=base_result, batch_size=batch_size,
                                       progress=reporter, workers=workers, address=address)
            measured.append(result)
            keep = ("perplexity", "nll", "kl", "tokens", "base_perplexity")
            return {**{k: v for k, v in result.to_dict().items() if k in keep}, "eval": dict(eval_info or {})}

        info = materialize(base, plan, calibration, out_dir, model_info=model_info, overwrite=overwrite,
                           batch_size=batch_size, measure=measure if windows is not None else None,
                           progress=reporter)
    return info, measured[0] if measured else None
