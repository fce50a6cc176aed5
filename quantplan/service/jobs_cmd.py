"""Local-mode job commands: `run`, `runner`, `leaderboard`, `show`, `export` (the project database, no server).

`run` stores a job and executes it in this process with the same runner a server uses; `runner` is that runner
as a long-lived process (it claims queued jobs until stopped). The others read what jobs stored.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from quantplan.errors import QuantPlanError
from quantplan.service.artifact_cmd import BaseModelOpt, FormatOpt, print_written, write_in_format
from quantplan.service.console import print_json, stderr, stdout
from quantplan.service.console import table as table_view
from quantplan.service.jobs import DEFAULTS, JobSpec, SpecError
from quantplan.service.views import PLAN_COLUMNS, PLAN_FORMATS, job_view, leaderboard_view, plan_row, plan_view

log = logging.getLogger("quantplan.service.jobs")

_Opt = typer.Option
JsonOpt = Annotated[bool, _Opt("--json", help="Print one JSON document on stdout instead of a table.")]
DbOpt = Annotated[str | None, _Opt("--db", help="Database URL (default: QUANTPLAN_DATABASE_URL, the config file, "
                                   "else SQLite in the user data dir).")]
ArtifactsOpt = Annotated[str | None, _Opt("--artifacts", help="Artifact store: a directory or fsspec URL (default: "
                                          "QUANTPLAN_ARTIFACTS, else the user data dir).")]
RayOpt = Annotated[str | None, _Opt("--ray-address", help="Ray cluster address (env QUANTPLAN_RAY_ADDRESS); "
                                    "default: a local Ray instance.")]


def load_cli_settings(db: str | None, artifacts: str | None = None, ray_address: str | None = None,
                      **extra: Any) -> Any:
    """Settings from the environment and config file, with the command line's --db/--artifacts/--ray-address."""
    from quantplan.storage import load_settings

    given = {"database_url": db, "artifacts": artifacts, "ray_address": ray_address}
    return load_settings(**{k: v for k, v in given.items() if v is not None}, **extra)


def open_storage(db: str | None, artifacts: str | None = None, ray_address: str | None = None) -> tuple[Any, Any]:
    """The repository (migrated) and the artifact store from settings, with command-line overrides."""
    from quantplan.storage import Repository, open_store

    settings = load_cli_settings(db, artifacts, ray_address)
    return Repository(settings=settings), open_store(settings.artifacts)


# the job-spec options, shared by `run` (local) and `submit` (remote); names follow `quantplan search`
ModelOpt = Annotated[str, _Opt("--model", "-m", help="Hugging Face id or local model directory.")]
DataOpt = Annotated[str, _Opt("--data", "-d", help="Calibration and evaluation data: wikitext2 | wikitext2:<dir> | "
                                                   "text:<file>[,<file>...]")]
BudgetBitsOpt = Annotated[float | None, _Opt("--budget-bits", help="Average bits per weight (scales included).")]
BudgetMbOpt = Annotated[float | None, _Opt("--budget-mb", help="Bytes of the quantizable weights, in MB.")]
EvalDataOpt = Annotated[str | None, _Opt("--eval-data", help="Held-out data (default: --data, test split).")]
ActBitsOpt = Annotated[int | None, _Opt("--act-bits", show_default=str(DEFAULTS["act_bits"]),
                                       help="8 (W4A8/W8A8) or 16 (weight-only).")]
TargetOpt = Annotated[str | None, _Opt("--target", show_default=str(DEFAULTS["target"]), help="quantplan | "
                                      "compressed-tensors: plans that format expresses (vLLM).")]
FusedGroupsOpt = Annotated[bool | None, _Opt("--fused-groups/--no-fused-groups", help="q/k/v and gate/up share one "
                                             "scheme (default: on for --target compressed-tensors).")]
TrialsOpt = Annotated[int | None, _Opt("--trials", min=0, show_default=str(DEFAULTS["trials"]), help="Optuna trials.")]
EvalTopOpt = Annotated[int | None, _Opt("--eval-top", min=0, show_default=str(DEFAULTS["eval_top"]),
                                        help="Measure the K best Pareto plans and the baselines.")]
MaterializeTopOpt = Annotated[int | None, _Opt("--materialize-top", min=0,
                                               show_default=str(DEFAULTS["materialize_top"]),
                                               help="Materialize the K best measured plans.")]
SamplesOpt = Annotated[int | None, _Opt("--samples", min=1, show_default=str(DEFAULTS["samples"]),
                                        help="Calibration windows.")]
SeqLenOpt = Annotated[int | None, _Opt("--seq-len", min=2, help="Window length (default: min(512, max)).")]
EvalSamplesOpt = Annotated[int | None, _Opt("--eval-samples", min=1, help="Evaluate at most N windows.")]
SpecFileOpt = Annotated[Path | None, _Opt("--spec", help="A JSON job spec with any further options (skip, "
                                          "max_dynamic_share, space, symmetry, low_bits, weights, eval_baselines, "
                                          "select, refine, seed, workers, dtype); flags given on the command line "
                                          "win.")]


def spec_from_options(spec_file: Path | None, options: dict[str, Any]) -> JobSpec:
    """A validated `JobSpec` from a spec file (optional) overlaid with the command's options that name spec fields
    and were given (not None)."""
    given = {k: v for k, v in options.items() if k in JobSpec.model_fields}

    base: dict[str, Any] = {}
    if spec_file is not None:
        try:
            base = json.loads(Path(spec_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SpecError(f"cannot read the job spec {spec_file}: {e}; pass a JSON object file") from None
        if not isinstance(base, dict):
            raise SpecError(f"the job spec {spec_file} must hold a JSON object")
    return JobSpec.parse(base | {k: v for k, v in given.items() if v is not None})


def run_command(
    model: ModelOpt,
    data: DataOpt,
    budget_bits: BudgetBitsOpt = None,
    budget_mb: BudgetMbOpt = None,
    eval_data: EvalDataOpt = None,
    act_bits: ActBitsOpt = None,
    trials: TrialsOpt = None,
    eval_top: EvalTopOpt = None,
    materialize_top: MaterializeTopOpt = None,
    target: TargetOpt = None,
    fused_groups: FusedGroupsOpt = None,
    samples: SamplesOpt = None,
    seq_len: SeqLenOpt = None,
    eval_samples: EvalSamplesOpt = None,
    spec_file: SpecFileOpt = None,
    db: DbOpt = None,
    artifacts: ArtifactsOpt = None,
    ray_address: RayOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run a whole search job in this process and store it: sensitivity, search, materialize, evaluate."""
    spec = spec_from_options(spec_file, locals())
    repo, store = open_storage(db, artifacts, ray_address)
    job = run_local_job(repo, store, spec, progress=not json_out)
    _report_job(repo, job, json_out)


def run_local_job(repo: Any, store: Any, spec: Any, *, progress: bool = False) -> Any:
    """Store `spec` as a job and run it here; the final job record (a failed job raises its error)."""
    from quantplan.service.runner import Runner
    from quantplan.storage.db import safe_url

    job = repo.create_job(spec.to_json(), submitter=_user())
    stderr.print(f"job {job.id} stored in {safe_url(repo.db.url)}", highlight=False)
    job = Runner(repo, store, progress=progress).run_job(job.id)
    if job.status != "succeeded":
        raise QuantPlanError(f"job {job.id} {job.status}: {job.error or 'no error recorded'}")
    return job


def _report_job(repo: Any, job: Any, json_out: bool) -> None:
    plans = [plan_view(p) for p in repo.plans_for_job(job.id)]
    if json_out:
        print_json({"job": job_view(job), "plans": plans})
        return
    shown = sorted(plans, key=lambda v: (v["perplexity"] is None, v["perplexity"] or 0.0, v["bytes"]))
    stdout.print(table_view(f"job {job.id} {job.status}: {len(plans)} plans stored", PLAN_COLUMNS,
                            [plan_row(v) for v in shown[:20]], PLAN_FORMATS))


def runner_command(
    db: DbOpt = None,
    artifacts: ArtifactsOpt = None,
    ray_address: RayOpt = None,
    poll: Annotated[float, _Opt("--poll", min=0.05, help="Seconds between polls of an empty queue.")] = 2.0,
    heartbeat: Annotated[float, _Opt("--heartbeat", min=0.05, help="Seconds between heartbeats of a job.")] = 10.0,
    stale_after: Annotated[float, _Opt("--stale-after", min=0.1, help="Requeue a running job whose heartbeat is "
                                       "older than this (seconds).")] = 120.0,
    max_attempts: Annotated[int, _Opt("--max-attempts", min=1, help="Claims before a failing job is failed.")] = 3,
    max_jobs: Annotated[int | None, _Opt("--max-jobs", min=1, help="Exit after running N jobs.")] = None,
    once: Annotated[bool, _Opt("--once", help="Run at most one queued job, then exit.")] = False,
    parent_pid: Annotated[int | None, _Opt("--parent-pid", hidden=True, help="Exit when this process is gone "
                                           "(set by `quantplan serve`).")] = None,
    confined: Annotated[bool | None, _Opt("--confined/--unconfined", help="Check each job's model and data "
                                          "against QUANTPLAN_MODEL_ROOTS/DATA_ROOTS and load safetensors only "
                                          "(default: on when roots are set; `quantplan serve` turns it on).")]
    = None,
    json_out: JsonOpt = False,
) -> None:
    """Claim and run queued jobs until stopped (Ctrl-C / SIGTERM: the running job goes back to the queue at its
    next progress event, and the runner exits 0)."""
    from quantplan.service.runner import Runner, RunnerConfig
    from quantplan.service.scratch import datasets_scratch

    repo, store = open_storage(db, artifacts, ray_address)
    settings = repo.settings
    if confined is None:
        confined = bool(settings.roots("model") or settings.roots("data"))
    config = RunnerConfig(heartbeat, stale_after, max_attempts, settings.ray_address, confined=confined)
    runner = Runner(repo, store, config=config)
    with datasets_scratch():
        if once:
            job = runner.run_once()
            if json_out:
                print_json({"runner": runner.id, "job": None if job is None else job_view(job)})
            else:
                stderr.print("queue empty" if job is None else f"job {job.id} {job.status}", highlight=False)
            return
        stop = threading.Event()
        _start_ray(settings.ray_address)  # before our handlers: ray.init installs its own SIGTERM handler
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        if parent_pid is not None:
            threading.Thread(target=_exit_with_parent, args=(parent_pid, stop), daemon=True).start()
        ran = runner.serve(stop, poll=poll, max_jobs=max_jobs)
    if json_out:
        print_json({"runner": runner.id, "jobs": ran})
    else:
        stderr.print(f"runner {runner.id} stopped after {ran} job(s)", highlight=False)


def _start_ray(address: str | None) -> None:
    """Start (or join) Ray now, so the signal handlers installed after it are ours (Ray's SIGTERM handler exits
    at once, leaving the job claimed). A Ray that cannot be reached yet is joined by the first job instead."""
    from quantplan.workers.tasks import RayError, init_ray

    try:
        init_ray(address)
    except RayError as e:
        log.warning("runner: %s; jobs will try again", e)


def _exit_with_parent(pid: int, stop: threading.Event) -> None:
    """Stop the runner when the process that started it is gone (even if it was killed with SIGKILL)."""
    while not stop.wait(2.0):
        if os.getppid() != pid:
            log.warning("runner: parent process %d is gone; stopping after the current job", pid)
            stop.set()


def leaderboard_command(
    model: Annotated[str, _Opt("--model", "-m", help="Model name (as submitted), fingerprint or id.")],
    max_bits: Annotated[float | None, _Opt("--max-bits", help="Only plans with at most this many average bits.")]
    = None,
    max_bytes: Annotated[int | None, _Opt("--max-bytes", min=0, help="Only plans of at most this many bytes.")]
    = None,
    act_bits: Annotated[int | None, _Opt("--act-bits", help="Only plans with these activation bits (8 or 16).")]
    = None,
    sort: Annotated[str, _Opt("--sort", help="A metric (perplexity, kl, ...) or avg_bits, bytes, "
                              "predicted_loss, created_at.")] = "perplexity",
    order: Annotated[str, _Opt("--order", help="asc | desc")] = "asc",
    dataset: Annotated[str | None, _Opt("--dataset", help="Sort by the metric on this dataset.")] = None,
    pareto_only: Annotated[bool, _Opt("--pareto-only", help="Only plans on a job's Pareto front.")] = False,
    distinct: Annotated[bool, _Opt("--distinct", help="A plan several jobs stored is listed once.")] = False,
    limit: Annotated[int, _Opt("--limit", min=1, max=1000)] = 20,
    offset: Annotated[int, _Opt("--offset", min=0)] = 0,
    columns: Annotated[str | None, _Opt("--columns", help="Columns to show, comma-separated: id, job, label, "
                                        "avg_bits, bytes, act, pred_loss, ppl, kl, pareto, artifact (default: "
                                        "all that fit the terminal's width).")] = None,
    server: Annotated[str | None, _Opt("--server", envvar="QUANTPLAN_SERVER", help="Query this QuantPlan "
                                       "server instead of the local database.")] = None,
    token: Annotated[str | None, _Opt("--token", envvar="QUANTPLAN_TOKEN", help="Bearer token for --server.")]
    = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The best stored plans of a model: filtered, sorted, paged."""
    from quantplan.service.plan_table import parse_columns

    shown = parse_columns(columns)
    query = {"model": model, "max_avg_bits": max_bits, "max_bytes": max_bytes, "act_bits": act_bits, "sort": sort,
             "order": order, "dataset": dataset, "pareto_only": pareto_only, "limit": limit, "offset": offset,
             "distinct": distinct}
    if server:
        from quantplan.service.client import Client

        view = Client(server, token).leaderboard(**query)
    else:
        repo, _ = open_storage(db)
        view = leaderboard_view(model, repo.leaderboard(**query))
    print_leaderboard(view, json_out, shown)


def print_leaderboard(view: dict[str, Any], json_out: bool = False, columns: Sequence[str] | None = None) -> None:
    """The leaderboard page as JSON, or as a table fitted to the terminal's width (`service.plan_table`)."""
    from quantplan.service.plan_table import plan_table

    if json_out:
        print_json(view)
        return
    shown = len(view["plans"])
    title = (f"{view['model']}: plans {view['offset'] + 1 if shown else 0}-{view['offset'] + shown} of "
             f"{view['total']}")
    stdout.print(plan_table(title, [plan_row(v) for v in view["plans"]], stdout.width, columns))


def show_command(
    plan_id: Annotated[int, typer.Argument(help="Plan id (from the leaderboard).")],
    plan_json: Annotated[Path | None, _Opt("--plan-json", help="Also write the plan JSON to this file.")] = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """One stored plan: cost, prediction, metrics, artifacts and its schemes."""
    from quantplan.quant.plan import atomic_write_text

    repo, _ = open_storage(db)
    view = plan_view(repo.get_plan(plan_id), full=True)
    if plan_json is not None:
        atomic_write_text(plan_json, json.dumps(view["plan"], indent=2) + "\n")
    if json_out:
        print_json(view)
        return
    print_plan(view)


def print_plan(view: dict[str, Any]) -> None:
    row = plan_row(view)
    stdout.print(table_view(f"plan {view['id']} (job {view['job_id']})", PLAN_COLUMNS[2:], [row], PLAN_FORMATS))
    metrics = [{"metric": m["name"], "dataset": m["dataset"] or "-", "value": m["value"]} for m in view["metrics"]]
    if metrics:
        stdout.print(table_view("metrics", ("metric", "dataset", "value"), metrics, {"value": ".5g"}))
    schemes = [{"scheme": s, "layers": n} for s, n in view["schemes"].items()]
    stdout.print(table_view("schemes", ("scheme", "layers"), schemes, {}))
    for a in view["artifacts"]:
        stderr.print(f"artifact {a['kind']}: {a['bytes']:,} bytes, sha256 {a['sha256']}; "
                     f"`quantplan export {view['id']} -o DIR` writes it", highlight=False)


def export_command(
    plan_id: Annotated[int, typer.Argument(help="Plan id (from the leaderboard).")],
    out: Annotated[Path, _Opt("--out", "-o", help="Directory to create with the artifact (plan.json, "
                              "quantized.safetensors, manifest.json).")],
    overwrite: Annotated[bool, _Opt("--overwrite", help="Replace an existing directory.")] = False,
    db: DbOpt = None,
    artifacts: ArtifactsOpt = None,
    format: FormatOpt = "quantplan",  # noqa: A002 - the option's name
    model_path: BaseModelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write a plan's materialized artifact to a directory (sha256 verified), ready for `quantplan apply`; with
    --format compressed-tensors, converted into a Hugging Face checkpoint that vLLM serves."""
    repo, store = open_storage(db, artifacts)
    plan = repo.get_plan(plan_id)
    packed = next((a for a in plan.artifacts if a.kind == "packed"), None)
    if packed is None:
        raise QuantPlanError(f"plan {plan_id} was not materialized; write its plan with `quantplan show {plan_id} "
                             "--plan-json plan.json` and run `quantplan materialize --plan plan.json ...`")
    model = repo.get_model(plan.model_id)
    path = write_in_format(lambda d: extract_artifact(store, packed.sha256, d, overwrite=overwrite), out, format,
                           model=model_path or model.name, overwrite=overwrite)
    result = {"plan_id": plan_id, "out": str(path), "sha256": packed.sha256, "bytes": packed.bytes,
              "model": model.name, "format": format}
    if json_out or format != "quantplan":
        print_written(result, json_out)
        return
    stderr.print(f"wrote {path} (sha256 {packed.sha256[:12]}, verified); apply it with: "
                 f"quantplan apply {path} --model {model.name}", highlight=False, soft_wrap=True)


def extract_artifact(store: Any, sha256: str, out: Path, *, overwrite: bool = False) -> Path:
    """Unpack a stored archive into `out` atomically (`quant.atomic.staging_dir`)."""
    from quantplan.quant.atomic import staging_dir

    with staging_dir(out, overwrite) as tmp:
        store.extract_dir(sha256, tmp)
    return Path(out)


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None
