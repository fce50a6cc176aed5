"""The torch side of the pipeline: load a model with its data, get its sensitivity table, measure plans.

Stages hand frozen, typed objects forward: `load(LoadSpec) -> Loaded` (model, tokenizer, data specs,
calibration set, evaluation and selection windows: the prologue every command and the job runner share);
`loaded_table(Loaded) -> (SensitivityTable, cached)` (the cached or computed Fisher table; `table_for` also
takes a given file, checked against the model); `materialize(Loaded, Plan, out) -> (ArtifactInfo, PlanEval)`
(packed, then measured for real); `Measurer` measures plans on Ray, the unquantized model once per window set.
The orchestration that also runs the search is `quantplan.service.pipeline` (workers does not import search).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import platformdirs
import torch
from torch import nn

from quantplan.progress import Progress
from quantplan.quant.apply import CalibrationStats, layer_shapes, needs_calibration, validate_plan
from quantplan.quant.artifact import ArtifactInfo
from quantplan.quant.costs import TableError, TableInfo, read_table_info
from quantplan.quant.plan import Plan, atomic_write_text
from quantplan.quant.schemes import act_schemes, builtin_act_scheme
from quantplan.workers.artifacts import materialize_plan
from quantplan.workers.data import CalibrationSet, DataSpec, calibration_set, eval_windows, load_text
from quantplan.workers.evaluate import EvalResult
from quantplan.workers.models import load_model, model_fingerprint, model_identity
from quantplan.workers.plan_eval import PlanEval, evaluate_plan, plan_label
from quantplan.workers.sensitivity import CLIP_GRID, ESTIMATOR_VERSION, WEIGHT_SCHEMES, act_set_start
from quantplan.workers.table import SensitivityTable, table_key

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "LoadSpec", "Loaded", "Measurer", "PlanEval", "cached_table_path", "evaluate_plan", "load", "loaded_table",
    "materialize",
    "plan_label",
    "selection_windows", "sensitivity_cache_dir", "sensitivity_table", "table_for", "table_identity",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- load


@dataclass(frozen=True)
class LoadSpec:
    """What to load: the model, its data specs, and which token sets to build from them."""

    model: str  # a Hugging Face id or a local directory
    data: str  # calibration (train split) and, without eval_data, evaluation (test split) data
    dtype: str = "float32"
    device: str = "cpu"
    seq_len: int | None = None  # window length; default min(max_seq_len, the model's max positions)
    max_seq_len: int = 512
    calib_data: str | None = None  # default: data
    calib_samples: int = 0  # calibration windows; 0: no calibration set
    calib_seq_len: int | None = None  # default: seq_len, at most calib_max_seq_len
    calib_max_seq_len: int | None = None
    seed: int = 0  # calibration sampling
    windows: bool = False  # build the evaluation windows (test split of eval_data)
    eval_data: str | None = None  # default: data
    eval_samples: int | None = None  # at most this many evaluation windows
    select: bool = False  # build the selection slice (validation split of select_data)
    select_data: str | None = None  # default: data
    select_samples: int | None = None  # the last N windows of the slice (default: all)


@dataclass(frozen=True, eq=False)
class Loaded:
    """A loaded model with its parsed data specs and the token sets its `LoadSpec` asked for."""

    spec: LoadSpec
    net: nn.Module
    tokenizer: PreTrainedTokenizerBase
    data: DataSpec
    eval_data: DataSpec
    seq_len: int
    calibration: CalibrationSet | None = None
    windows: torch.Tensor | None = field(default=None, repr=False)  # [n, seq_len] evaluation windows
    select_windows: torch.Tensor | None = field(default=None, repr=False)  # the selection slice

    @cached_property
    def fingerprint(self) -> str:
        """The model's weight fingerprint (hashed once: it reads every weight)."""
        return model_fingerprint(self.net)

    @cached_property
    def identity(self) -> dict[str, Any]:
        """`workers.models.model_identity` of the model (name, revision, architecture, parameters, ...)."""
        return model_identity(self.spec.model, self.net)

    @cached_property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return layer_shapes(self.net)

    @property
    def calib_tokens(self) -> torch.Tensor | None:
        return None if self.calibration is None else self.calibration.tokens

    def eval_info(self) -> dict[str, Any]:
        """What the evaluation windows are, as an artifact's manifest records it."""
        assert self.windows is not None, "load with LoadSpec(windows=True)"
        return {"data": str(self.eval_data), "split": "test", "seq_len": self.seq_len,
                "windows": int(self.windows.shape[0])}


def load(spec: LoadSpec, *, plan: Plan | None = None, check: Callable[[nn.Module], object] | None = None) -> Loaded:
    """Parse the data specs, load the model, then build the token sets `spec` asks for. `check(net)` runs right
    after the model loads, before any data work (default with a `plan`: `validate_plan`); with a `plan`, the
    calibration set is built only when the plan needs one."""
    data = DataSpec.parse(spec.data)  # bad specs fail before the model loads
    eval_data = DataSpec.parse(spec.eval_data) if spec.eval_data else data
    calib_data = DataSpec.parse(spec.calib_data) if spec.calib_data and spec.calib_samples else data
    select_data = DataSpec.parse(spec.select_data) if spec.select_data and spec.select else data
    net, tokenizer = load_model(spec.model, dtype=spec.dtype, device=spec.device)
    if check is not None:
        check(net)
    elif plan is not None:
        validate_plan(net, plan)
    seq_len = spec.seq_len or min(spec.max_seq_len, int(getattr(net.config, "max_position_embeddings",
                                                                spec.max_seq_len)))
    calibration = None
    if spec.calib_samples and (plan is None or needs_calibration(net, plan)):
        calib_len = spec.calib_seq_len or min(seq_len, spec.calib_max_seq_len or seq_len)
        calibration = calibration_set(calib_data, tokenizer, samples=spec.calib_samples, seq_len=calib_len,
                                      seed=spec.seed)
    windows = select = None
    if spec.windows:
        windows = eval_windows(eval_data, tokenizer, seq_len=seq_len, max_windows=spec.eval_samples, split="test")
    if spec.select:
        select = selection_windows(select_data, eval_data, tokenizer, seq_len, spec.select_samples)
    return Loaded(spec, net, tokenizer, data, eval_data, seq_len, calibration, windows, select)


def selection_windows(spec: DataSpec, eval_spec: DataSpec, tokenizer: Any, seq_len: int,
                      count: int | None) -> torch.Tensor:
    """The last `count` windows of the selection text's validation split; a warning when that text is the
    evaluation text itself (the reported numbers would then not be held out from the choice)."""
    windows = eval_windows(spec, tokenizer, seq_len=seq_len, split="validation")
    if load_text(spec, "validation") == load_text(eval_spec, "test"):
        log.warning("the selection slice (%s) is the evaluation text: the reported perplexity is not held out "
                    "from the choice; pass --select-data or --eval-data", spec)
    return windows if count is None else windows[-count:]


# ---------------------------------------------------------------------------------------------- sensitivity


def cache_dir(kind: str) -> Path:
    """Where computed results of `kind` are kept for reuse: $QUANTPLAN_CACHE_DIR/KIND or the user cache dir's."""
    root = os.environ.get("QUANTPLAN_CACHE_DIR") or platformdirs.user_cache_dir("quantplan")
    return Path(root) / kind


def sensitivity_cache_dir() -> Path:
    """Where computed tables are kept for reuse: $QUANTPLAN_CACHE_DIR/sensitivity or the user cache dir."""
    return cache_dir("sensitivity")


def table_identity(model: nn.Module, calibration: CalibrationSet, *, micro_batch: int = 1,
                   act_samples: int | None = None, fingerprint: str | None = None) -> tuple[str, str, dict]:
    """(key, model fingerprint, estimator settings) of the table for this model and calibration set; pass the
    model's `fingerprint` when it is known (hashing every weight again costs time on a large model)."""
    fingerprint = fingerprint or model_fingerprint(model)
    tokens = calibration.tokens
    estimator = {"version": ESTIMATOR_VERSION, "micro_batch": micro_batch, "schemes": [str(s) for s in WEIGHT_SCHEMES],
                 "clip_grid": CLIP_GRID,
                 "act_samples": tokens.shape[0] - act_set_start(tokens, micro_batch, act_samples)}
    if any(not builtin_act_scheme(a) for a in act_schemes()):  # a registered strategy adds its own cost column
        estimator["acts"] = [str(a) for a in act_schemes()]
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
    max_memory: int | None = None,
    address: str | None = None,
    cache: bool = True,
    progress: bool | Progress = False,
    fingerprint: str | None = None,
) -> tuple[SensitivityTable, bool]:
    """The table for (model weights, calibration spec, estimator): from the cache when present, else computed
    on Ray and cached. Returns (table, cached). `max_memory` (bytes per worker) sizes the pass's batches: speed
    and memory only, so it is not part of the key."""
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
        max_memory=max_memory, progress=progress,
        key=key, model_info={"name": model_name, "fingerprint": fingerprint}, calibration=calibration.spec_dict(),
        estimator=estimator,
    )
    if cache:
        table.save(path)
    return table, False


def loaded_table(loaded: Loaded, *, workers: int = 1, address: str | None = None, progress: bool | Progress = False,
                 micro_batch: int = 1, act_samples: int | None = None, max_memory: int | None = None,
                 cache: bool = True) -> tuple[SensitivityTable, bool]:
    """The sensitivity stage: the cached or freshly computed table of the loaded model and calibration set.
    Returns (table, cached)."""
    assert loaded.calibration is not None, "load with LoadSpec(calib_samples=N)"
    table, cached = sensitivity_table(loaded.net, loaded.calibration, model_name=loaded.spec.model, workers=workers,
                                      micro_batch=micro_batch, act_samples=act_samples, max_memory=max_memory,
                                      address=address, cache=cache, progress=progress,
                                      fingerprint=loaded.fingerprint)
    log.info("sensitivity table %s (%s)", table.key, "cached" if cached else "computed")
    return table, cached


def table_for(loaded: Loaded, path: Path | None = None, *, workers: int = 1, address: str | None = None,
              progress: bool | Progress = False) -> TableInfo:
    """The table at `path` (checked against the loaded model), else `loaded_table`'s."""
    if path is None:
        return loaded_table(loaded, workers=workers, address=address, progress=progress)[0]
    info = read_table_info(path)
    found = info.model.get("fingerprint")
    if found != loaded.fingerprint:
        raise TableError(
            f"{path} was computed for another model (fingerprint {str(found)[:12]}, this model "
            f"{loaded.fingerprint[:12]}); leave out --table to compute the table for this model"
        )
    return info


# ---------------------------------------------------------------------------------------------- materialize


REFERENCE_VERSION = 1  # bump when the evaluation's definition changes (evaluate.py's module docstring)


def reference_key(fingerprint: str, windows: torch.Tensor) -> str:
    """The cache key of the unquantized model's result on `windows`: the weights' fingerprint and the tokens."""
    h = hashlib.sha256(f"{REFERENCE_VERSION}:{fingerprint}:{tuple(windows.shape)}:".encode())
    h.update(windows.long().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def reference_result(loaded: Loaded, *, workers: int = 1, address: str | None = None,
                     progress: bool | Progress = False, cache: bool = True) -> tuple[EvalResult, bool]:
    """The unquantized model's perplexity on the loaded evaluation windows: a property of the model and the
    tokens, measured once (on `workers` Ray workers) and kept in the user cache (`cache_dir("reference")`,
    keyed by the weights' fingerprint and the windows' tokens). Returns (result, cached)."""
    from quantplan.workers.tasks import evaluate_models  # Ray only when it must be measured

    assert loaded.windows is not None, "load with LoadSpec(windows=True)"
    path = cache_dir("reference") / f"{reference_key(loaded.fingerprint, loaded.windows)}.json"
    if cache and path.is_file():
        try:
            result = EvalResult(**json.loads(path.read_text()))
            log.info("reusing the unquantized model's result %s", path)
            return result, True
        except (OSError, ValueError, TypeError) as e:  # unreadable: measure again, overwrite
            log.warning("ignoring the cached result %s (%s)", path, e)
    _, (result,) = evaluate_models(None, [loaded.net], loaded.windows, workers=workers, address=address,
                                   progress=progress, step="unquantized model")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result.to_dict()))
    return result, False



def materialize(loaded: Loaded, plan: Plan, out: Path, *, base_result: EvalResult | None = None,
                kl_windows: int | None = None, overwrite: bool = False, batch_size: int = 8,
                progress: bool | Progress = False, workers: int | None = None, address: str | None = None,
                stats: CalibrationStats | None = None) -> tuple[ArtifactInfo, PlanEval]:
    """The materialize stage: calibrate, pack `plan` into the artifact directory `out` and measure the real
    quantized model on the loaded evaluation windows (`base_result`: the unquantized model's, when known; with
    it, `kl_windows` limits the KL to the last that many windows: `evaluate_artifact`), in this process or on
    `workers` Ray workers. `stats`: the calibration statistics of the loaded calibration tokens, when an earlier
    stage collected them (`Measurer.stats`)."""
    assert loaded.windows is not None, "load with LoadSpec(windows=True)"
    info, real = materialize_plan(loaded.net, plan, loaded.calib_tokens, out, windows=loaded.windows,
                                  eval_info=loaded.eval_info(), model_info=loaded.identity, base_result=base_result,
                                  kl_windows=kl_windows, overwrite=overwrite, batch_size=batch_size,
                                  progress=progress, workers=workers, address=address, stats=stats)
    assert real is not None
    return info, real


# ---------------------------------------------------------------------------------------------- measure


class Measurer:
    """Measures plans on Ray workers (`workers.tasks.measure_plans`): the calibration statistics collected once
    for every plan, the unquantized model once per window set (in the same pass as the plans)."""

    def __init__(self, net: nn.Module, calib_tokens: torch.Tensor | None, *, workers: int = 1,
                 address: str | None = None, progress: bool | Progress = False) -> None:
        self.net, self.calib_tokens = net, calib_tokens
        self.workers, self.address, self.progress = workers, address, progress
        self._bases: dict[int, tuple[torch.Tensor, EvalResult]] = {}  # id(windows) -> (windows, result)
        self._stats: CalibrationStats | None = None

    def base(self, windows: torch.Tensor) -> EvalResult:
        """The unquantized model on `windows` (measured on the first call for these windows)."""
        from quantplan.workers.tasks import evaluate_base

        if id(windows) not in self._bases:  # the tensor is kept with its result, so its id stays its own
            result = evaluate_base(self.net, windows, workers=self.workers, address=self.address,
                                   progress=self.progress)
            self._bases[id(windows)] = (windows, result)
        return self._bases[id(windows)][1]

    @property
    def stats(self) -> CalibrationStats | None:
        """The calibration statistics collected for the plans measured so far (None until a plan needed them)."""
        return self._stats

    def known_base(self, windows: torch.Tensor) -> EvalResult | None:
        """The unquantized model's result on `windows` if it was measured, else None."""
        hit = self._bases.get(id(windows))
        return None if hit is None else hit[1]

    def measure(self, plans: Sequence[Plan], windows: torch.Tensor) -> list[PlanEval]:
        """Each plan's `PlanEval` on `windows`, in the order of `plans`."""
        from quantplan.workers.tasks import calibration_stats, measure_plans

        if not plans:
            return []
        if self._stats is None and self.calib_tokens is not None and any(needs_calibration(self.net, p)
                                                                         for p in plans):
            self._stats = calibration_stats(self.net, self.calib_tokens, workers=self.workers, address=self.address,
                                            progress=self.progress)
        base, evals = measure_plans(self.net, plans, windows, self.calib_tokens, workers=self.workers,
                                    address=self.address, progress=self.progress, stats=self._stats)
        base = self._bases.setdefault(id(windows), (windows, base))[1]  # the first measurement's, every time
        return [replace(e, base_perplexity=base.perplexity) for e in evals]
