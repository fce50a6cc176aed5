"""The job runner: claims queued search jobs and runs sensitivity -> search -> store -> materialize on Ray.

One job, five stages, each resumable after a crash (a restarted runner skips what is already done):

- `load`: the model, calibration set and evaluation windows (`service.pipeline.load_spec` of the spec, validated
  when it was parsed), the model registered (`models`).
- `sensitivity`: the Fisher table on Ray workers. Kept: the table is cached by (fingerprint, calibration,
  estimator) and archived (`sensitivity_tables` + the artifact store), so a resumed job reuses it.
- `search`: knapsack + the Optuna study `job-<id>` in the project database + measured re-scoring. Kept: the
  finished trials; the study continues up to `trials`.
- `store`: the Pareto set and the baselines with their metrics, one transaction. Plans are unique per
  (job, plan), so a rerun stores nothing twice.
- `materialize`: the best measured plans packed, measured again, archived in the artifact store. A plan that
  already has its `packed` artifact is skipped.

Progress: every stage reports its steps (`quantplan.progress`: windows of the sensitivity pass across the Ray
workers, layers of the weight costs, trials, windows of each measurement, layers and windows of materialize);
the latest event of the running step is stored with the job (`jobs.step_progress`, at most every
`PROGRESS_WRITE_S` seconds and at the end of every step) with the job's overall `progress`, and each event
honours a cancel request at once. `quantplan status`, `GET /v1/jobs/{id}` and `--wait` show it.

While a job runs, a heartbeat thread refreshes `jobs.heartbeat_at` every `heartbeat_interval` seconds. A runner
that dies stops heartbeating; any runner's `requeue_stale` puts the job back in the queue after `stale_after`
seconds (failed once it has used `max_attempts` claims). A cancel request is honoured at the next progress
event (every few seconds of work) or stage boundary. Bad input (a spec that does not validate, a model that
does not load, an infeasible budget) fails the job at once with the `QuantPlanError` message; any other error
gives the job back for another attempt. A transient database error (unreachable, lock timeout, a concurrent
schema creation) and a runner told to stop (SIGTERM) give the job back without counting toward `max_attempts`.

A confined runner (`RunnerConfig.confined`: the runners of `quantplan serve`) checks each job's model and data
against the server's roots again when it starts the job, and loads safetensors weights only (`service.confine`).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quantplan.errors import ModelLoadError, QuantPlanError
from quantplan.progress import Listener, Progress, ProgressEvent, RichBars
from quantplan.service.confine import HUB_ID, check_safetensors, confine
from quantplan.service.jobs import JobSpec
from quantplan.service.pipeline import RunOptions, SearchInputs, SearchReport, load_spec, search_stage, to_materialize
from quantplan.settings import causes, from_database
from quantplan.storage import DatabaseUnavailableError, JobRecord, JobStateError, NewPlan, Repository, transient
from quantplan.storage.artifacts import ArtifactStore
from quantplan.storage.db import safe_url

if TYPE_CHECKING:
    from quantplan.quant.schemes import LayerScheme
    from quantplan.search.problem import Candidate
    from quantplan.workers.pipeline import Loaded
    from quantplan.workers.table import SensitivityTable

log = logging.getLogger("quantplan.service.runner")

STAGES = ("load", "sensitivity", "search", "store", "materialize")
PROGRESS = {"load": 0.0, "sensitivity": 0.05, "search": 0.35, "store": 0.75, "materialize": 0.8, "end": 1.0}
PROGRESS_WRITE_S = 1.0  # the job record gets a step's progress at most this often (and at the step's end)
PACKED = "packed"  # artifact kind of a materialized plan directory (tar archive in the store)


class Cancelled(Exception):
    """The job's cancellation was requested; the runner ends it as cancelled."""


class Lost(Exception):
    """The job is no longer ours (requeued after a stale heartbeat, or finished elsewhere)."""


class Stopped(Exception):
    """The runner was told to stop (SIGTERM, Ctrl-C): the job goes back to the queue for another runner."""


UNCOUNTED = 2**31 - 1  # `max_attempts` of a release that must not fail the job (a stop, a database outage)


def default_runner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class RunnerConfig:
    heartbeat_interval: float = 10.0  # seconds between heartbeats of a running job
    stale_after: float = 120.0  # a running job without a heartbeat for this long is requeued
    max_attempts: int = 3  # claims before a job that keeps failing is marked failed
    ray_address: str | None = None
    confined: bool = False  # a server's runner: model and data inside the roots, safetensors only


class Runner:
    """Runs search jobs from `repo`, archiving artifacts in `store` (see the module docstring)."""

    def __init__(self, repo: Repository, store: ArtifactStore, *, runner_id: str | None = None,
                 config: RunnerConfig | None = None, progress: bool = False,
                 listeners: Sequence[Listener] = ()) -> None:
        self.repo = repo
        self.store = store
        self.id = runner_id or default_runner_id()
        self.config = config or RunnerConfig(ray_address=repo.settings.ray_address)
        self.progress = progress  # rich bars on stderr
        self.listeners = tuple(listeners)  # more listeners of every job's progress (after the job record's)
        self.stopping = threading.Event()  # set: the running job goes back to the queue at its next check

    # ------------------------------------------------------------------ loop

    def run_once(self) -> JobRecord | None:
        """Requeue stale jobs, claim the oldest queued job and run it; the job's final record, None if idle."""
        requeued = self.repo.requeue_stale(self.config.stale_after, max_attempts=self.config.max_attempts)
        for job_id in requeued.requeued:
            log.warning("job %d: its runner stopped heartbeating; requeued", job_id)
        for job_id in requeued.failed:
            log.error("job %d: failed after %d attempts", job_id, self.config.max_attempts)
        job = self.repo.claim_next_job(self.id)
        return None if job is None else self.execute(job)

    def run_job(self, job_id: int) -> JobRecord:
        """Claim the given queued job and run it in this process (`quantplan run`)."""
        job = self.repo.claim_job(job_id, self.id)
        if job is None:
            current = self.repo.get_job(job_id)
            raise QuantPlanError(f"job {job_id} is {current.status}, not queued; only a queued job can be run")
        return self.execute(job)

    def serve(self, stop: threading.Event, *, poll: float = 2.0, max_jobs: int | None = None) -> int:
        """Run jobs until `stop` is set (or `max_jobs` ran); returns how many ran. Storage outages are retried."""
        done = 0
        self.stopping = stop
        log.info("runner %s: polling %s every %.1f s", self.id, safe_url(self.repo.db.url), poll)
        while not stop.is_set() and (max_jobs is None or done < max_jobs):
            try:
                ran = self.run_once()
            except QuantPlanError as e:  # e.g. the database is down: wait and try again
                log.error("runner %s: %s", self.id, e)
                ran = None
            if ran is None:
                stop.wait(poll)
            else:
                done += 1
        return done

    # ------------------------------------------------------------------ one job

    def execute(self, job: JobRecord) -> JobRecord:
        """Run a job this runner has claimed, to succeeded, failed, cancelled or requeued."""
        log.info("job %d: attempt %d, resuming at %s", job.id, job.attempts, job.stage or "the start")
        with _Heartbeat(self.repo, job.id, self.id, self.config.heartbeat_interval, self.stopping) as beat:
            try:
                JobRun(self, job, beat).run()
            except Cancelled:
                log.info("job %d: cancelled", job.id)
                return self._end(job.id, lambda: self.repo.finish_job(job.id, self.id, cancelled=True))
            except (Lost, JobStateError):
                log.warning("job %d: lost to another runner or requeued; dropping it", job.id)
                return self.repo.get_job(job.id)
            except Stopped:
                log.warning("job %d: runner stopping; the job goes back to the queue", job.id)
                return self._release(job.id, "the runner was stopped; another runner resumes the job", UNCOUNTED)
            except Exception as e:
                return self._failed(job, e)
        log.info("job %d succeeded", job.id)
        return self._end(job.id, lambda: self.repo.finish_job(job.id, self.id))

    def _failed(self, job: JobRecord, e: Exception) -> JobRecord:
        """Bad input fails the job; a database outage releases it uncounted; any other crash (of ours or of a
        worker) releases it for another attempt."""
        if transient(e):
            log.warning("job %d: transient database error, released for another attempt: %s", job.id, e)
            return self._release(job.id, "a database error interrupted the job; it is retried", UNCOUNTED)
        if any(isinstance(c, pickle.UnpicklingError) for c in causes(e)):  # torch refused a pickle: bad input
            e = ModelLoadError(f"the model's checkpoint is a pickle file that torch refused to load ({e}); save "
                               "the model as safetensors (`save_pretrained(dir, safe_serialization=True)`)")
        error = _message(job.id, e)
        if isinstance(e, QuantPlanError):
            log.error("job %d failed: %s", job.id, e)
            return self._end(job.id, lambda: self.repo.fail_job(job.id, self.id, error))
        log.exception("job %d: %s", job.id, e)
        return self._release(job.id, error, self.config.max_attempts)

    def _release(self, job_id: int, message: str, max_attempts: int) -> JobRecord:
        return self._end(job_id, lambda: self.repo.release_job(job_id, self.id, message, max_attempts=max_attempts))

    def _end(self, job_id: int, end: Callable[[], JobRecord], tries: int = 6) -> JobRecord:
        """`end()`, retried with backoff (1, 2, 4, ... s) while the database is unreachable; after that the
        job's heartbeat has stopped and any runner requeues it once it is stale."""
        for attempt in range(tries):
            try:
                return end()
            except JobStateError:  # requeued or finished elsewhere meanwhile
                return self.repo.get_job(job_id)
            except DatabaseUnavailableError as e:
                if attempt == tries - 1:
                    raise
                log.warning("job %d: cannot record its end yet (%s); retrying", job_id, e)
                time.sleep(2**attempt)
        raise AssertionError("unreachable")


def _message(job_id: int, e: Exception) -> str:
    """The error a job's users read: ours as it is; the database's (its URL, host, schema) only in the log, under
    a reference the message gives."""
    if from_database(e):
        reference = uuid.uuid4().hex[:16]
        log.error("job %d: reference %s: %s: %s", job_id, reference, type(e).__name__, e)
        return f"a database error stopped the job (reference {reference}); the operator finds it in the runner's log"
    return str(e) if isinstance(e, QuantPlanError) else f"{type(e).__name__}: {e}"


class _Heartbeat:
    """A daemon thread that heartbeats one job; `check()` raises `Cancelled` / `Lost` for the job's thread."""

    def __init__(self, repo: Repository, job_id: int, runner: str, interval: float,
                 stopping: threading.Event | None = None) -> None:
        self.repo, self.job_id, self.runner, self.interval = repo, job_id, runner, interval
        self.stopping = stopping or threading.Event()
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.repo.heartbeat(self.job_id, self.runner):
                    self.cancelled.set()
            except JobStateError:
                self.lost.set()
                return
            except QuantPlanError as e:  # the database is unreachable for a moment: keep trying
                log.warning("job %d: heartbeat failed: %s", self.job_id, e)

    def check(self) -> None:
        if self.lost.is_set():
            raise Lost
        if self.cancelled.is_set():
            raise Cancelled
        if self.stopping.is_set():
            raise Stopped


class JobRun:
    """The stages of one claimed job (state shared between them lives here)."""

    def __init__(self, runner: Runner, job: JobRecord, beat: _Heartbeat) -> None:
        self.runner, self.repo, self.store = runner, runner.repo, runner.store
        self.job, self.beat = job, beat
        self.spec = JobSpec.parse(job.spec)
        if runner.config.confined:
            self.spec = _confined(self.spec, self.repo)
        self.address = runner.config.ray_address
        self.model_id = 0  # the `models` row, set by the load stage
        self.recorder = _JobProgress(self)
        bars = [RichBars()] if runner.progress else []
        self.progress = Progress(self.recorder, *runner.listeners, *bars)
        self._bars = bars

    def stage(self, name: str, progress: float | None = None) -> Progress:
        """Record the stage (and progress) of the job; honour a cancel request or a lost job. Returns the
        Progress the stage reports to."""
        self.beat.check()
        try:
            if not self.repo.heartbeat(self.job.id, self.runner.id):
                raise Cancelled  # before the stage starts: the job stays at the last stage it worked on
            self.repo.update_job(self.job.id, self.runner.id, stage=name, progress=progress)
        except JobStateError:
            raise Lost from None
        log.info("job %d: %s", self.job.id, name)
        return self.progress.at(name)

    def run(self) -> None:
        """The stages in order; the spec was validated (budget, space, data syntax) when it was parsed."""
        try:
            progress = self.stage("load", PROGRESS["load"])
            loaded = self._load(progress)
            progress = self.stage("sensitivity", PROGRESS["sensitivity"])
            inputs = self._sensitivity(loaded, progress)
            progress = self.stage("search", PROGRESS["search"])
            report = self._search(inputs, progress)
            progress = self.stage("store", PROGRESS["store"])
            plan_ids = self._store(loaded, report, progress)
            progress = self.stage("materialize", PROGRESS["materialize"])
            self._materialize(loaded, report, plan_ids, progress)
        finally:
            for bars in self._bars:
                bars.close()

    # ------------------------------------------------------------------ stages

    def _load(self, progress: Progress) -> Loaded:
        """The model with its calibration set and evaluation windows, registered in `models`."""
        from quantplan.workers.pipeline import load

        spec = self.spec
        step = progress.step("model and data", 1, "steps")
        loaded = load(load_spec(spec))
        step.finish()
        identity = loaded.identity
        model = self.repo.upsert_model(spec.model, loaded.fingerprint, revision=identity["revision"],
                                       parameter_count=identity["parameters"],
                                       architecture=identity["architecture"])
        self.model_id = model.id
        return loaded

    def _sensitivity(self, loaded: Loaded, progress: Progress) -> SearchInputs:
        from quantplan.workers.pipeline import loaded_table

        self._fetch_table(loaded)
        table, cached = loaded_table(loaded, workers=self.spec.workers, address=self.address, progress=progress)
        if cached:  # nothing was computed: say so in the progress too
            progress.step("sensitivity table (cached)", 1, "tables").finish()
        log.info("job %d: sensitivity table %s (%s)", self.job.id, table.key, "reused" if cached else "computed")
        self._keep_table(table)
        return SearchInputs.from_loaded(loaded, table)

    def _fetch_table(self, loaded: Loaded) -> None:
        """A table another runner stored (e.g. on another machine) goes into the local cache, so it is reused."""
        from quantplan.workers.pipeline import cached_table_path, table_identity

        assert loaded.calibration is not None
        key = table_identity(loaded.net, loaded.calibration, fingerprint=loaded.fingerprint)[0]
        path = cached_table_path(key)
        record = self.repo.get_table(key)
        if path.is_file() or record is None or record.sha256 is None or not self.store.exists(record.sha256):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.store.get_file(record.sha256, path)
        log.info("job %d: sensitivity table %s fetched from the artifact store", self.job.id, key)

    def _keep_table(self, table: SensitivityTable) -> None:
        """Archive the table in the artifact store and index it by key (first writer wins)."""
        if self.repo.get_table(table.key) is not None:
            return
        with tempfile.TemporaryDirectory(prefix="quantplan-table-") as tmp:
            stored = self.store.put_file(table.save(Path(tmp) / "table.safetensors"))
        self.repo.put_table(table.key, stored.uri, sha256=stored.sha256, model_id=self.model_id)

    def _search(self, inputs: SearchInputs, progress: Progress) -> SearchReport:
        run = RunOptions(address=self.address, progress=progress, study=f"job-{self.job.id}",
                         storage=self.repo.db.url)
        return search_stage(inputs, self.spec, run, on_trial=self._on_trial)

    def _on_trial(self, _done: int, _total: int) -> None:
        """Between Optuna trials: honour a cancel (the heartbeat thread saw it)."""
        self.beat.check()

    def _store(self, loaded: Loaded, report: SearchReport,
               progress: Progress) -> dict[tuple[LayerScheme, ...], int]:
        """The Pareto set and the references with their predictions and measurements, in one transaction."""
        dataset = str(loaded.eval_data)
        candidates: dict[tuple[LayerScheme, ...], Candidate] = {}
        for c in report.candidates():
            candidates.setdefault(c.schemes, c)
        pareto = {c.schemes for c in report.result.pareto}
        new = []
        for c in candidates.values():
            measured = report.measured.get(c.label) or {}
            metrics = {(name, dataset): float(measured[key]) for key in ("perplexity", "kl") if key in measured
                       for name in (key, f"{key}_simulated")}  # the materialized model's replace the first
            plan = report.problem.plan(c, meta={"job": self.job.id, "label": c.label, "recipe": c.recipe})
            new.append(NewPlan(plan, c.avg_bits, c.bytes, c.act_bits, c.predicted_loss, c.schemes in pareto,
                               metrics))
        step = progress.step("plans", len(new), "plans")
        ids = self.repo.add_plans(self.model_id, new, job_id=self.job.id, runner=self.runner.id)
        step.finish()
        log.info("job %d: stored %d plans (%d on the Pareto front)", self.job.id, len(ids), len(pareto))
        return dict(zip(candidates, ids, strict=True))  # per-layer schemes -> plan id

    def _materialize(self, loaded: Loaded, report: SearchReport, plan_ids: dict[tuple[LayerScheme, ...], int],
                     progress: Progress) -> None:
        """Pack the best measured plans (best first), measure the real artifacts, archive them."""
        from quantplan.workers.pipeline import materialize

        chosen = to_materialize(report, self.spec.materialize_top)
        pending = [c for c in chosen if not self._has_artifact(plan_ids[c.schemes])]
        if not pending:
            return
        assert loaded.windows is not None
        base = report.base  # the unquantized model on these windows, as the search measured it (else: in the pass)
        dataset = str(loaded.eval_data)
        for i, candidate in enumerate(pending):
            if i > 0:  # the stage itself was entered (and logged) before the first plan
                self.stage("materialize", PROGRESS["materialize"] + 0.2 * i / len(pending))
            plan_id = plan_ids[candidate.schemes]
            plan = report.problem.plan(candidate, meta={"job": self.job.id, "plan_id": plan_id})
            with _scratch() as tmp:
                out = tmp / "artifact"
                _, real = materialize(loaded, plan, out, base_result=base, progress=progress,
                                      workers=self.spec.workers, address=self.address, stats=report.stats)
                stored = self.store.put_dir(out)
            self.repo.set_metrics(plan_id, {("perplexity", dataset): real.perplexity, ("kl", dataset): real.kl,
                                            ("base_perplexity", dataset): real.base_perplexity,
                                            "artifact_bytes": float(stored.size)})
            self.repo.record_artifact(plan_id, PACKED, stored.uri, stored.sha256, stored.size)
            log.info("job %d: plan %d materialized (perplexity %.3f, kl %.4f, %s bytes archived)", self.job.id,
                     plan_id, real.perplexity, real.kl, f"{stored.size:,}")

    def _has_artifact(self, plan_id: int) -> bool:
        return any(a.kind == PACKED for a in self.repo.get_plan(plan_id).artifacts)


def _confined(spec: JobSpec, repo: Repository) -> JobSpec:
    """The spec checked against the server's roots again (they may have changed since the submission), with a
    local model in safetensors only; a `QuantPlanError` (the job fails, not retried) otherwise."""
    spec = confine(spec, repo.settings)
    if HUB_ID.match(spec.model) and Path(spec.model).exists():  # a hub id must not name a path of the runner's
        raise QuantPlanError(f"model {spec.model!r} is taken for a Hugging Face hub id, but this runner would read "
                             "it as a local path; use an absolute path inside the model roots")
    check_safetensors(spec.model)
    return spec


@contextmanager
def _scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="quantplan-job-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class _JobProgress:
    """The runner's progress listener: stores the latest event of a step with the job (at most every
    PROGRESS_WRITE_S seconds; a step's first event, its first with a unit done and its last always) with the
    job's overall progress, and honours a cancel request (or a lost job) at every event."""

    def __init__(self, run: JobRun) -> None:
        self.run = run
        self.written: dict[tuple[str, str], float] = {}  # (stage, step) -> when its event was last written
        self.moved: set[tuple[str, str]] = set()  # steps whose first counted unit was written
        self.overall = 0.0

    def __call__(self, event: ProgressEvent) -> None:
        run = self.run
        run.beat.check()
        key, now = (event.stage, event.step), time.monotonic()
        last = self.written.get(key)
        first_unit = event.done > 0 and key not in self.moved  # the step has started moving: say so at once
        if last is not None and not event.finished and not first_unit and now - last < PROGRESS_WRITE_S:
            return
        self.written[key] = now
        if event.done > 0:
            self.moved.add(key)
        self.overall = max(self.overall, _overall(event))
        try:
            record = run.repo.update_job(run.job.id, run.runner.id, progress=self.overall, step=event.to_dict())
        except JobStateError:
            raise Lost from None
        if record.cancel_requested:  # seen on the record itself: no need to wait for the heartbeat thread
            raise Cancelled


def _overall(event: ProgressEvent) -> float:
    """The job's fraction done: the stage's share of PROGRESS, advanced by the step's fraction within it."""
    if event.stage not in STAGES:
        return 0.0
    start = PROGRESS[event.stage]
    end = list(PROGRESS.values())[list(PROGRESS).index(event.stage) + 1]
    return start + (end - start) * (event.done / event.total if event.total else 1.0)
