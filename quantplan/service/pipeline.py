"""The one pipeline of a search: load -> sensitivity -> search (-> store -> materialize), for every surface.

`quantplan search` runs `run_search(JobSpec, RunOptions)`; the job runner (`service.runner`) calls the same
stages one at a time, with storage between them (store, and the artifact store for tables and artifacts). Each
stage takes and returns frozen, typed objects: `JobSpec` -> `LoadSpec` -> `workers.pipeline.Loaded` ->
(`TableInfo`) -> `SearchInputs` -> `SearchReport`. The torch-side stages (load, sensitivity, materialize,
measurement) live in `quantplan.workers.pipeline`; this module lives in service because it also calls the search,
and workers does not import search. Heavy modules (torch, optuna, Ray) are imported inside the stages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantplan.progress import Progress, Step, reporting
from quantplan.search.space import SearchError
from quantplan.service.jobs import SELECT, JobSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from quantplan.quant.costs import TableInfo
    from quantplan.search.budget import Budget
    from quantplan.search.problem import Candidate, Problem
    from quantplan.search.refine import Refinement
    from quantplan.search.space import SearchSpace
    from quantplan.search.study import SearchResult, StudySettings
    from quantplan.workers.evaluate import EvalResult
    from quantplan.workers.pipeline import Loaded, LoadSpec, Measurer

log = logging.getLogger("quantplan.service.pipeline")

Measured = Mapping[str, Mapping[str, Any]]  # candidate label -> PlanEval.to_dict()


@dataclass(frozen=True)
class RunOptions:
    """Where and how a pipeline runs; what it computes is the `JobSpec`."""

    address: str | None = None  # Ray cluster address (None: local)
    progress: bool | Progress = False  # True: progress bars on stderr; a Progress: its listeners
    study: str | None = None  # the Optuna study's name (default: derived from table, budget and space)
    storage: str | None = None  # the study's database URL (default: the project database)
    table: Path | None = None  # a sensitivity table file to use instead of the cached or computed one


@dataclass(frozen=True, eq=False)
class SearchInputs:
    """What the search stage reads: the model, its sensitivity table, calibration tokens and held-out windows."""

    net: nn.Module
    table: TableInfo
    calib_tokens: torch.Tensor | None
    windows: torch.Tensor | None  # the evaluation windows; None: predictions only
    shapes: Mapping[str, tuple[int, int]]
    select_windows: torch.Tensor | None = None  # the selection slice for select="perplexity", apart from windows

    @classmethod
    def from_loaded(cls, loaded: Loaded, table: TableInfo) -> SearchInputs:
        return cls(loaded.net, table, loaded.calib_tokens, loaded.windows, loaded.shapes, loaded.select_windows)


@dataclass(frozen=True, eq=False)
class SearchReport:
    """The search stage's output: the result, measured evaluations by candidate label, the best plan."""

    problem: Problem
    result: SearchResult
    measured: Measured = field(default_factory=dict)  # label -> PlanEval.to_dict() on the evaluation windows
    best: Candidate | None = None
    variants: tuple[Candidate, ...] = ()  # sub-space optima (search.variants), when measured
    selection: Measured = field(default_factory=dict)  # label -> PlanEval.to_dict() on the selection slice
    select: str = "kl"
    refinement: Refinement | None = None  # the measured descent (search.refine), when refine > 0
    base: EvalResult | None = field(default=None, repr=False)  # the unquantized model on the evaluation windows
    stats: Any = field(default=None, repr=False)  # the calibration statistics the measurements collected, if any

    def candidates(self) -> list[Candidate]:
        """References, variants, refinement steps and the Pareto set, each label once."""
        seen: set[str] = set()
        out = []
        refined = [c for c, _ in self.refinement.steps[1:]] if self.refinement else []  # the start is a row
        for c in [*self.result.references, *self.variants, *refined, *self.result.pareto]:
            if c.label not in seen:
                seen.add(c.label)
                out.append(c)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """Every candidate (see `candidates`) with its measured numbers where evaluated."""
        rows = []
        for c in self.candidates():
            on_front = any(p.label == c.label for p in self.result.pareto)
            rows.append({**c.summary(), "pareto": on_front, **measured_fields(self.measured.get(c.label)),
                         **selected_fields(self.selection.get(c.label))})
        return rows

    def refine_summary(self) -> dict[str, Any] | None:
        r = self.refinement
        if r is None:
            return None
        return {"start": r.steps[0][0].label, "start_select_perplexity": r.steps[0][1], "min_gain": r.min_gain,
                "evaluations": r.evaluations, "moves": r.moves, "local_optimum": r.local_optimum,
                "select_perplexity": r.steps[-1][1]}


def measured_fields(result: Mapping[str, Any] | None) -> dict[str, Any]:
    keys = ("perplexity", "kl", "base_perplexity", "tokens")
    return {k: result[k] for k in keys} if result else {}


def selected_fields(result: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"select_perplexity": result["perplexity"], "select_kl": result["kl"]} if result else {}


# ---------------------------------------------------------------------------------------------- stages


def load_spec(spec: JobSpec, *, windows: bool = True) -> LoadSpec:
    """What the load stage builds for a job: calibration windows, and the evaluation windows (and the selection
    slice for select="perplexity") when `windows`."""
    from quantplan.workers.pipeline import LoadSpec

    return LoadSpec(model=spec.model, data=spec.data, dtype=spec.dtype, seq_len=spec.seq_len,
                    calib_samples=spec.samples, seed=spec.seed, windows=windows, eval_data=spec.eval_data,
                    eval_samples=spec.eval_samples, select=windows and spec.select == "perplexity",
                    select_data=spec.select_data, select_samples=spec.select_samples or spec.eval_samples)


def study_settings(spec: JobSpec, run: RunOptions) -> StudySettings:
    from quantplan.search.study import StudySettings

    return StudySettings(trials=spec.trials, space=spec.space, seed=spec.seed, name=run.study, storage=run.storage)


def search_stage(inputs: SearchInputs, spec: JobSpec, run: RunOptions, *,
                 on_trial: Callable[[int, int], None] | None = None) -> SearchReport:
    """The search stage of a job: `search_plans` with the spec's budget, space, study and measurement options."""
    return search_plans(inputs, spec.budget(), spec.search_space(), study_settings(spec, run), eval_top=spec.eval_top,
                        eval_baselines=spec.eval_baselines, workers=spec.workers, address=run.address,
                        progress=run.progress, select=spec.select, refine=spec.refine, refine_tol=spec.refine_tol,
                        on_trial=on_trial)


def run_search(spec: JobSpec, run: RunOptions) -> tuple[Loaded, SearchReport]:
    """load -> sensitivity -> search, as `quantplan search` runs it (nothing stored but the Optuna study)."""
    from quantplan.workers.pipeline import load, table_for

    loaded = load(load_spec(spec, windows=spec.eval_top > 0))
    with reporting(run.progress) as progress:  # one display for every stage
        table = table_for(loaded, run.table, workers=spec.workers, address=run.address,
                          progress=progress.at("sensitivity"))
        return loaded, search_stage(SearchInputs.from_loaded(loaded, table), spec,
                                    replace(run, progress=progress.at("search")))


def search_plans(
    inputs: SearchInputs,
    budget: Budget,
    space: SearchSpace,
    settings: StudySettings,
    *,
    eval_top: int = 3,
    eval_baselines: bool = True,
    workers: int = 1,
    address: str | None = None,
    progress: bool | Progress = False,
    select: str = "kl",
    refine: int = 0,
    refine_tol: float = 0.001,
    on_trial: Callable[[int, int], None] | None = None,
) -> SearchReport:
    """Compile the problem, run the study, measure the top candidates; the best plan is the measured best
    within budget and space (`select`: least KL to the unquantized model on the evaluation windows, or least
    perplexity on `inputs.select_windows`, else on the evaluation windows, among more candidates), else the
    predicted best; `refine` > 0 (select="perplexity") then descends from it, at most `refine` measurements,
    each step a relative gain above `refine_tol`. `progress` reports the trials and the measurements."""
    from quantplan.search.problem import compile_problem

    check_select(select, refine)
    problem = compile_problem(inputs.table, space, budget, dict(inputs.shapes))
    with reporting(progress) as reporter:
        return _search(inputs, problem, settings, reporter, on_trial, eval_top=eval_top,
                       eval_baselines=eval_baselines, workers=workers, address=address, select=select,
                       refine=refine, refine_tol=refine_tol)


def _search(inputs: SearchInputs, problem: Problem, settings: StudySettings, progress: Progress,
            on_trial: Callable[[int, int], None] | None, *, eval_top: int, eval_baselines: bool, workers: int,
            address: str | None, select: str, refine: int, refine_tol: float) -> SearchReport:
    from quantplan.search.study import run_search as run_study
    from quantplan.search.variants import variants
    from quantplan.workers.pipeline import Measurer

    trials: list[Step] = []

    def each_trial(done: int, total: int) -> None:
        if not trials:
            trials.append(progress.step("trials", total, "trials"))
        trials[0].update(done)
        if on_trial is not None:  # e.g. the job runner: a cancel between trials
            on_trial(done, total)

    result = run_study(problem, settings, on_trial=each_trial)
    log.info("study %s in %s: %d trials (%d new, %.0f/min); knapsack %s in %.2f s", result.study, result.storage,
             result.trials, result.new_trials, result.trials_per_minute,
             "exact" if result.knapsack.exact else "within its dual bound", result.knapsack.seconds)
    report = SearchReport(problem, result, best=result.best(), select=select)
    if eval_top <= 0 or inputs.windows is None:
        if refine:
            log.warning("--refine %d needs measured plans (--eval-top > 0 and evaluation windows): not refined",
                        refine)
        return report
    measurer = Measurer(inputs.net, inputs.calib_tokens, workers=workers, address=address, progress=progress)
    found = tuple(variants(problem)) if select == "perplexity" else ()
    report = _measure(SearchReport(problem, result, best=report.best, variants=found, select=select), inputs,
                      measurer, _to_measure(result, found, eval_top, eval_baselines))
    if refine and report.selection:
        report = _refine(report, inputs, measurer, refine, refine_tol, workers)
    return replace(report, base=measurer.known_base(inputs.windows), stats=measurer.stats)


def check_select(select: str, refine: int = 0) -> None:
    if select not in SELECT:
        raise SearchError(f"unknown --select {select!r}: use one of {', '.join(SELECT)}")
    if refine < 0:
        raise SearchError(f"--refine must be >= 0, got {refine}")
    if refine and select != "perplexity":
        raise SearchError("--refine measures candidates on the selection slice: add --select perplexity (with "
                          "--select kl it would choose on the reported windows)")


def _to_measure(result: SearchResult, found: Sequence[Candidate], top: int, baselines: bool) -> list[Candidate]:
    """The `top` best distinct plans within budget and space by prediction, the variants, the baselines."""
    fits = [c for c in result.references + result.pareto if c.under_budget and c.in_space]
    chosen: dict[tuple[Any, ...], Candidate] = {}
    for c in sorted(fits, key=lambda c: c.predicted_loss):
        if len(chosen) < top:
            chosen.setdefault(c.schemes, c)
    for c in found:
        if c.under_budget and c.in_space:
            chosen.setdefault(c.schemes, c)
    refs = [c for c in result.references if c.recipe != "knapsack"] if baselines else []
    return list(chosen.values()) + [c for c in refs if c.schemes not in chosen]


def _measure(report: SearchReport, inputs: SearchInputs, measurer: Measurer,
             candidates: list[Candidate]) -> SearchReport:
    """The candidates measured on the evaluation windows; the best chosen by KL there, or by perplexity on the
    selection slice (tokens the reported numbers do not include)."""
    assert inputs.windows is not None
    problem = report.problem
    results = measurer.measure([problem.plan(c) for c in candidates], inputs.windows)
    measured = {c.label: r.to_dict() for c, r in zip(candidates, results, strict=True)}
    fits = [c for c in candidates if c.under_budget and c.in_space]
    if not fits:
        return replace(report, measured=measured)
    if report.select == "perplexity":
        held_out = inputs.select_windows if inputs.select_windows is not None else inputs.windows
        chosen = measurer.measure([problem.plan(c) for c in fits], held_out)
        selection = {c.label: r.to_dict() for c, r in zip(fits, chosen, strict=True)}
        best = min(fits, key=lambda c: (selection[c.label]["perplexity"], selection[c.label]["kl"]))
        return replace(report, measured=measured, selection=selection, best=best)
    # KL: the measured loss increase with far less sampling noise than a perplexity difference
    return replace(report, measured=measured, best=min(fits, key=lambda c: (measured[c.label]["kl"],
                                                                             measured[c.label]["perplexity"])))


def _refine(report: SearchReport, inputs: SearchInputs, measurer: Measurer, max_evals: int, tol: float,
            workers: int) -> SearchReport:
    """Coordinate descent from the selected plan, measured on the selection slice; the plan it ends on is
    measured on the evaluation windows too and becomes the best."""
    from quantplan.search.refine import refine

    assert inputs.windows is not None and report.best is not None
    held_out = inputs.select_windows if inputs.select_windows is not None else inputs.windows
    selection = dict(report.selection)

    def measure(candidates: Sequence[Candidate]) -> list[float]:
        results = measurer.measure([report.problem.plan(c) for c in candidates], held_out)
        selection.update({c.label: r.to_dict() for c, r in zip(candidates, results, strict=True)})
        return [r.perplexity for r in results]

    start = report.best
    descent = refine(report.problem, start, selection[start.label]["perplexity"], measure,
                     max_evals=max_evals, batch=max(4, 2 * workers), min_gain=tol)
    log.info("refinement: %d measured, %d moves accepted (%s), selection ppl %.3f -> %.3f", descent.evaluations,
             len(descent.moves), "; ".join(descent.moves), descent.steps[0][1], descent.steps[-1][1])
    measured = dict(report.measured)
    steps = [c for c, _ in descent.steps[1:]]
    if steps:  # the reported numbers of every accepted step, on the evaluation windows
        results = measurer.measure([report.problem.plan(c) for c in steps], inputs.windows)
        measured.update({c.label: r.to_dict() for c, r in zip(steps, results, strict=True)})
    return replace(report, measured=measured, selection=selection, refinement=descent, best=descent.best)


def to_materialize(report: SearchReport, top: int) -> list[Candidate]:
    """The search's best plan first, then the next measured plans within budget and space by measured KL."""
    if top <= 0 or report.best is None:
        return []
    fits = [c for c in report.candidates()
            if c.under_budget and c.in_space and c.label in report.measured and c.label != report.best.label]
    fits.sort(key=lambda c: report.measured[c.label]["kl"])
    chosen: dict[tuple[Any, ...], Candidate] = {report.best.schemes: report.best}
    for c in fits:
        if len(chosen) >= top:
            break
        chosen.setdefault(c.schemes, c)
    return list(chosen.values())
