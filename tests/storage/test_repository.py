"""The repository invariants, on SQLite and PostgreSQL (the `repo` fixture runs each test on both)."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select

import quantplan.storage.repository as repository
from quantplan.errors import QuantPlanError
from quantplan.storage import (
    InvalidRecordError,
    JobStateError,
    NewPlan,
    NotFoundError,
    Repository,
    StorageError,
)
from quantplan.storage.models import Job, MetricRow, Model, PlanRow, utcnow


def _count(repo: Repository, table: type) -> int:
    with repo.session() as s:
        return s.scalar(select(func.count()).select_from(table)) or 0


def _plan(i: int, **kw: object) -> NewPlan:
    values: dict = {"avg_bits": 4.0 + i, "bytes": 1000 * (i + 1), "act_bits": 8, "predicted_loss": 0.1 * i,
                    "metrics": {"perplexity": 10.0 + i}}
    values.update(kw)
    return NewPlan(plan={"format": "quantplan.plan", "default": f"w{i}:a8"}, **values)


def _running_job(repo: Repository, runner: str = "r1", **spec: object) -> int:
    job = repo.create_job({"model": "m", **spec})
    claimed = repo.claim_next_job(runner)
    assert claimed is not None and claimed.id == job.id
    return job.id


# ------------------------------------------------------------------------------------------- models, jobs


def test_upsert_model_keys_on_fingerprint(repo: Repository) -> None:
    a = repo.upsert_model("m", "fp-1", revision="main", parameter_count=10)
    b = repo.upsert_model("m-renamed", "fp-1", revision="v2", parameter_count=11, architecture="llama")
    assert a.id == b.id and b.name == "m-renamed" and b.parameter_count == 11 and b.architecture == "llama"
    assert repo.upsert_model("m", "fp-2").id != a.id
    assert _count(repo, Model) == 2
    assert repo.get_model("fp-1").id == a.id and repo.get_model(a.id).fingerprint == "fp-1"
    with pytest.raises(NotFoundError, match="no model 'nope'"):
        repo.get_model("nope")


def test_create_job_is_idempotent_with_a_key(repo: Repository) -> None:
    first = repo.create_job({"model": "m", "budget": 4.5}, submitter="alice", idempotency_key="k1")
    again = repo.create_job({"model": "m", "budget": 4.5}, submitter="alice", idempotency_key="k1")
    assert again.id == first.id and again.status == "queued" and again.submitter == "alice"
    assert repo.create_job({"model": "m", "budget": 4.5}).id != first.id  # no key: always a new job
    with pytest.raises(StorageError, match="another spec"):
        repo.create_job({"model": "m", "budget": 3.0}, idempotency_key="k1")
    assert _count(repo, Job) == 2


def test_job_lifecycle_and_ownership(repo: Repository) -> None:
    older = repo.create_job({"n": 1})
    newer = repo.create_job({"n": 2})
    job = repo.claim_next_job("r1")
    assert job is not None and job.id == older.id  # oldest first
    assert (job.status, job.runner, job.attempts) == ("running", "r1", 1)
    assert job.started_at is not None and job.heartbeat_at is not None
    assert repo.heartbeat(job.id, "r1") is True
    updated = repo.update_job(job.id, "r1", stage="search", progress=0.5)
    assert (updated.stage, updated.progress) == ("search", 0.5)
    with pytest.raises(JobStateError, match="not r2"):
        repo.update_job(job.id, "r2", stage="evaluate")
    with pytest.raises(InvalidRecordError, match="progress"):
        repo.update_job(job.id, "r1", progress=1.5)
    done = repo.finish_job(job.id, "r1")
    assert (done.status, done.progress) == ("succeeded", 1.0) and done.finished_at is not None
    with pytest.raises(JobStateError):
        repo.heartbeat(job.id, "r1")
    assert repo.claim_next_job("r2").id == newer.id
    assert repo.claim_next_job("r3") is None
    failed = repo.fail_job(newer.id, "r2", "unknown model 'x'; pass a model directory")
    assert failed.status == "failed" and "unknown model" in failed.error
    with pytest.raises(NotFoundError):
        repo.get_job(10_000)


def test_cancel_queued_and_running_jobs(repo: Repository) -> None:
    running = _running_job(repo)
    queued = repo.create_job({"n": 2})
    assert repo.cancel_job(queued.id).status == "cancelled"
    assert repo.claim_next_job("r2") is None  # a cancelled job is never claimed
    flagged = repo.cancel_job(running)
    assert flagged.status == "running" and flagged.cancel_requested
    assert repo.heartbeat(running, "r1") is False  # the runner learns it should stop
    assert repo.finish_job(running, "r1", cancelled=True).status == "cancelled"
    assert repo.cancel_job(running).status == "cancelled"  # idempotent on a finished job


@pytest.mark.timeout(60)
def test_concurrent_claimers_never_share_a_job(repo: Repository) -> None:
    n_jobs, n_threads = 24, 6
    ids = {repo.create_job({"n": i}).id for i in range(n_jobs)}
    claimed: list[list[int]] = [[] for _ in range(n_threads)]
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def claimer(k: int) -> None:
        try:
            start.wait()
            while (job := repo.claim_next_job(f"runner-{k}")) is not None:
                assert job.runner == f"runner-{k}"
                claimed[k].append(job.id)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    flat = [i for c in claimed for i in c]
    assert len(flat) == len(set(flat)) == n_jobs and set(flat) == ids
    assert all(j.attempts == 1 and j.status == "running" for j in repo.list_jobs())


def test_requeue_stale_jobs_then_fail_after_max_attempts(repo: Repository) -> None:
    job_id = _running_job(repo)
    repo.update_job(job_id, "r1", stage="search", progress=0.4)
    fresh = _running_job(repo, "r9", n=2)
    assert repo.requeue_stale(timedelta(seconds=60), now=utcnow() + timedelta(seconds=30)).requeued == ()
    result = repo.requeue_stale(timedelta(seconds=60), max_attempts=3, now=utcnow() + timedelta(seconds=120))
    assert result.requeued == (job_id, fresh) and result.failed == ()
    repo.claim_next_job("r9")  # the first claim after a requeue takes the oldest job ...
    assert repo.claim_next_job("r9").id == fresh  # ... the second the other one
    repo.finish_job(fresh, "r9")
    repo.requeue_stale(60.0, now=utcnow() + timedelta(seconds=120))  # requeue job_id again
    job = repo.get_job(job_id)
    assert (job.status, job.runner, job.stage, job.attempts) == ("queued", None, "search", 2)  # resumes at search
    with pytest.raises(JobStateError):
        repo.heartbeat(job_id, "r1")  # the old runner lost the job
    for attempt in (3,):
        job = repo.claim_next_job(f"r{attempt}")
        assert job.id == job_id and job.attempts == attempt
        repo.requeue_stale(60.0, max_attempts=3, now=utcnow() + timedelta(seconds=120))
    job = repo.get_job(job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert "gave up after 3 attempts" in job.error and "stage search" in job.error
    assert repo.claim_next_job("r4") is None


def test_list_jobs_gives_the_newest_oldest_first(repo: Repository) -> None:
    ids = [repo.create_job({"model": f"m{i}"}).id for i in range(5)]
    assert [j.id for j in repo.list_jobs(limit=3)] == ids[2:]
    repo.cancel_job(ids[3])
    assert [j.id for j in repo.list_jobs("cancelled")] == [ids[3]]
    with pytest.raises(InvalidRecordError):
        repo.list_jobs(limit=0)


def test_claim_a_given_job_and_release_it_until_it_fails(repo: Repository) -> None:
    first = repo.create_job({"model": "a"}).id
    second = repo.create_job({"model": "b"}).id
    job = repo.claim_job(second, "r1")  # not the oldest: the one asked for
    assert (job.id, job.status, job.runner, job.attempts) == (second, "running", "r1", 1)
    assert repo.claim_job(second, "r2") is None  # already running
    with pytest.raises(NotFoundError):
        repo.claim_job(999_999, "r1")
    repo.update_job(second, "r1", stage="search")
    job = repo.release_job(second, "r1", "ray worker died", max_attempts=2)
    assert (job.status, job.runner, job.stage, job.error) == ("queued", None, "search", "ray worker died")
    with pytest.raises(JobStateError):
        repo.release_job(second, "r1", "again")  # no longer owned
    assert repo.claim_job(second, "r2").attempts == 2
    job = repo.release_job(second, "r2", "ray worker died again", max_attempts=2)
    assert job.status == "failed" and job.finished_at is not None
    assert job.error == "gave up after 2 attempts; last error: ray worker died again"
    assert repo.get_job(first).status == "queued"


def test_requeue_of_a_cancel_requested_job_cancels_it(repo: Repository) -> None:
    job_id = _running_job(repo)
    repo.cancel_job(job_id)
    result = repo.requeue_stale(1.0, now=utcnow() + timedelta(seconds=5))
    assert result.cancelled == (job_id,) and repo.get_job(job_id).status == "cancelled"


# ------------------------------------------------------------------------------------------- plans


def test_add_plans_stores_plans_and_metrics(repo: Repository) -> None:
    model = repo.upsert_model("m", "fp")
    job_id = _running_job(repo)
    metrics = {"perplexity": 12.5, ("kl", "wikitext2"): 0.03}
    ids = repo.add_plans(model.id, [_plan(0, metrics=metrics), _plan(1)], job_id=job_id, runner="r1")
    plan = repo.get_plan(ids[0])
    assert plan.plan == {"format": "quantplan.plan", "default": "w0:a8"} and plan.job_id == job_id
    assert plan.metric("perplexity") == 12.5 and plan.metric("kl", "wikitext2") == 0.03
    assert [p.id for p in repo.plans_for_job(job_id)] == ids
    with pytest.raises(NotFoundError):
        repo.get_plan(10_000)


def test_a_job_cannot_store_the_same_plan_twice(repo: Repository) -> None:
    model = repo.upsert_model("m", "fp")
    job_id = _running_job(repo)
    first = repo.add_plans(model.id, [_plan(0)], job_id=job_id)
    again = repo.add_plans(model.id, [_plan(0, metrics={"perplexity": 9.0}), _plan(1)], job_id=job_id)
    assert again[0] == first[0] and _count(repo, PlanRow) == 2
    assert repo.get_plan(first[0]).metric("perplexity") == 9.0  # metrics upserted, not duplicated
    assert _count(repo, MetricRow) == 2
    other_job = _running_job(repo, "r2", n=2)
    assert repo.add_plans(model.id, [_plan(0)], job_id=other_job)[0] != first[0]  # another job may


def test_add_plans_is_all_or_nothing(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    model = repo.upsert_model("m", "fp")
    job_id = _running_job(repo)
    real = repository._store_metrics
    calls = {"n": 0}

    def crash_on_second(s, plan_id, metrics):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("worker died mid-way")
        real(s, plan_id, metrics)

    monkeypatch.setattr(repository, "_store_metrics", crash_on_second)
    with pytest.raises(RuntimeError, match="mid-way"):
        repo.add_plans(model.id, [_plan(0), _plan(1), _plan(2)], job_id=job_id)
    assert _count(repo, PlanRow) == 0 and _count(repo, MetricRow) == 0

    def database_error_on_second(s, plan_id, metrics):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        real(s, plan_id if calls["n"] != 4 else 10_000_000, metrics)  # a metric of a plan that does not exist

    monkeypatch.setattr(repository, "_store_metrics", database_error_on_second)
    with pytest.raises(StorageError, match="nothing was stored") as info:
        repo.add_plans(model.id, [_plan(0), _plan(1), _plan(2)], job_id=job_id)
    assert isinstance(info.value, QuantPlanError)
    assert _count(repo, PlanRow) == 0 and _count(repo, MetricRow) == 0


def test_add_plans_checks_ownership_and_values(repo: Repository) -> None:
    model = repo.upsert_model("m", "fp")
    job_id = _running_job(repo)
    with pytest.raises(JobStateError):
        repo.add_plans(model.id, [_plan(0)], job_id=job_id, runner="someone-else")
    with pytest.raises(InvalidRecordError, match="not a number"):
        repo.add_plans(model.id, [_plan(0), _plan(1, metrics={"perplexity": float("nan")})], job_id=job_id)
    with pytest.raises(InvalidRecordError, match="avg_bits"):
        repo.add_plans(model.id, [_plan(0, avg_bits=0.0)])
    with pytest.raises(NotFoundError, match="upsert_model"):
        repo.add_plans(999, [_plan(0)])
    assert _count(repo, PlanRow) == 0


def test_plan_key_order_is_kept(repo: Repository) -> None:
    model = repo.upsert_model("m", "fp")
    layers = {"re:.*mlp.*": "w4g128:a8-dynamic", "re:.*": "w8:a8-static", "a": "w16:a16"}
    ids = repo.add_plans(model.id, [_plan(0), NewPlan({"layers": layers}, 5.0, 10, 8)])
    assert list(repo.get_plan(ids[1]).plan["layers"]) == list(layers)  # pattern order resolves plans


# ------------------------------------------------------------------------------------------- leaderboard


@pytest.fixture
def board(repo: Repository) -> tuple[Repository, list[int]]:
    """Eight plans of model "m" (two revisions): bits 4..11, act bits 8/16 alternating, every third Pareto."""
    a = repo.upsert_model("m", "fp-a", revision="a")
    b = repo.upsert_model("m", "fp-b", revision="b")
    repo.upsert_model("other", "fp-o")
    ids = []
    for i in range(8):
        metrics = {("perplexity", "wikitext2"): 20.0 - i} if i != 5 else {}  # plan 5 has no perplexity
        plan = _plan(i, act_bits=8 if i % 2 == 0 else 16, is_pareto=i % 3 == 0, metrics=metrics)
        ids += repo.add_plans((a if i < 4 else b).id, [plan])
    return repo, ids


def test_leaderboard_filters(board: tuple[Repository, list[int]]) -> None:
    repo, ids = board
    assert repo.leaderboard("m").total == 8
    assert repo.leaderboard("fp-a").total == 4  # a fingerprint names one revision
    assert {p.id for p in repo.leaderboard("m", max_avg_bits=6.0).plans} == set(ids[:3])
    assert {p.id for p in repo.leaderboard("m", max_bytes=2000).plans} == set(ids[:2])
    assert {p.act_bits for p in repo.leaderboard("m", act_bits=16).plans} == {16}
    assert {p.id for p in repo.leaderboard("m", pareto_only=True).plans} == {ids[0], ids[3], ids[6]}
    page = repo.leaderboard("m", max_avg_bits=9.0, act_bits=8, pareto_only=True)
    assert [p.id for p in page.plans] == [ids[0]] and page.total == 1
    assert repo.leaderboard("other").total == 0
    with pytest.raises(NotFoundError, match="models: m, other"):
        repo.leaderboard("missing")


def test_leaderboard_sort_and_paging(board: tuple[Repository, list[int]]) -> None:
    repo, ids = board
    by_ppl = [p.id for p in repo.leaderboard("m", sort="perplexity", limit=100).plans]
    assert by_ppl == [ids[7], ids[6], ids[4], ids[3], ids[2], ids[1], ids[0], ids[5]]  # missing metric last
    desc = [p.id for p in repo.leaderboard("m", sort="perplexity", dataset="wikitext2", order="desc").plans]
    assert desc == [ids[0], ids[1], ids[2], ids[3], ids[4], ids[6], ids[7], ids[5]]
    assert [p.id for p in repo.leaderboard("m", sort="bytes", order="desc", limit=2).plans] == [ids[7], ids[6]]
    pages = [repo.leaderboard("m", sort="avg_bits", limit=3, offset=o) for o in (0, 3, 6)]
    assert [p.id for page in pages for p in page.plans] == ids and all(page.total == 8 for page in pages)
    assert pages[2].plans[0].metric("perplexity", "wikitext2") == 14.0
    with pytest.raises(InvalidRecordError):
        repo.leaderboard("m", order="sideways")  # type: ignore[arg-type]
    with pytest.raises(InvalidRecordError):
        repo.leaderboard("m", limit=0)


# ------------------------------------------------------------------------------------------- artifacts, tables


def test_leaderboard_distinct_lists_a_plan_once(repo: Repository) -> None:
    model = repo.upsert_model("m", "fp-distinct")
    first = repo.create_job({"model": "m", "run": 1}).id
    second = repo.create_job({"model": "m", "run": 2}).id
    a = repo.add_plans(model.id, [_plan(1), _plan(2)], job_id=first)
    again = NewPlan(plan={**_plan(1).plan, "meta": {"job": second}}, avg_bits=5.0, bytes=2000, act_bits=8)
    b = repo.add_plans(model.id, [again, _plan(3)], job_id=second)  # _plan(1) again (other meta), another job
    assert repo.leaderboard("m", sort="id").total == 4
    page = repo.leaderboard("m", sort="id", distinct=True)
    assert page.total == 3 and [p.id for p in page.plans] == [a[0], a[1], b[1]]


def test_record_artifact_and_sensitivity_tables(repo: Repository) -> None:
    model = repo.upsert_model("m", "fp")
    plan_id = repo.add_plan(model.id, _plan(0))
    first = repo.record_artifact(plan_id, "packed", "file:///a", "a" * 64, 10)
    second = repo.record_artifact(plan_id, "packed", "file:///b", "b" * 64, 20)
    assert second.id == first.id and (second.uri, second.bytes) == ("file:///b", 20)
    repo.record_artifact(plan_id, "plan", "file:///c", "c" * 64, 1)
    assert [a.kind for a in repo.get_plan(plan_id).artifacts] == ["packed", "plan"]
    with pytest.raises(InvalidRecordError, match="sha256"):
        repo.record_artifact(plan_id, "packed", "file:///x", "not-a-digest", 1)
    with pytest.raises(NotFoundError):
        repo.record_artifact(10_000, "packed", "file:///x", "a" * 64, 1)

    assert repo.get_table("fp|wikitext2|fisher") is None
    table = repo.put_table("fp|wikitext2|fisher", "file:///t1", sha256="d" * 64, model_id=model.id)
    again = repo.put_table("fp|wikitext2|fisher", "file:///t2")
    assert again == table and repo.get_table("fp|wikitext2|fisher").artifact_uri == "file:///t1"


def test_session_scope_rolls_back_and_raises_storage_error(repo: Repository) -> None:
    with pytest.raises(StorageError, match="duplicate key") as info, repo.session() as s:
        s.add(Model(name="x", fingerprint="dup", created_at=utcnow()))
        s.flush()
        s.add(Model(name="y", fingerprint="dup", created_at=utcnow()))
    assert isinstance(info.value, QuantPlanError) and info.value.__cause__ is not None
    with pytest.raises(KeyError), repo.session() as s:
        s.add(Model(name="z", fingerprint="fp-z", created_at=utcnow()))
        s.flush()
        raise KeyError("not a database error")
    assert _count(repo, Model) == 0  # both transactions rolled back


def test_unreachable_database_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="check the URL|reachable") as info:
        Repository("postgresql://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(info.value)


def test_model_summaries_count_plans_and_jobs_by_name(repo: Repository) -> None:
    name = f"summary-model-{uuid.uuid4().hex[:8]}"
    model = repo.upsert_model(name, uuid.uuid4().hex)
    other_revision = repo.upsert_model(name, uuid.uuid4().hex, revision="r2")
    jobs = [repo.create_job({"model": name}).id for _ in range(2)]
    repo.add_plans(model.id, [_plan(1, metrics={"base_perplexity": 9.5}), _plan(2)], job_id=jobs[0])
    repo.add_plans(other_revision.id, [_plan(3, metrics={"base_perplexity": 9.25})], job_id=jobs[1])
    [summary] = [m for m in repo.model_summaries() if m.name == name]
    assert (summary.plans, summary.jobs, summary.base_perplexity) == (3, 2, 9.25)
    assert summary.model_ids == (model.id, other_revision.id)
    assert repo.study_progress([f"job-{jobs[0]}"]) == {}  # no Optuna study of that name
