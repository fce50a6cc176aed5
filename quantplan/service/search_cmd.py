"""`quantplan search`: a model, data and a memory budget in; the Pareto set and the best plan out.

Steps: the sensitivity table (computed on Ray and cached, or `--table`), the exact knapsack optimum, an Optuna
study in the project database (resumed when the same search runs again), then the best Pareto plans under the
budget and the fixed baselines re-scored by measured perplexity/KL on held-out tokens (Ray); with
`--select perplexity` also the knapsack optima of restricted sub-spaces, chosen by perplexity on a selection slice
kept apart from the reported tokens, and with `--refine N` a measured coordinate descent from the chosen plan
(search.refine) on that slice. Heavy modules
(torch, transformers, optuna, ray) are imported inside the command, so `quantplan --help` stays fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from quantplan.service.console import print_json, stderr, stdout
from quantplan.service.console import table as table_view

if TYPE_CHECKING:
    from quantplan.quant.costs import TableInfo
    from quantplan.search.budget import Budget
    from quantplan.search.problem import Candidate, Problem
    from quantplan.search.refine import Refinement
    from quantplan.search.space import SearchSpace
    from quantplan.search.study import SearchResult, StudySettings

log = logging.getLogger("quantplan.service.search")

COLUMNS = ("plan", "avg_bits", "bytes", "pred_loss", "ppl", "kl", "fits")
FORMATS = {"avg_bits": ".3f", "bytes": ",d", "pred_loss": ".3e", "ppl": ".3f", "kl": ".4f"}
SHOWN_PARETO = 12  # the table shows the references, the evaluated plans and this many more of the front
SELECT = ("kl", "perplexity")

_Opt = typer.Option


@dataclass
class SearchReport:
    """What the command prints: the search result, measured evaluations by candidate label, the best plan."""

    problem: Problem
    result: SearchResult
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> PlanEval.to_dict()
    best: Candidate | None = None
    variants: list[Candidate] = field(default_factory=list)  # sub-space optima (search.variants), when measured
    selection: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> PlanEval on the selection slice
    select: str = "kl"
    refinement: Refinement | None = None  # the measured descent (search.refine), when --refine N > 0

    def candidates(self) -> list[Candidate]:
        """References, variants, refinement steps and the Pareto set, each label once."""
        seen: set[str] = set()
        out = []
        for c in self.result.references + self.variants + self._refined() + self.result.pareto:
            if c.label not in seen:
                seen.add(c.label)
                out.append(c)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """Every candidate (see `candidates`) with its measured numbers where evaluated."""
        rows = []
        for c in self.candidates():
            on_front = any(p.label == c.label for p in self.result.pareto)
            rows.append({**c.summary(), "pareto": on_front, **_measured(self.measured.get(c.label)),
                         **_selected(self.selection.get(c.label))})
        return rows

    def _refined(self) -> list[Candidate]:
        """The descent's accepted steps after its start (the start is a row already)."""
        return [c for c, _ in self.refinement.steps[1:]] if self.refinement else []

    def refine_summary(self) -> dict[str, Any] | None:
        r = self.refinement
        if r is None:
            return None
        return {"start": r.steps[0][0].label, "start_select_perplexity": r.steps[0][1], "min_gain": r.min_gain,
                "evaluations": r.evaluations, "moves": r.moves, "local_optimum": r.local_optimum,
                "select_perplexity": r.steps[-1][1]}


def _measured(result: dict[str, Any] | None) -> dict[str, Any]:
    keys = ("perplexity", "kl", "base_perplexity", "tokens")
    return {k: result[k] for k in keys} if result else {}


def _selected(result: dict[str, Any] | None) -> dict[str, Any]:
    return {"select_perplexity": result["perplexity"], "select_kl": result["kl"]} if result else {}


def search_command(
    model: Annotated[str, _Opt("--model", "-m", help="Hugging Face id or local model directory.")],
    data: Annotated[str, _Opt("--data", "-d", help="Calibration (train split) and evaluation (test split) data: "
                                                   "wikitext2 | wikitext2:<dir> | text:<file>[,<file>...]")],
    out: Annotated[Path, _Opt("--out", "-o", help="Where to write the best plan within the budget (JSON).")],
    budget_bits: Annotated[float | None, _Opt("--budget-bits", help="Budget: average bits per weight over the "
                                              "quantizable layers, scales and zero-points included.")] = None,
    budget_mb: Annotated[float | None, _Opt("--budget-mb", help="Budget: bytes of the quantizable layers' weights, "
                                            "in MB (1 MB = 10^6 bytes).")] = None,
    act_bits: Annotated[int, _Opt("--act-bits", help="8: int8 activations (W4A8/W8A8 kernels); 16: weight-only "
                                  "search (W4A16/W8A16).")] = 8,
    trials: Annotated[int, _Opt("--trials", min=0, help="Completed trials the study should hold; rerunning the "
                                "same search resumes up to N.")] = 300,
    eval_top: Annotated[int, _Opt("--eval-top", min=0, help="Measure perplexity/KL of the K best Pareto plans "
                                  "within the budget (and the baselines) on Ray; 0: predictions only.")] = 3,
    db: Annotated[str | None, _Opt("--db", help="Study database, a SQLAlchemy URL (default: the project database: "
                                   "QUANTPLAN_DATABASE_URL, the config file, else SQLite in the user data "
                                   "dir).")] = None,
    study: Annotated[str | None, _Opt("--study", help="Study name (default: derived from the table, budget and "
                                      "space, so the same search resumes).")] = None,
    skip: Annotated[str | None, _Opt("--skip", help="Regex (re.search) of module names to keep unquantized; "
                                     "they still count in the budget.")] = None,
    max_dynamic_share: Annotated[float | None, _Opt("--max-dynamic-share", min=0.0, max=1.0, help="At most this "
                                                    "share of layers may use a8-dynamic (it costs run time).")] = None,
    trial_space: Annotated[str, _Opt("--space", help="structured (any size) | per-layer (small models: one "
                                     "categorical per layer).")] = "structured",
    symmetry: Annotated[str, _Opt("--symmetry", help="Searched 4-bit weights: sym | asym | both.")] = "both",
    low_bits: Annotated[bool, _Opt("--low-bits", help="Also search 2/3-bit weights (simulation only: no kernel "
                                   "serves them).")] = False,
    weights: Annotated[str | None, _Opt("--weights", help="Only these weight schemes, comma-separated, "
                                        "e.g. w4g128,w4g64,w8.")] = None,
    table: Annotated[Path | None, _Opt("--table", help="Reuse this sensitivity table (.safetensors) instead of "
                                       "computing or loading the cached one.")] = None,
    samples: Annotated[int, _Opt("--samples", min=1, help="Calibration windows.")] = 128,
    seq_len: Annotated[int | None, _Opt("--seq-len", min=2, help="Window length (default: min(512, max)).")] = None,
    eval_data: Annotated[str | None, _Opt("--eval-data", help="Held-out data for the measured evaluation "
                                          "(default: --data, test split).")] = None,
    eval_samples: Annotated[int | None, _Opt("--eval-samples", min=1, help="Evaluate at most N windows.")] = None,
    eval_baselines: Annotated[bool, _Opt("--eval-baselines/--no-eval-baselines", help="Measure the fixed "
                                         "baselines too when --eval-top > 0.")] = True,
    select: Annotated[str, _Opt("--select", help="How the measured plan written to --out is chosen: kl (least KL "
                                "on the evaluation windows) | perplexity (also measures the knapsack optima of "
                                "restricted sub-spaces; least perplexity on the selection slice).")] = "kl",
    select_data: Annotated[str | None, _Opt("--select-data", help="Selection slice for --select perplexity "
                                            "(default: the validation split of --data; keep it apart from the "
                                            "evaluation text).")] = None,
    select_samples: Annotated[int | None, _Opt("--select-samples", min=1, help="Selection windows (default: "
                                               "--eval-samples; the last ones of the split).")] = None,
    refine: Annotated[int, _Opt("--refine", min=0, help="With --select perplexity: then at most N measured "
                                "candidates of a coordinate descent from the chosen plan (one group's activation "
                                "or one layer's weight scheme at a time, within the budget), on the selection "
                                "slice; 0: none.")] = 0,
    refine_tol: Annotated[float, _Opt("--refine-tol", min=0.0, max=0.5, help="A refinement step must lower the "
                                      "selection perplexity by more than this fraction (smaller gains are "
                                      "noise).")] = 0.001,
    workers: Annotated[int, _Opt("--workers", min=1, help="Parallel Ray workers.")] = 1,
    ray_address: Annotated[str | None, _Opt("--ray-address", help="Ray cluster address (env "
                                            "QUANTPLAN_RAY_ADDRESS); default local.")] = None,
    seed: Annotated[int, _Opt("--seed", help="Calibration sampling and sampler seed.")] = 0,
    dtype: Annotated[str, _Opt("--dtype", help="float32 | float16 | bfloat16 | auto")] = "float32",
    json_out: Annotated[bool, _Opt("--json", help="Print one JSON document on stdout instead of a table.")] = False,
) -> None:
    """Search mixed-precision plans under a memory budget: exact knapsack, Optuna study, measured re-scoring."""
    from quantplan.search.budget import Budget
    from quantplan.search.space import SearchSpace
    from quantplan.search.study import StudySettings

    budget = Budget(budget_bits, budget_mb)  # bad input fails before any model is loaded
    _check_select(select, refine)
    space = SearchSpace(act_bits, symmetry, low_bits, _split(weights), skip, max_dynamic_share)
    settings = StudySettings(trials, trial_space, seed, study, db)
    inputs = _load_inputs(model, data, eval_data, table, samples, seq_len, eval_samples, dtype, seed,
                          workers, ray_address, eval_top > 0, select_data=select_data,
                          select_samples=select_samples or eval_samples, need_select=select == "perplexity")
    report = run_pipeline(inputs, budget, space, settings, eval_top=eval_top, eval_baselines=eval_baselines,
                          workers=workers, address=ray_address, progress=not json_out, select=select,
                          refine=refine, refine_tol=refine_tol)
    path = report.problem.plan(report.best, meta=_plan_meta(report, model)).save(out)
    _print(report, model, path, json_out)


def _check_select(select: str, refine: int = 0) -> None:
    from quantplan.search.space import SearchError

    if select not in SELECT:
        raise SearchError(f"unknown --select {select!r}: use one of {', '.join(SELECT)}")
    if refine < 0:
        raise SearchError(f"--refine must be >= 0, got {refine}")
    if refine and select != "perplexity":
        raise SearchError("--refine measures candidates on the selection slice: add --select perplexity (with "
                          "--select kl it would choose on the reported windows)")


def _split(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(t.strip() for t in text.split(",") if t.strip())


@dataclass
class SearchInputs:
    """A loaded model with its sensitivity table, calibration tokens and held-out windows."""

    net: Any
    table: TableInfo
    calib_tokens: Any
    windows: Any | None
    shapes: dict[str, tuple[int, int]]
    select_windows: Any | None = None  # the selection slice for select="perplexity", apart from `windows`
    bases: dict[int, Any] = field(default_factory=dict, repr=False)  # id(windows) -> the unquantized result

    def evaluate(self, plans: Sequence[Any], windows: Any, *, workers: int, address: str | None,
                 progress: bool) -> list[Any]:
        """`workers.tasks.evaluate_plans` on `windows`, measuring the unquantized model there only once."""
        from quantplan.workers.tasks import evaluate_base, evaluate_plans

        if not plans:
            return []
        if id(windows) not in self.bases:
            self.bases[id(windows)] = evaluate_base(self.net, windows, workers=workers, address=address,
                                                    progress=progress)
        return evaluate_plans(self.net, plans, windows, self.calib_tokens, workers=workers, address=address,
                              progress=progress, base=self.bases[id(windows)])


def _load_inputs(model, data, eval_data, table_path, samples, seq_len, eval_samples, dtype, seed, workers,
                 address, need_windows, *, select_data=None, select_samples=None, need_select=False) -> SearchInputs:
    from quantplan.quant.apply import layer_shapes
    from quantplan.workers.data import DataSpec, calibration_set, eval_windows
    from quantplan.workers.models import load_model

    spec = DataSpec.parse(data)
    eval_spec = DataSpec.parse(eval_data) if eval_data else spec
    net, tokenizer = load_model(model, dtype=dtype)
    seq_len = seq_len or min(512, int(getattr(net.config, "max_position_embeddings", 512)))
    calib = calibration_set(spec, tokenizer, samples=samples, seq_len=seq_len, seed=seed)
    info = _table(net, model, calib, table_path, workers, address)
    windows = select_windows = None
    if need_windows:
        windows = eval_windows(eval_spec, tokenizer, seq_len=seq_len, max_windows=eval_samples, split="test")
        if need_select:
            select_spec = DataSpec.parse(select_data) if select_data else spec
            select_windows = selection_windows(select_spec, eval_spec, tokenizer, seq_len, select_samples)
    return SearchInputs(net, info, calib.tokens, windows, layer_shapes(net), select_windows)


def selection_windows(spec: Any, eval_spec: Any, tokenizer: Any, seq_len: int, count: int | None) -> Any:
    """The last `count` windows of the selection text's validation split; a warning when that text is the
    evaluation text itself (the reported numbers would then not be held out from the choice)."""
    from quantplan.workers.data import eval_windows, load_text

    windows = eval_windows(spec, tokenizer, seq_len=seq_len, split="validation")
    if load_text(spec, "validation") == load_text(eval_spec, "test"):
        log.warning("the selection slice (%s) is the evaluation text: the reported perplexity is not held out "
                    "from the choice; pass --select-data or --eval-data", spec)
    return windows if count is None else windows[-count:]


def _table(net: Any, model: str, calib: Any, path: Path | None, workers: int, address: str | None) -> TableInfo:
    """The table from --table (checked against the model), else the cached or freshly computed one."""
    from quantplan.quant.costs import TableError, read_table_info
    from quantplan.workers.models import model_fingerprint
    from quantplan.workers.pipeline import sensitivity_table

    if path is None:
        table, cached = sensitivity_table(net, calib, model_name=model, workers=workers, address=address,
                                          progress=True)
        log.info("sensitivity table %s (%s)", table.key, "cached" if cached else "computed")
        return table
    info = read_table_info(path)
    expected, found = model_fingerprint(net), info.model.get("fingerprint")
    if found != expected:
        raise TableError(
            f"{path} was computed for another model (fingerprint {str(found)[:12]}, this model {expected[:12]}); "
            "leave out --table to compute the table for this model"
        )
    return info


def run_pipeline(
    inputs: SearchInputs,
    budget: Budget,
    space: SearchSpace,
    settings: StudySettings,
    *,
    eval_top: int = 3,
    eval_baselines: bool = True,
    workers: int = 1,
    address: str | None = None,
    progress: bool = False,
    select: str = "kl",
    refine: int = 0,
    refine_tol: float = 0.001,
    on_trial: Callable[[int, int], None] | None = None,
) -> SearchReport:
    """Compile the problem, run the study, measure the top candidates; the best plan is the measured best
    within budget and space (`select`: least KL to the unquantized model on the evaluation windows, or least
    perplexity on `inputs.select_windows`, else on the evaluation windows, among more candidates), else the
    predicted best; `refine` > 0 (select="perplexity") then descends from it, at most `refine` measurements,
    each step a relative gain above `refine_tol`."""
    from quantplan.search.problem import compile_problem
    from quantplan.search.study import run_search
    from quantplan.search.variants import variants

    _check_select(select, refine)
    problem = compile_problem(inputs.table, space, budget, inputs.shapes)
    with _trial_progress(progress) as show:
        def each_trial(done: int, total: int) -> None:
            show(done, total)
            if on_trial is not None:  # e.g. the job runner: progress, and a cancel between trials
                on_trial(done, total)

        result = run_search(problem, settings, on_trial=each_trial)
    log.info("study %s in %s: %d trials (%d new, %.0f/min); knapsack %s in %.2f s", result.study, result.storage,
             result.trials, result.new_trials, result.trials_per_minute,
             "exact" if result.knapsack.exact else "within its dual bound", result.knapsack.seconds)
    report = SearchReport(problem, result, best=result.best(), select=select)
    if eval_top > 0 and inputs.windows is not None:
        if select == "perplexity":
            report.variants = variants(problem)
        _measure(report, inputs, _to_measure(report, eval_top, eval_baselines), workers, address, progress)
        if refine and report.selection:
            _refine(report, inputs, refine, refine_tol, workers, address, progress)
    elif refine:
        log.warning("--refine %d needs measured plans (--eval-top > 0 and evaluation windows): not refined", refine)
    return report


def _to_measure(report: SearchReport, top: int, baselines: bool) -> list[Candidate]:
    """The `top` best distinct plans within budget and space by prediction, the variants, the baselines."""
    fits = [c for c in report.result.references + report.result.pareto if c.under_budget and c.in_space]
    chosen: dict[tuple[str, ...], Candidate] = {}
    for c in sorted(fits, key=lambda c: c.predicted_loss):
        if len(chosen) < top:
            chosen.setdefault(c.schemes, c)
    for c in report.variants:
        if c.under_budget and c.in_space:
            chosen.setdefault(c.schemes, c)
    refs = [c for c in report.result.references if c.recipe != "knapsack"] if baselines else []
    return list(chosen.values()) + [c for c in refs if c.schemes not in chosen]


def _measure(report: SearchReport, inputs: SearchInputs, candidates: list[Candidate], workers: int,
             address: str | None, progress: bool) -> None:
    plans = [report.problem.plan(c) for c in candidates]
    results = inputs.evaluate(plans, inputs.windows, workers=workers, address=address, progress=progress)
    report.measured = {c.label: r.to_dict() for c, r in zip(candidates, results, strict=True)}
    fits = [c for c in candidates if c.under_budget and c.in_space]
    if not fits:
        return
    if report.select == "perplexity":  # chosen on tokens the reported numbers do not include
        held_out = inputs.select_windows if inputs.select_windows is not None else inputs.windows
        chosen = inputs.evaluate([report.problem.plan(c) for c in fits], held_out, workers=workers,
                                 address=address, progress=progress)
        report.selection = {c.label: r.to_dict() for c, r in zip(fits, chosen, strict=True)}
        report.best = min(fits, key=lambda c: (report.selection[c.label]["perplexity"],
                                               report.selection[c.label]["kl"]))
    else:  # KL: the measured loss increase with far less sampling noise than a perplexity difference
        report.best = min(fits, key=lambda c: (report.measured[c.label]["kl"], report.measured[c.label]["perplexity"]))


def _refine(report: SearchReport, inputs: SearchInputs, max_evals: int, tol: float, workers: int,
            address: str | None, progress: bool) -> None:
    """Coordinate descent from the selected plan, measured on the selection slice; the plan it ends on is
    measured on the evaluation windows too and becomes the best."""
    from quantplan.search.refine import refine

    held_out = inputs.select_windows if inputs.select_windows is not None else inputs.windows

    def measure(candidates: Sequence[Candidate]) -> list[float]:
        plans = [report.problem.plan(c) for c in candidates]
        results = inputs.evaluate(plans, held_out, workers=workers, address=address, progress=progress)
        report.selection |= {c.label: r.to_dict() for c, r in zip(candidates, results, strict=True)}
        return [r.perplexity for r in results]

    start = report.best
    assert start is not None
    descent = refine(report.problem, start, report.selection[start.label]["perplexity"], measure,
                     max_evals=max_evals, batch=max(4, 2 * workers), min_gain=tol)
    log.info("refinement: %d measured, %d moves accepted (%s), selection ppl %.3f -> %.3f", descent.evaluations,
             len(descent.moves), "; ".join(descent.moves), descent.steps[0][1], descent.steps[-1][1])
    steps = [c for c, _ in descent.steps[1:]]
    if steps:  # the reported numbers of every accepted step, on the evaluation windows
        results = inputs.evaluate([report.problem.plan(c) for c in steps], inputs.windows, workers=workers,
                                  address=address, progress=progress)
        report.measured |= {c.label: r.to_dict() for c, r in zip(steps, results, strict=True)}
    report.refinement, report.best = descent, descent.best


@contextmanager
def _trial_progress(enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar fed by the driver's on_trial(done, total) callback (nothing when disabled)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("search trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=stderr, disable=not enabled)
    task = bar.add_task("trials", total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _plan_meta(report: SearchReport, model: str) -> dict[str, Any]:
    best = report.best
    assert best is not None
    return {"search": {
        "model": model, "study": report.result.study, "budget": report.problem.budget.to_dict(),
        "space": report.problem.space.to_dict(), "table": report.problem.table.key, **best.summary(),
        **_measured(report.measured.get(best.label)), "select": report.select,
        **_selected(report.selection.get(best.label)),
        **({"refine": report.refine_summary()} if report.refinement else {}),
    }}


def _print(report: SearchReport, model: str, path: Path, json_out: bool) -> None:
    rows = report.rows()
    if json_out:
        print_json(_json_doc(report, model, path, rows))
        return
    best = report.best
    assert best is not None
    shown = _thin(rows, report)
    for r in shown:
        r |= {"plan": ("* " if r["label"] == best.label else "") + r["label"], "pred_loss": r["predicted_loss"],
              "ppl": r.get("perplexity"), "sel_ppl": r.get("select_perplexity"), "fits": _fits(r)}
    base = next((m["base_perplexity"] for m in report.measured.values()), None)
    title = (f"budget {report.problem.budget.describe()}: {len(report.result.pareto)} Pareto plans (showing "
             f"{len(shown)}){'' if base is None else f', unquantized ppl {base:.3f}'}"
             f"{'; * = least sel_ppl (selection slice)' if report.selection else ''}")
    columns = COLUMNS[:-1] + ("sel_ppl", "fits") if report.selection else COLUMNS
    stdout.print(table_view(title, columns, shown, FORMATS | {"sel_ppl": ".3f"}))
    stderr.print(f"wrote the best plan ({best.label}) to {path}; browse the study with: "
                 f"optuna-dashboard {report.result.storage}", highlight=False, soft_wrap=True)


def _fits(row: dict[str, Any]) -> str:
    return "no: space" if not row["in_space"] else "yes" if row["under_budget"] else "no: size"


def _thin(rows: list[dict[str, Any]], report: SearchReport) -> list[dict[str, Any]]:
    """References, evaluated plans, and up to SHOWN_PARETO others spread over the front by size."""
    keep = {r["label"] for r in rows if r["recipe"] or r["label"] in report.measured}
    others = [r for r in rows if r["label"] not in keep]
    step = max(1, -(-len(others) // SHOWN_PARETO))
    keep |= {r["label"] for r in others[::step]}
    return sorted((dict(r) for r in rows if r["label"] in keep), key=lambda r: (r["bytes"], r["predicted_loss"]))


def _json_doc(report: SearchReport, model: str, path: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    result, best = report.result, report.best
    assert best is not None
    return {
        "model": model,
        "study": result.study,
        "db": result.storage,
        "budget": report.problem.budget.to_dict(),
        "space": report.problem.space.to_dict(),
        "trials": result.trials,
        "new_trials": result.new_trials,
        "seconds": result.seconds,
        "knapsack": {"exact": result.knapsack.exact, "lower_bound": result.knapsack.lower_bound,
                     "predicted_loss": result.knapsack.loss, "seconds": result.knapsack.seconds},
        "select": report.select,
        "refine": report.refine_summary(),
        "best": {**best.summary(), **_measured(report.measured.get(best.label)),
                 **_selected(report.selection.get(best.label)), "plan": report.problem.plan(best).to_dict()},
        "out": str(path),
        "plans": rows,
    }
