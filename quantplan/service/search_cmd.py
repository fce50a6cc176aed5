"""`quantplan search`: a model, data and a memory budget in; the Pareto set and the best plan out.

The options build the same `JobSpec` that `quantplan run`/`submit` send (defaults: `service.jobs.DEFAULTS`), and
`service.pipeline.run_search` runs it: the sensitivity table (computed on Ray and cached, or `--table`), the exact
knapsack optimum, an Optuna study in the project database (resumed when the same search runs again), then the
best Pareto plans under the budget and the fixed baselines re-scored by measured perplexity/KL on held-out tokens
(Ray); with `--select perplexity` also the knapsack optima of restricted sub-spaces, chosen by perplexity on a
selection slice kept apart from the reported tokens, and with `--refine N` a measured coordinate descent from the
chosen plan (search.refine) on that slice. This module parses the options and prints the report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from quantplan.service.console import print_json, stderr, stdout
from quantplan.service.console import table as table_view
from quantplan.service.jobs import DEFAULTS, JobSpec
from quantplan.service.pipeline import RunOptions, measured_fields, run_search, selected_fields

if TYPE_CHECKING:
    from quantplan.service.pipeline import SearchReport

log = logging.getLogger("quantplan.service.search")

COLUMNS = ("plan", "avg_bits", "bytes", "pred_loss", "ppl", "kl", "fits")
FORMATS = {"avg_bits": ".3f", "bytes": ",d", "pred_loss": ".3e", "ppl": ".3f", "kl": ".4f"}
SHOWN_PARETO = 12  # the table shows the references, the evaluated plans and this many more of the front
NOT_SPEC = ("out", "db", "study", "table", "ray_address", "json_out")  # where and how it runs, not what

_Opt = typer.Option
D = DEFAULTS


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
                                  "search (W4A16/W8A16).")] = D["act_bits"],
    trials: Annotated[int, _Opt("--trials", min=0, help="Completed trials the study should hold; rerunning the "
                                "same search resumes up to N.")] = D["trials"],
    eval_top: Annotated[int, _Opt("--eval-top", min=0, help="Measure perplexity/KL of the K best Pareto plans "
                                  "within the budget (and the baselines) on Ray; 0: predictions only.")
                        ] = D["eval_top"],
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
                                     "categorical per layer).")] = D["space"],
    symmetry: Annotated[str, _Opt("--symmetry", help="Searched 4-bit weights: sym | asym | both.")] = D["symmetry"],
    low_bits: Annotated[bool, _Opt("--low-bits/--no-low-bits", help="Also search 2/3-bit weights (simulation "
                                   "only: no kernel serves them).")] = D["low_bits"],
    weights: Annotated[str | None, _Opt("--weights", help="Only these weight schemes, comma-separated, "
                                        "e.g. w4g128,w4g64,w8.")] = None,
    table: Annotated[Path | None, _Opt("--table", help="Reuse this sensitivity table (.safetensors) instead of "
                                       "computing or loading the cached one.")] = None,
    samples: Annotated[int, _Opt("--samples", min=1, help="Calibration windows.")] = D["samples"],
    seq_len: Annotated[int | None, _Opt("--seq-len", min=2, help="Window length (default: min(512, max)).")] = None,
    eval_data: Annotated[str | None, _Opt("--eval-data", help="Held-out data for the measured evaluation "
                                          "(default: --data, test split).")] = None,
    eval_samples: Annotated[int | None, _Opt("--eval-samples", min=1, help="Evaluate at most N windows.")] = None,
    eval_baselines: Annotated[bool, _Opt("--eval-baselines/--no-eval-baselines", help="Measure the fixed "
                                         "baselines too when --eval-top > 0.")] = D["eval_baselines"],
    select: Annotated[str, _Opt("--select", help="How the measured plan written to --out is chosen: kl (least KL "
                                "on the evaluation windows) | perplexity (also measures the knapsack optima of "
                                "restricted sub-spaces; least perplexity on the selection slice).")] = D["select"],
    select_data: Annotated[str | None, _Opt("--select-data", help="Selection slice for --select perplexity "
                                            "(default: the validation split of --data; keep it apart from the "
                                            "evaluation text).")] = None,
    select_samples: Annotated[int | None, _Opt("--select-samples", min=1, help="Selection windows (default: "
                                               "--eval-samples; the last ones of the split).")] = None,
    refine: Annotated[int, _Opt("--refine", min=0, help="With --select perplexity: then at most N measured "
                                "candidates of a coordinate descent from the chosen plan (one group's activation "
                                "or one layer's weight scheme at a time, within the budget), on the selection "
                                "slice; 0: none.")] = D["refine"],
    refine_tol: Annotated[float, _Opt("--refine-tol", min=0.0, max=0.5, help="A refinement step must lower the "
                                      "selection perplexity by more than this fraction (smaller gains are "
                                      "noise).")] = D["refine_tol"],
    workers: Annotated[int, _Opt("--workers", min=1, help="Parallel Ray workers.")] = D["workers"],
    ray_address: Annotated[str | None, _Opt("--ray-address", help="Ray cluster address (env "
                                            "QUANTPLAN_RAY_ADDRESS); default local.")] = None,
    seed: Annotated[int, _Opt("--seed", help="Calibration sampling and sampler seed.")] = D["seed"],
    dtype: Annotated[str, _Opt("--dtype", help="float32 | float16 | bfloat16 | auto")] = D["dtype"],
    target: Annotated[str, _Opt("--target", help="quantplan | compressed-tensors: search only what that format "
                                "expresses (vLLM; fused layers share one scheme).")] = D["target"],
    fused_groups: Annotated[bool | None, _Opt("--fused-groups/--no-fused-groups", help="q/k/v and gate/up share one "
                                              "scheme (default: on for --target compressed-tensors).")] = None,
    json_out: Annotated[bool, _Opt("--json", help="Print one JSON document on stdout instead of a table.")] = False,
) -> None:
    """Search mixed-precision plans under a memory budget: exact knapsack, Optuna study, measured re-scoring."""
    spec = search_spec({k: v for k, v in locals().items() if k not in NOT_SPEC})  # bad input fails before loading
    run = RunOptions(address=ray_address, progress=not json_out, study=study, storage=db, table=table)
    _, report = run_search(spec, run)
    assert report.best is not None
    path = report.problem.plan(report.best, meta=_plan_meta(report, model)).save(out)
    _print(report, model, path, json_out)


def search_spec(options: dict[str, Any]) -> JobSpec:
    """The `JobSpec` of `quantplan search`'s options (its --space is `trial_space`, --weights comma-separated);
    errors name the flags."""
    options = dict(options)
    options["space"] = options.pop("trial_space")
    weights = options.pop("weights")
    if weights is not None:
        options["weights"] = [w.strip() for w in weights.split(",") if w.strip()]
    return JobSpec.parse({k: v for k, v in options.items() if v is not None}, flags=True)


def _plan_meta(report: SearchReport, model: str) -> dict[str, Any]:
    best = report.best
    assert best is not None
    return {"search": {
        "model": model, "study": report.result.study, "budget": report.problem.budget.to_dict(),
        "space": report.problem.space.to_dict(), "table": report.problem.table.key, **best.summary(),
        **measured_fields(report.measured.get(best.label)), "select": report.select,
        **selected_fields(report.selection.get(best.label)),
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
        "best": {**best.summary(), **measured_fields(report.measured.get(best.label)),
                 **selected_fields(report.selection.get(best.label)), "plan": report.problem.plan(best).to_dict()},
        "out": str(path),
        "plans": rows,
    }
