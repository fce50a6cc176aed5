"""The repository API: every read and write of jobs, models, plans, metrics, artifacts and sensitivity tables.

Invariants (each kept by the code below and checked by tests/storage):

1. One method, one transaction: a method commits all of its writes or none (`Database.session`); database
   errors surface as `StorageError` after the rollback. Methods return frozen records, never live ORM rows.
2. A job moves queued -> running -> succeeded | failed | cancelled. `requeue_stale` moves a running job whose
   heartbeat is stale back to queued (or to failed once it has used `max_attempts` claims), `release_job` does the
   same for a job its owner gives back after a transient error; `cancel_job` moves
   a queued job to cancelled and flags a running one (`cancel_requested`) for its runner. Nothing else moves.
3. `claim_next_job` hands a queued job to exactly one claimer (PostgreSQL: `FOR UPDATE SKIP LOCKED`; SQLite:
   one `UPDATE ... WHERE id = (SELECT ...) AND status = 'queued'` under SQLite's single writer lock), oldest
   first, and counts the claim in `attempts`; `claim_job` claims one given queued job the same way.
4. A running job has one owner, the runner id that claimed it: only the owner may heartbeat, update, finish,
   fail or store plans for it; a runner whose job was requeued or cancelled gets `JobStateError`.
5. `create_job` with an idempotency key creates at most one job per key; a second call with the same key and
   spec returns the first job, with another spec it raises.
6. A job stores a plan at most once (unique job, plan sha256, which ignores the plan's `meta`); re-adding it
   returns the stored id and upserts its metrics. A metric is unique per (plan, name, dataset); `dataset` is ""
   when it has none.
7. A model is identified by its fingerprint; `upsert_model` updates the other fields of a known fingerprint.
8. A sensitivity table key is stored once; the first writer wins and later `put_table` calls return it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Select, bindparam, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from quantplan.settings import StorageSettings, load_settings
from quantplan.storage import migrate
from quantplan.storage.db import Database
from quantplan.storage.errors import InvalidRecordError, JobStateError, NotFoundError, StorageError
from quantplan.storage.models import (
    FINAL_STATUSES,
    ArtifactRow,
    Job,
    MetricRow,
    Model,
    PlanRow,
    SensitivityTableRow,
    utcnow,
)

PLAN_COLUMNS = ("avg_bits", "bytes", "act_bits", "predicted_loss", "created_at", "id")
MAX_PAGE = 1000


# ---------------------------------------------------------------------------------------------- records


def _record(cls: type, row: Any, **extra: Any) -> Any:
    names = [f.name for f in fields(cls) if f.name not in extra]
    return cls(**{n: getattr(row, n) for n in names}, **extra)


@dataclass(frozen=True)
class ModelRecord:
    id: int
    name: str
    revision: str | None
    fingerprint: str
    parameter_count: int | None
    architecture: str | None


@dataclass(frozen=True)
class JobRecord:
    id: int
    spec: dict[str, Any]
    status: str
    stage: str | None
    progress: float
    step_progress: dict[str, Any] | None
    error: str | None
    attempts: int
    runner: str | None
    cancel_requested: bool
    heartbeat_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    submitter: str | None
    idempotency_key: str | None


@dataclass(frozen=True)
class MetricRecord:
    name: str
    dataset: str
    value: float


@dataclass(frozen=True)
class ArtifactRecord:
    id: int
    plan_id: int
    kind: str
    uri: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class TableRecord:
    key: str
    artifact_uri: str
    sha256: str | None
    model_id: int | None


@dataclass(frozen=True)
class PlanRecord:
    id: int
    job_id: int | None
    model_id: int
    plan: dict[str, Any]
    plan_sha256: str
    avg_bits: float
    bytes: int
    act_bits: int
    predicted_loss: float | None
    is_pareto: bool
    created_at: datetime
    metrics: tuple[MetricRecord, ...] = ()
    artifacts: tuple[ArtifactRecord, ...] = ()

    def metric(self, name: str, dataset: str | None = None) -> float | None:
        """The value of metric `name` (on `dataset` when given); None when the plan has none."""
        values = [m.value for m in self.metrics if m.name == name and (dataset is None or m.dataset == dataset)]
        return min(values) if values else None


@dataclass(frozen=True)
class LeaderboardPage:
    total: int  # plans matching the filters, over all pages
    offset: int
    limit: int
    plans: tuple[PlanRecord, ...]


@dataclass(frozen=True)
class ModelSummary:
    """A model with what is stored for it: plans, jobs that stored them, its unquantized perplexity."""

    name: str
    model_ids: tuple[int, ...]  # every revision stored under the name
    plans: int
    jobs: int
    base_perplexity: float | None  # the smallest `base_perplexity` metric of its plans (None before a measurement)


@dataclass(frozen=True)
class StudyProgress:
    """Where an Optuna study of the shared database stands: finished trials and their values."""

    name: str
    trials: int
    values: tuple[tuple[float, float | None], ...]  # per finished trial: (first objective, its `avg_bits` attr)


@dataclass(frozen=True)
class RequeueResult:
    requeued: tuple[int, ...]
    failed: tuple[int, ...]
    cancelled: tuple[int, ...]


@dataclass(frozen=True)
class NewPlan:
    """A plan to store: its JSON (a mapping, or an object with `to_dict()` like `quant.plan.Plan`) and numbers.

    `metrics` maps a metric name, or a (name, dataset) pair, to its value.
    """

    plan: Any
    avg_bits: float
    bytes: int
    act_bits: int
    predicted_loss: float | None = None
    is_pareto: bool = False
    metrics: Mapping[str | tuple[str, str], float] = field(default_factory=dict)

    def plan_dict(self) -> dict[str, Any]:
        data = self.plan.to_dict() if hasattr(self.plan, "to_dict") else self.plan
        if not isinstance(data, Mapping):
            raise InvalidRecordError(f"a plan must be a mapping or have to_dict(), got {type(self.plan).__name__}")
        return dict(data)

    def validate(self) -> None:
        _check(_finite(self.avg_bits) and self.avg_bits > 0, f"avg_bits must be > 0, got {self.avg_bits!r}")
        _check(isinstance(self.bytes, int) and self.bytes >= 0, f"bytes must be an int >= 0, got {self.bytes!r}")
        _check(isinstance(self.act_bits, int) and 1 <= self.act_bits <= 32,
               f"act_bits must be an int in 1..32, got {self.act_bits!r}")
        _check(self.predicted_loss is None or _finite(self.predicted_loss),
               f"predicted_loss must be finite or None, got {self.predicted_loss!r}")
        for key, value in self.metrics.items():
            _check(isinstance(value, (int, float)) and not math.isnan(value),
                   f"metric {key!r} is {value!r}, not a number")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRecordError(message + "; fix the value before storing it")


def plan_sha256(plan: Mapping[str, Any]) -> str:
    """The sha256 of a plan's canonical JSON without its free-form `meta` (which job, which label): two plans that
    quantize alike hash alike. Key order is kept because `re:` patterns resolve in order."""
    content = {k: v for k, v in plan.items() if k != "meta"}
    text = json.dumps(content, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _metric_key(key: str | tuple[str, str]) -> tuple[str, str]:
    return (key, "") if isinstance(key, str) else (key[0], key[1] or "")


# ---------------------------------------------------------------------------------------------- repository


class Repository:
    """The documented storage API (see the module docstring for its invariants).

    `Repository(url)` opens a database and, unless `migrate=False`, brings its schema to the newest revision.
    """

    def __init__(self, url: str | None = None, *, settings: StorageSettings | None = None, migrate: bool = True):
        settings = settings or load_settings(**({"database_url": url} if url else {}))
        self.settings = settings
        self.db = Database(url or settings.database_url, settings)
        if migrate:
            self.migrate()

    def migrate(self) -> None:
        """Upgrade the schema to the newest revision (no-op when already there; safe in concurrent processes)."""
        migrate.ensure_current(self.db.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """The one session scope: commit on success, rollback on error, database errors as `StorageError`."""
        with self.db.session() as s:
            yield s

    def close(self) -> None:
        self.db.dispose()

    # ------------------------------------------------------------------ models

    def upsert_model(self, name: str, fingerprint: str, *, revision: str | None = None,
                     parameter_count: int | None = None, architecture: str | None = None) -> ModelRecord:
        """Insert the model, or update name/revision/size/architecture of a known fingerprint."""
        _check(bool(name) and bool(fingerprint), "a model needs a non-empty name and fingerprint")
        values = {"name": name, "revision": revision, "parameter_count": parameter_count,
                  "architecture": architecture}
        with self.session() as s:
            stmt = self._insert(s, Model).values(fingerprint=fingerprint, created_at=utcnow(), **values)
            s.execute(stmt.on_conflict_do_update(index_elements=["fingerprint"], set_=values))
            row = s.scalars(select(Model).where(Model.fingerprint == fingerprint)).one()
            return _record(ModelRecord, row)

    def get_model(self, model: int | str) -> ModelRecord:
        """A model by id, fingerprint or name (the newest of that name)."""
        with self.session() as s:
            return _record(ModelRecord, self._model_rows(s, model)[0])

    def model_summaries(self) -> list[ModelSummary]:
        """Every model name with stored plans, by name: its plan and job counts and unquantized perplexity."""
        with self.session() as s:
            rows = s.execute(select(Model.name, func.min(Model.id), func.count(PlanRow.id),
                                    func.count(PlanRow.job_id.distinct()))
                             .join(PlanRow, PlanRow.model_id == Model.id).group_by(Model.name)
                             .order_by(Model.name)).all()
            ids = {name: tuple(s.scalars(select(Model.id).where(Model.name == name).order_by(Model.id)))
                   for name, *_ in rows}
            base = dict(s.execute(select(Model.name, func.min(MetricRow.value))
                                  .join(PlanRow, PlanRow.model_id == Model.id)
                                  .join(MetricRow, MetricRow.plan_id == PlanRow.id)
                                  .where(MetricRow.name == "base_perplexity").group_by(Model.name)).all())
            return [ModelSummary(name, ids[name], plans, jobs, base.get(name)) for name, _, plans, jobs in rows]

    def study_progress(self, names: Sequence[str]) -> dict[str, StudyProgress]:
        """The finished trials of the named Optuna studies that share this database (absent: no such study).

        Read with SQL from Optuna's own tables (`studies`, `trials`, `trial_values`, `trial_user_attributes`), so
        a page can show a running search without loading Optuna."""
        if not names:
            return {}
        query = text(
            "SELECT s.study_name, t.trial_id, v.value, a.value_json FROM studies s "
            "JOIN trials t ON t.study_id = s.study_id AND t.state = 'COMPLETE' "
            "LEFT JOIN trial_values v ON v.trial_id = t.trial_id AND v.objective = 0 "
            "LEFT JOIN trial_user_attributes a ON a.trial_id = t.trial_id AND a.key = 'avg_bits' "
            "WHERE s.study_name IN :names").bindparams(bindparam("names", expanding=True))
        with self.session() as s:
            if not s.bind.dialect.has_table(s.connection(), "studies"):
                return {}
            found: dict[str, list[tuple[float, float | None]]] = {}
            for name, _, value, bits in s.execute(query, {"names": list(names)}):
                found.setdefault(name, []).append((value, None if bits is None else float(json.loads(bits))))
        return {name: StudyProgress(name, len(v), tuple(x for x in v if x[0] is not None)) for name, v in found.items()}

    # ------------------------------------------------------------------ jobs

    def create_job(self, spec: Mapping[str, Any], *, submitter: str | None = None,
                   idempotency_key: str | None = None) -> JobRecord:
        """A new queued job; with an idempotency key, the job already created under that key (same spec)."""
        spec = dict(spec)
        with self.session() as s:
            now = utcnow()
            values = {"spec": spec, "status": "queued", "progress": 0.0, "attempts": 0, "cancel_requested": False,
                      "submitter": submitter, "idempotency_key": idempotency_key, "created_at": now,
                      "updated_at": now}
            if idempotency_key is None:
                job = Job(**values)
                s.add(job)
                s.flush()
                return _record(JobRecord, job)
            s.execute(self._insert(s, Job).values(**values).on_conflict_do_nothing(index_elements=["idempotency_key"]))
            job = s.scalars(select(Job).where(Job.idempotency_key == idempotency_key)).one()
            if job.spec != spec:
                raise StorageError(f"idempotency key {idempotency_key!r} already names job {job.id} with another "
                                   "spec; use a new key for a different job")
            return _record(JobRecord, job)

    def get_job(self, job_id: int) -> JobRecord:
        with self.session() as s:
            return _record(JobRecord, self._job(s, job_id))

    def list_jobs(self, status: str | None = None, limit: int = 100) -> list[JobRecord]:
        """The newest `limit` jobs (of `status` when given), oldest first."""
        _check(1 <= limit <= MAX_PAGE, f"need 1 <= limit <= {MAX_PAGE}")
        with self.session() as s:
            query = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
            if status is not None:
                query = query.where(Job.status == status)
            return [_record(JobRecord, j) for j in reversed(list(s.scalars(query)))]

    def claim_next_job(self, runner: str) -> JobRecord | None:
        """Atomically move the oldest queued job to running, owned by `runner`; None when the queue is empty."""
        _check(bool(runner), "a runner id must be a non-empty string")
        with self.session() as s:
            now = utcnow()
            oldest = select(Job.id).where(Job.status == "queued").order_by(Job.created_at, Job.id).limit(1)
            if s.bind.dialect.name == "postgresql":
                job_id = s.scalar(oldest.with_for_update(skip_locked=True))
                if job_id is None:
                    return None
                where = Job.id == job_id
            else:  # SQLite: the write lock (BEGIN IMMEDIATE) serializes claimers; the status check is the guard
                where = Job.id == oldest.scalar_subquery()
            claimed = s.scalar(
                update(Job).where(where, Job.status == "queued")
                .values(status="running", runner=runner, attempts=Job.attempts + 1, heartbeat_at=now,
                        started_at=func.coalesce(Job.started_at, now), updated_at=now)
                .returning(Job.id)
            )
            return None if claimed is None else _record(JobRecord, s.get(Job, claimed, populate_existing=True))

    def claim_job(self, job_id: int, runner: str) -> JobRecord | None:
        """Claim one given queued job (e.g. the job `quantplan run` just created); None if it is not queued."""
        _check(bool(runner), "a runner id must be a non-empty string")
        with self.session() as s:
            now = utcnow()
            claimed = s.scalar(
                update(Job).where(Job.id == job_id, Job.status == "queued")
                .values(status="running", runner=runner, attempts=Job.attempts + 1, heartbeat_at=now,
                        started_at=func.coalesce(Job.started_at, now), updated_at=now)
                .returning(Job.id)
            )
            if claimed is None:
                self._job(s, job_id)  # a missing job is NotFoundError, not None
                return None
            return _record(JobRecord, s.get(Job, claimed, populate_existing=True))

    def release_job(self, job_id: int, runner: str, error: str, *, max_attempts: int = 3) -> JobRecord:
        """Give an owned job back after a transient failure: queued again (keeping its stage, so the next claim
        resumes), or failed with `error` once it has used `max_attempts` claims."""
        _check(max_attempts >= 1, f"max_attempts must be >= 1, got {max_attempts}")
        with self.session() as s:
            job = self._owned(s, job_id, runner)
            if job.attempts >= max_attempts:
                job.status, job.finished_at = "failed", utcnow()
                job.error = f"gave up after {job.attempts} attempts; last error: {error}"
            else:
                job.status, job.error = "queued", error
            job.runner, job.heartbeat_at = None, None
            s.flush()
            return _record(JobRecord, job)

    def heartbeat(self, job_id: int, runner: str) -> bool:
        """Refresh the heartbeat of a job `runner` owns; False when its cancellation was requested."""
        with self.session() as s:
            job = self._owned(s, job_id, runner)
            job.heartbeat_at = utcnow()
            return not job.cancel_requested

    def update_job(self, job_id: int, runner: str, *, stage: str | None = None, progress: float | None = None,
                   step: Mapping[str, Any] | None = None, error: str | None = None) -> JobRecord:
        """Record stage, progress (0..1), the running step's progress event (`quantplan.progress.ProgressEvent`
        as a dict; a new stage without one clears it) or a non-fatal error of an owned job; also refreshes its
        heartbeat."""
        _check(progress is None or (_finite(progress) and 0.0 <= progress <= 1.0),
               f"progress must be in [0, 1], got {progress!r}")
        _check(step is None or _valid_step(step), f"step progress needs done <= total, both >= 0: got {step!r}")
        with self.session() as s:
            job = self._owned(s, job_id, runner)
            if stage is not None and stage != job.stage and step is None:
                job.step_progress = None  # the last stage's step
            if step is not None:
                job.step_progress = dict(step)
            if stage is not None:
                job.stage = stage
            if progress is not None:
                job.progress = float(progress)
            if error is not None:
                job.error = error
            job.heartbeat_at = utcnow()
            s.flush()
            return _record(JobRecord, job)

    def finish_job(self, job_id: int, runner: str, *, cancelled: bool = False) -> JobRecord:
        """End an owned job: succeeded (progress 1), or cancelled when the runner honoured a cancel request."""
        with self.session() as s:
            job = self._owned(s, job_id, runner)
            job.status = "cancelled" if cancelled else "succeeded"
            if not cancelled:
                job.progress, job.error = 1.0, None
            job.finished_at = utcnow()
            s.flush()
            return _record(JobRecord, job)

    def fail_job(self, job_id: int, runner: str, error: str) -> JobRecord:
        """End an owned job as failed with `error` (the message a user reads)."""
        with self.session() as s:
            job = self._owned(s, job_id, runner)
            job.status, job.error, job.finished_at = "failed", error, utcnow()
            s.flush()
            return _record(JobRecord, job)

    def cancel_job(self, job_id: int) -> JobRecord:
        """Cancel a queued job now; flag a running one for its runner; leave a finished one as it is."""
        with self.session() as s:
            job = self._job(s, job_id, lock=True)
            if job.status == "queued":
                job.status, job.finished_at = "cancelled", utcnow()
            elif job.status == "running":
                job.cancel_requested = True
            s.flush()
            return _record(JobRecord, job)

    def requeue_stale(self, grace: timedelta | float, *, max_attempts: int = 3,
                      now: datetime | None = None) -> RequeueResult:
        """Requeue running jobs whose heartbeat is older than `grace`; fail those that used `max_attempts` claims.

        A requeued job keeps its stage, so the next runner resumes where it was; a cancel-requested one ends
        cancelled instead.
        """
        grace = grace if isinstance(grace, timedelta) else timedelta(seconds=grace)
        _check(max_attempts >= 1, f"max_attempts must be >= 1, got {max_attempts}")
        now = now or utcnow()
        cutoff = now - grace
        out: dict[str, list[int]] = {"queued": [], "failed": [], "cancelled": []}
        with self.session() as s:
            stale = select(Job).where(Job.status == "running", func.coalesce(Job.heartbeat_at, Job.started_at) < cutoff)
            if s.bind.dialect.name == "postgresql":
                stale = stale.with_for_update(skip_locked=True)
            for job in s.scalars(stale.order_by(Job.id)):
                lost = f"runner {job.runner} stopped heartbeating at stage {job.stage or 'start'}"
                if job.cancel_requested:
                    job.status, job.finished_at = "cancelled", now
                elif job.attempts >= max_attempts:
                    last = f"; last error: {job.error}" if job.error else ""
                    job.status, job.finished_at = "failed", now
                    job.error = f"gave up after {job.attempts} attempts: {lost}{last}"
                else:
                    job.status, job.error = "queued", lost
                job.runner, job.heartbeat_at = None, None
                out[job.status].append(job.id)
        return RequeueResult(tuple(out["queued"]), tuple(out["failed"]), tuple(out["cancelled"]))

    # ------------------------------------------------------------------ plans and metrics

    def add_plans(self, model_id: int, plans: Sequence[NewPlan], *, job_id: int | None = None,
                  runner: str | None = None) -> list[int]:
        """Store plans and their metrics in one transaction (all or nothing); the ids, in input order.

        With `runner`, the job must be running and owned by it. A plan the job already stored is not stored
        twice: its id is returned and its metrics are upserted.
        """
        for p in plans:
            p.validate()
        with self.session() as s:
            if runner is not None:
                self._owned(s, job_id, runner)  # type: ignore[arg-type]
            elif job_id is not None:
                self._job(s, job_id)
            if s.get(Model, model_id) is None:
                raise NotFoundError(f"model {model_id} is not stored; call upsert_model first")
            return [self._store_plan(s, model_id, job_id, p) for p in plans]

    def add_plan(self, model_id: int, plan: NewPlan, **kwargs: Any) -> int:
        return self.add_plans(model_id, [plan], **kwargs)[0]

    def _store_plan(self, s: Session, model_id: int, job_id: int | None, new: NewPlan) -> int:
        data = new.plan_dict()
        digest = plan_sha256(data)
        row = None
        if job_id is not None:
            row = s.scalars(select(PlanRow).where(PlanRow.job_id == job_id, PlanRow.plan_sha256 == digest)).first()
        if row is None:
            row = PlanRow(job_id=job_id, model_id=model_id, plan=data, plan_sha256=digest,
                          avg_bits=float(new.avg_bits), bytes=new.bytes, act_bits=new.act_bits,
                          predicted_loss=new.predicted_loss, is_pareto=new.is_pareto, created_at=utcnow())
            s.add(row)
            s.flush()
        _store_metrics(s, row.id, new.metrics)
        return row.id

    def set_metrics(self, plan_id: int, metrics: Mapping[str | tuple[str, str], float]) -> None:
        """Upsert measured metrics of a stored plan (one transaction)."""
        NewPlan(plan={}, avg_bits=1.0, bytes=0, act_bits=8, metrics=metrics).validate()
        with self.session() as s:
            self._plan(s, plan_id)
            _store_metrics(s, plan_id, metrics)

    def get_plan(self, plan_id: int) -> PlanRecord:
        """A plan with its metrics and artifacts."""
        with self.session() as s:
            return self._plan_records(s, [self._plan(s, plan_id)])[0]

    def plans_for_job(self, job_id: int) -> list[PlanRecord]:
        with self.session() as s:
            rows = list(s.scalars(select(PlanRow).where(PlanRow.job_id == job_id).order_by(PlanRow.id)))
            return self._plan_records(s, rows)

    def leaderboard(self, model: int | str, *, max_avg_bits: float | None = None, max_bytes: int | None = None,
                    act_bits: int | None = None, sort: str = "predicted_loss", dataset: str | None = None,
                    order: Literal["asc", "desc"] = "asc", pareto_only: bool = False, limit: int = 20,
                    offset: int = 0, distinct: bool = False) -> LeaderboardPage:
        """Plans of a model (id, fingerprint, or name: every revision), filtered, sorted and paged.

        `sort` is a plan column (avg_bits, bytes, act_bits, predicted_loss, created_at, id) or a metric name
        (on `dataset` when given; otherwise its smallest value over datasets). Plans without the sort value
        come last; ties break by plan id, so pages are stable. With `distinct`, a plan that several jobs stored
        (same plan JSON) is listed once: its first stored copy.
        """
        _check(order in ("asc", "desc"), f"order must be 'asc' or 'desc', got {order!r}")
        _check(1 <= limit <= MAX_PAGE and offset >= 0, f"need 1 <= limit <= {MAX_PAGE} and offset >= 0")
        with self.session() as s:
            model_ids = [m.id for m in self._model_rows(s, model)]
            query = select(PlanRow).where(PlanRow.model_id.in_(model_ids))
            if max_avg_bits is not None:
                query = query.where(PlanRow.avg_bits <= max_avg_bits)
            if max_bytes is not None:
                query = query.where(PlanRow.bytes <= max_bytes)
            if act_bits is not None:
                query = query.where(PlanRow.act_bits == act_bits)
            if pareto_only:
                query = query.where(PlanRow.is_pareto.is_(True))
            if distinct:
                other = aliased(PlanRow)
                first = (select(func.min(other.id))
                         .where(other.plan_sha256 == PlanRow.plan_sha256, other.model_id.in_(model_ids))
                         .correlate(PlanRow).scalar_subquery())
                query = query.where(PlanRow.id == first)
            total = s.scalar(select(func.count()).select_from(query.subquery())) or 0
            key = _sort_key(sort, dataset)
            key = key.asc() if order == "asc" else key.desc()
            rows = list(s.scalars(query.order_by(key.nulls_last(), PlanRow.id).limit(limit).offset(offset)))
            return LeaderboardPage(total, offset, limit, tuple(self._plan_records(s, rows)))

    # ------------------------------------------------------------------ artifacts and sensitivity tables

    def record_artifact(self, plan_id: int, kind: str, uri: str, sha256: str, size: int) -> ArtifactRecord:
        """Record the artifact of `kind` for a plan; a second record of the same kind replaces the first."""
        _check(len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256), f"bad sha256 {sha256!r}")
        _check(isinstance(size, int) and size >= 0, f"artifact size must be an int >= 0, got {size!r}")
        with self.session() as s:
            self._plan(s, plan_id)
            values = {"uri": uri, "sha256": sha256, "bytes": size}
            stmt = self._insert(s, ArtifactRow).values(plan_id=plan_id, kind=kind, created_at=utcnow(), **values)
            s.execute(stmt.on_conflict_do_update(index_elements=["plan_id", "kind"], set_=values))
            row = s.scalars(select(ArtifactRow).where(ArtifactRow.plan_id == plan_id, ArtifactRow.kind == kind)).one()
            return _record(ArtifactRecord, row)

    def get_table(self, key: str) -> TableRecord | None:
        """The sensitivity table stored under `key`, or None."""
        with self.session() as s:
            row = s.scalars(select(SensitivityTableRow).where(SensitivityTableRow.key == key)).first()
            return None if row is None else _record(TableRecord, row)

    def put_table(self, key: str, artifact_uri: str, *, sha256: str | None = None,
                  model_id: int | None = None) -> TableRecord:
        """Store a sensitivity table's artifact under `key`; if the key exists, the stored one is returned."""
        _check(bool(key) and bool(artifact_uri), "a sensitivity table needs a key and an artifact URI")
        with self.session() as s:
            stmt = self._insert(s, SensitivityTableRow).values(
                key=key, artifact_uri=artifact_uri, sha256=sha256, model_id=model_id, created_at=utcnow())
            s.execute(stmt.on_conflict_do_nothing(index_elements=["key"]))
            row = s.scalars(select(SensitivityTableRow).where(SensitivityTableRow.key == key)).one()
            return _record(TableRecord, row)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _insert(s: Session, table: type) -> Any:
        dialect = postgresql if s.bind.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    @staticmethod
    def _job(s: Session, job_id: int, *, lock: bool = False) -> Job:
        query = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
        job = s.scalars(query.with_for_update() if lock else query).first()
        if job is None:
            raise NotFoundError(f"job {job_id} does not exist; list jobs to find its id")
        return job

    def _owned(self, s: Session, job_id: int, runner: str) -> Job:
        job = self._job(s, job_id, lock=True)
        if job.status != "running" or job.runner != runner:
            raise JobStateError(f"job {job_id} is {job.status} and owned by {job.runner or 'no runner'}, not "
                                f"{runner}; stop working on it (it was requeued, cancelled or finished)")
        return job

    @staticmethod
    def _plan(s: Session, plan_id: int) -> PlanRow:
        row = s.get(PlanRow, plan_id)
        if row is None:
            raise NotFoundError(f"plan {plan_id} does not exist; see the leaderboard for plan ids")
        return row

    @staticmethod
    def _model_rows(s: Session, model: int | str) -> list[Model]:
        if isinstance(model, int):
            rows = list(s.scalars(select(Model).where(Model.id == model)))
        else:
            rows = list(s.scalars(select(Model).where((Model.name == model) | (Model.fingerprint == model))
                                  .order_by(Model.created_at.desc(), Model.id.desc())))
        if not rows:
            known = ", ".join(sorted(set(s.scalars(select(Model.name))))) or "none yet"
            raise NotFoundError(f"no model {model!r} is stored (models: {known}); run a job for it first")
        return rows

    @staticmethod
    def _plan_records(s: Session, rows: Sequence[PlanRow]) -> list[PlanRecord]:
        ids = [r.id for r in rows]
        metrics: dict[int, list[MetricRecord]] = {i: [] for i in ids}
        artifacts: dict[int, list[ArtifactRecord]] = {i: [] for i in ids}
        if ids:
            # plain rows, not ORM objects: a leaderboard page reads thousands of metrics
            for plan_id, name, dataset, value in s.execute(
                    select(MetricRow.plan_id, MetricRow.name, MetricRow.dataset, MetricRow.value)
                    .where(MetricRow.plan_id.in_(ids)).order_by(MetricRow.id)):
                metrics[plan_id].append(MetricRecord(name, dataset, value))
            for a in s.scalars(select(ArtifactRow).where(ArtifactRow.plan_id.in_(ids)).order_by(ArtifactRow.id)):
                artifacts[a.plan_id].append(_record(ArtifactRecord, a))
        return [_record(PlanRecord, r, metrics=tuple(metrics[r.id]), artifacts=tuple(artifacts[r.id]))
                for r in rows]


def _store_metrics(s: Session, plan_id: int, metrics: Mapping[str | tuple[str, str], float]) -> None:
    for key, value in metrics.items():
        name, dataset = _metric_key(key)
        row = s.scalars(select(MetricRow).where(MetricRow.plan_id == plan_id, MetricRow.name == name,
                                                MetricRow.dataset == dataset)).first()
        if row is None:
            s.add(MetricRow(plan_id=plan_id, name=name, dataset=dataset, value=float(value)))
        else:
            row.value = float(value)
    s.flush()


def _sort_key(sort: str, dataset: str | None) -> Any:
    if sort in PLAN_COLUMNS:
        return getattr(PlanRow, sort)
    query: Select[Any] = select(func.min(MetricRow.value)).where(MetricRow.plan_id == PlanRow.id,
                                                                 MetricRow.name == sort)
    if dataset is not None:
        query = query.where(MetricRow.dataset == dataset)
    return query.correlate(PlanRow).scalar_subquery()


def final(status: str) -> bool:
    """Whether a job status is terminal."""
    return status in FINAL_STATUSES


def _valid_step(step: Mapping[str, Any]) -> bool:
    done, total = step.get("done"), step.get("total")
    numbers = [v for v in (step.get("elapsed"), step.get("rate"), step.get("eta")) if v is not None]
    return (isinstance(done, int) and isinstance(total, int) and 0 <= done <= total
            and all(isinstance(v, int | float) and _finite(v) and v >= 0 for v in numbers))
