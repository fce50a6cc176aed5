"""Server-mode commands: `serve` (the HTTP API plus job runners) and the remote client commands `submit`, `status`,
`cancel`, `download` (`leaderboard --server` lives beside the local one). The server URL and token may come
from QUANTPLAN_SERVER and QUANTPLAN_TOKEN; `status` and `cancel` without a server use the local database.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from quantplan.errors import QuantPlanError
from quantplan.service.artifact_cmd import BaseModelOpt, FormatOpt, print_written, write_in_format
from quantplan.service.console import print_json, stderr, stdout
from quantplan.service.console import table as table_view
from quantplan.service.jobs_cmd import (
    ActBitsOpt,
    ArtifactsOpt,
    BudgetBitsOpt,
    BudgetMbOpt,
    DataOpt,
    DbOpt,
    EvalDataOpt,
    EvalSamplesOpt,
    EvalTopOpt,
    FusedGroupsOpt,
    JsonOpt,
    MaterializeTopOpt,
    ModelOpt,
    RayOpt,
    SamplesOpt,
    SeqLenOpt,
    SpecFileOpt,
    TargetOpt,
    TrialsOpt,
    load_cli_settings,
    open_storage,
    spec_from_options,
)
from quantplan.service.views import FINAL, PLAN_COLUMNS, PLAN_FORMATS, job_view, plan_row, step_line

log = logging.getLogger("quantplan.service.remote")

_Opt = typer.Option
ServerOpt = Annotated[str | None, _Opt("--server", envvar="QUANTPLAN_SERVER", help="QuantPlan server URL, e.g. "
                                       "http://localhost:8000 (env QUANTPLAN_SERVER).")]
TokenOpt = Annotated[str | None, _Opt("--token", envvar="QUANTPLAN_TOKEN", help="Bearer token (env "
                                      "QUANTPLAN_TOKEN).")]
JobArg = Annotated[int, typer.Argument(help="Job id (printed by submit/run).", min=1)]


def _client(server: str | None, token: str | None) -> Any:
    from quantplan.service.client import Client

    if not server:
        raise QuantPlanError("no server given; pass --server URL or set QUANTPLAN_SERVER")
    return Client(server, token)


# ---------------------------------------------------------------------------------------------- client side


def submit_command(
    model: ModelOpt,
    data: DataOpt,
    budget_bits: BudgetBitsOpt = None,
    budget_mb: BudgetMbOpt = None,
    eval_data: EvalDataOpt = None,
    act_bits: ActBitsOpt = None,
    trials: TrialsOpt = None,
    eval_top: EvalTopOpt = None,
    materialize_top: MaterializeTopOpt = None,
    samples: SamplesOpt = None,
    seq_len: SeqLenOpt = None,
    eval_samples: EvalSamplesOpt = None,
    spec_file: SpecFileOpt = None,
    target: TargetOpt = None,
    fused_groups: FusedGroupsOpt = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    idempotency_key: Annotated[str | None, _Opt("--idempotency-key", help="Resubmitting with the same key returns "
                                                "the same job instead of a second one.")] = None,
    wait: Annotated[bool, _Opt("--wait", help="Follow the job's progress until it ends.")] = False,
    poll: Annotated[float, _Opt("--poll", min=0.1, help="Seconds between status polls with --wait.")] = 2.0,
    json_out: JsonOpt = False,
) -> None:
    """Submit a search job to a QuantPlan server; prints the job id (with --wait, follows it to the end)."""
    spec = spec_from_options(spec_file, locals())  # the server validates again; this fails early
    with _client(server, token) as client:
        job = client.submit(spec.to_json(), idempotency_key=idempotency_key)
        if not wait:
            if json_out:
                print_json(job)
            else:
                stdout.print(job["id"])
                stderr.print(f"job {job['id']} {job['status']}; follow it with `quantplan status {job['id']}`",
                             highlight=False)
            return
        job = follow(client, job["id"], poll=poll, progress=not json_out)
        plans = client.job_plans(job["id"]) if job["status"] == "succeeded" else []
    if json_out:
        print_json({"job": job, "plans": plans})
    else:
        rows = sorted(plans, key=lambda v: (v["perplexity"] is None, v["perplexity"] or 0.0))
        stdout.print(table_view(f"job {job['id']} {job['status']}: {len(plans)} plans", PLAN_COLUMNS,
                                [plan_row(v) for v in rows[:20]], PLAN_FORMATS))
    if job["status"] != "succeeded":
        raise QuantPlanError(f"job {job['id']} {job['status']}: {job['error'] or 'no error recorded'}")


def follow(client: Any, job_id: int, *, poll: float = 2.0, progress: bool = True) -> dict[str, Any]:
    """Poll a job until it is final, showing its stage and progress live."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("job {task.fields[job]} {task.description}"), BarColumn(),
                   TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), TextColumn("{task.fields[step]}"),
                   console=stderr, disable=not progress)
    with bar:
        task = bar.add_task("queued", total=1.0, job=job_id, step="")
        while True:
            job = client.job(job_id)
            bar.update(task, completed=job["progress"], description=f"{job['status']}: {job['stage'] or '-'}",
                       step=step_line(job))
            if job["status"] in FINAL:
                return job
            time.sleep(poll)


def status_command(job_id: JobArg, server: ServerOpt = None, token: TokenOpt = None, db: DbOpt = None,
                   json_out: JsonOpt = False) -> None:
    """A job's status, stage, progress and error (from --server, else the local database)."""
    _print_job(_job_call(job_id, server, token, db, cancel=False), json_out)


def cancel_command(job_id: JobArg, server: ServerOpt = None, token: TokenOpt = None, db: DbOpt = None,
                   json_out: JsonOpt = False) -> None:
    """Cancel a job: a queued one at once, a running one at its next stage."""
    _print_job(_job_call(job_id, server, token, db, cancel=True), json_out)


def _job_call(job_id: int, server: str | None, token: str | None, db: str | None, *, cancel: bool) -> dict:
    if server:
        with _client(server, token) as client:
            return client.cancel(job_id) if cancel else client.job(job_id)
    repo, _ = open_storage(db)
    return job_view(repo.cancel_job(job_id) if cancel else repo.get_job(job_id))


def _print_job(job: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(job)
        return
    keys = ("status", "stage", "progress", "attempts", "error", "submitter", "created_at", "started_at",
            "finished_at", "cancel_requested")
    rows = [{"field": k, "value": job[k]} for k in keys if job.get(k) is not None]
    if step_line(job):
        rows.insert(3, {"field": "step", "value": step_line(job)})
    rows.append({"field": "spec", "value": " ".join(f"{k}={v}" for k, v in job["spec"].items())})
    stdout.print(table_view(f"job {job['id']}", ("field", "value"), rows, {"progress": ".0%"}))


def download_command(
    plan_id: Annotated[int, typer.Argument(help="Plan id (from the leaderboard).", min=1)],
    out: Annotated[Path, _Opt("--out", "-o", help="Directory to create with the artifact.")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    overwrite: Annotated[bool, _Opt("--overwrite", help="Replace an existing directory.")] = False,
    format: FormatOpt = "quantplan",  # noqa: A002 - the option's name
    model_path: BaseModelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Download a plan's materialized artifact (sha256 verified), ready for `quantplan apply DIR --model M`; with
    --format compressed-tensors, the checkpoint vLLM serves (the server builds it once from the artifact; with
    --model, converted here from that base model instead)."""
    with _client(server, token) as client:
        model = (client.plan(plan_id)["plan"].get("model") or {}).get("name") or "<base model>"
        if model_path is None:
            result = {**client.download(plan_id, out, overwrite=overwrite, format=format), "format": format}
        else:
            got: dict[str, Any] = {}
            write_in_format(lambda d: got.update(client.download(plan_id, d, overwrite=overwrite)), out, format,
                            model=model_path, overwrite=overwrite)
            result = {**got, "out": str(out), "format": format}
    if json_out or format != "quantplan":
        print_written({**result, "model": model}, json_out)
        return
    stderr.print(f"wrote {result['out']} ({result['bytes']:,} bytes, sha256 {result['sha256'][:12]} verified); "
                 f"apply it with: quantplan apply {result['out']} --model {model}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------- server side


def serve_command(
    host: Annotated[str, _Opt("--host", help="Interface to listen on (0.0.0.0: all).")] = "127.0.0.1",
    port: Annotated[int, _Opt("--port", min=0, max=65535, help="TCP port.")] = 8000,
    db: DbOpt = None,
    artifacts: ArtifactsOpt = None,
    ray_address: RayOpt = None,
    runners: Annotated[int, _Opt("--runners", min=0, help="Job-runner processes to start beside the API (0: none; "
                                 "run `quantplan runner` elsewhere).")] = 1,
    heartbeat: Annotated[float, _Opt("--heartbeat", min=0.05, help="Runner heartbeat, seconds.")] = 10.0,
    stale_after: Annotated[float, _Opt("--stale-after", min=0.1, help="Requeue jobs silent this long.")] = 120.0,
) -> None:
    """Start the HTTP API (uvicorn) and job runners on one database, artifact store and Ray."""
    import uvicorn

    from quantplan.service.api import create_app
    from quantplan.storage import Repository

    settings = load_cli_settings(db, artifacts, ray_address)
    if not settings.tokens():
        token = secrets.token_urlsafe(24)
        settings = load_cli_settings(db, artifacts, ray_address, api_tokens=f"admin={token}:admin")
        stderr.print(f"no QUANTPLAN_API_TOKENS set: this server accepts writes with the generated token\n"
                     f"  export QUANTPLAN_TOKEN={token}", highlight=False)
    repo = Repository(settings=settings)  # migrates the schema once, before the runners start
    argv = [sys.executable, "-m", "quantplan.service.cli", "runner", "--heartbeat", str(heartbeat), "--stale-after",
            str(stale_after), "--parent-pid", str(os.getpid()), "--confined"]
    env = {"QUANTPLAN_DATABASE_URL": settings.database_url, "QUANTPLAN_ARTIFACTS": settings.artifacts}
    if settings.ray_address:  # through the environment: a database password stays out of `ps`
        env["QUANTPLAN_RAY_ADDRESS"] = settings.ray_address
    pool = RunnerPool(argv, runners, env)
    pool.start()
    try:
        # the pool stops in the app's shutdown: uvicorn re-raises SIGTERM/SIGINT after it, ending this process
        uvicorn.run(create_app(settings, repo=repo, on_shutdown=pool.stop), host=host, port=port, log_level="info",
                    timeout_graceful_shutdown=5)
    finally:
        pool.stop()
        repo.close()


class RunnerPool:
    """`n` runner child processes, restarted when one dies, stopped (SIGTERM, then SIGKILL) at shutdown."""

    def __init__(self, argv: list[str], n: int, env: dict[str, str], grace: float = 10.0) -> None:
        self.argv, self.n, self.env, self.grace = argv, n, env, grace
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watchdog, name="runner-watchdog", daemon=True)

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.n)]
        if self.n:
            self._watch.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(self.argv, env=env, start_new_session=True)
        log.info("started job runner pid %d", proc.pid)
        return proc

    def _watchdog(self) -> None:
        while not self._stop.wait(5.0):
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None and not self._stop.is_set():
                    log.error("job runner pid %d exited with %s; starting another", proc.pid, proc.returncode)
                    self.procs[i] = self._spawn()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # mid-job: its heartbeat stops and another runner requeues it
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
