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
from quantplan.workers.evaluate import EvalResult, evaluate, merge_results
from quantplan.workers.plan_eval import PlanEval, plan_label

log = logging.getLogger(__name__)


def evaluate_artifact(
    base: nn.Module,
    artifact: str | os.PathLike[str],
    windows: torch.Tensor,
    *,
    base_result: EvalResult | None = None,
    kl_windows: int | None = None,
    batch_size: int = 8,
    backend: str | None = None,
    progress: bool | Progress = False,
    workers: int | None = None,
    address: str | None = None,
) -> PlanEval:
    """Perplexity and KL(base || quantized) of the real quantized model: a copy of `base` with the artifact loaded.

    In this process by default; with `workers`, on that many Ray workers, the windows sharded between them, the
    unquantized model's result coming from the same pass (`workers.tasks.evaluate_models`: `base_result` is then
    not needed). With a known `base_result` (the unquantized model on all `windows`), `kl_windows` limits the KL
    to the last `kl_windows` windows: the unquantized model runs only there, the perplexity still covers every
    window (`PlanEval.kl_tokens` says how many tokens the KL covers)."""
    if kl_windows is not None and kl_windows < 1:
        raise ValueError(f"kl_windows must be at least 1, got {kl_windows}")
    model = copy.deepcopy(base)
    info = load_quantized(model, artifact, backend=backend)
    n = len(windows)
    plain = 0 if base_result is None or kl_windows is None else max(0, n - kl_windows)  # windows without reference
    rest = None
    kl_step = "quantized model against the unquantized" if plain else "quantized model"
    if workers:
        from quantplan.workers.tasks import evaluate_models  # Ray only when asked for

        if plain:
            rest = evaluate_models(None, [model], windows[:plain], workers=workers, address=address,
                                   progress=progress)[1][0]
        measured, (result,) = evaluate_models(base, [model], windows[plain:], workers=workers, address=address,
                                              progress=progress, step=kl_step)
        base_result = base_result or measured
    else:
        if base_result is None:
            base_result = evaluate(base, windows, batch_size=batch_size, progress=progress, step="unquantized model")
        if plain:
            rest = evaluate(model, windows[:plain], batch_size=batch_size, progress=progress, step="quantized model")
        result = evaluate(model, windows[plain:], reference=base, batch_size=batch_size, progress=progress,
                          step=kl_step)
    assert result.kl is not None and base_result is not None
    whole = result if rest is None else merge_results([rest, result])
    return PlanEval(
        plan=plan_label(info.plan()),
        perplexity=whole.perplexity,
        nll=whole.nll,
        kl=result.kl,
        tokens=whole.tokens,
        avg_bits=float(info.metrics["avg_bits"]),
        bytes=int(info.metrics["bytes"]),
        base_perplexity=base_result.perplexity,
        kl_tokens=result.tokens,
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
    kl_windows: int | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    progress: bool | Progress = False,
    workers: int | None = None,
    address: str | None = None,
    stats: Any = None,
) -> tuple[ArtifactInfo, PlanEval | None]:
    """Materialize `plan` into `out_dir`; with `windows`, measure the staged artifact and record the metrics.

    The measurement loads the written files into a copy of `base` (the same path `quantplan apply` takes), so the
    recorded perplexity and KL are those of the artifact as a user will load it. `eval_info` (e.g. the data spec
    and seq_len) is recorded beside them. Returns the artifact and the measurement (None without `windows`).
    `workers`/`address`: measure on Ray workers; `base_result` and `kl_windows`: `evaluate_artifact`'s. `stats`:
    the calibration statistics of `calibration` when they are known (`apply_plan(stats=)`).
    """
    measured: list[PlanEval] = []
    with reporting(progress) as reporter:  # one display for the layers and the measurement

        def measure(staged: Path) -> dict[str, Any]:
            result = evaluate_artifact(base, staged, windows, base_result=base_result, kl_windows=kl_windows,
                                       batch_size=batch_size, progress=reporter, workers=workers, address=address)
            measured.append(result)
            keep = ("perplexity", "nll", "kl", "tokens", "base_perplexity", "kl_tokens")
            return {**{k: v for k, v in result.to_dict().items() if k in keep}, "eval": dict(eval_info or {})}

        info = materialize(base, plan, calibration, out_dir, model_info=model_info, overwrite=overwrite,
                           batch_size=batch_size, measure=measure if windows is not None else None,
                           progress=reporter, stats=stats)
    return info, measured[0] if measured else None
