"""The job runner end to end on converted stories260K: run, leaderboard, show, export + apply, bad input, and a
runner process killed mid-job whose job a restarted runner (with an empty local cache) finishes without recomputing
the sensitivity table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import OperationalError

from quantplan.service.jobs import JobSpec, SpecError
from quantplan.service.runner import Runner, RunnerConfig
from quantplan.storage import Repository, open_store
from quantplan.storage.models import ArtifactRow, MetricRow, PlanRow, SensitivityTableRow
from tests.service.test_cli import run_cli, wait_for

pytestmark = pytest.mark.slow


def _count(repo: Repository, table: type) -> int:
    with repo.session() as s:
        return s.scalar(select(func.count()).select_from(table)) or 0


@pytest.fixture(scope="module")
def job_env(tmp_path_factory: pytest.TempPathFactory, stories_hf: Path, stories_dir: Path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("jobs")
    return {
        "model": str(stories_hf),
        "data": f"text:{stories_dir / 'sampled_seed1.txt'}",
        "db": f"sqlite:///{root / 'quantplan.db'}",
        "artifacts": str(root / "artifacts"),
        "cache": str(root / "cache"),
        "root": str(root),
    }


@pytest.fixture
def env(job_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("QUANTPLAN_CACHE_DIR", job_env["cache"])
    monkeypatch.setenv("QUANTPLAN_DATABASE_URL", job_env["db"])
    monkeypatch.setenv("QUANTPLAN_ARTIFACTS", job_env["artifacts"])
    return job_env


SMALL = ("--samples", "16", "--seq-len", "64", "--eval-samples", "8", "--eval-top", "1")


def test_run_stores_plans_and_exported_artifact_reproduces_perplexity(capsys, env, ray_local, tmp_path) -> None:
    spec = tmp_path / "spec.json"  # options without a flag of their own come from a spec file
    spec.write_text(json.dumps({"select": "perplexity", "refine": 2, "select_samples": 4, "trials": 999}))
    code, out, err = run_cli(capsys, "run", "--model", env["model"], "--data", env["data"], "--budget-bits", "4.5",
                             "--trials", "20", *SMALL, "--spec", str(spec), "--json")
    assert code == 0, err
    result = json.loads(out)
    job, plans = result["job"], result["plans"]
    assert job["spec"]["trials"] == 20 and job["spec"]["refine"] == 2  # flags win over the file
    assert (job["status"], job["stage"], job["progress"], job["attempts"]) == ("succeeded", "materialize", 1.0, 1)
    assert len({p["plan_sha256"] for p in plans}) == len(plans) > 3  # Pareto set + baselines, each once
    packed = [p for p in plans if p["artifacts"]]
    assert len(packed) == 1 and packed[0]["avg_bits"] <= 4.5 + 1e-9  # the best plan, within budget
    best = packed[0]
    names = {m["name"] for m in best["metrics"]}
    assert {"perplexity", "kl", "perplexity_simulated", "base_perplexity", "artifact_bytes"} <= names
    # the materialized model measures what the simulation predicted
    assert best["perplexity"] == pytest.approx(next(m["value"] for m in best["metrics"]
                                                    if m["name"] == "perplexity_simulated"), rel=0.005)

    code, out, _ = run_cli(capsys, "leaderboard", "--model", env["model"], "--max-bits", "4.5", "--act-bits", "8",
                           "--sort", "kl", "--json")
    board = json.loads(out)
    assert code == 0 and board["total"] >= 1
    assert all(p["avg_bits"] <= 4.5 + 1e-9 and p["act_bits"] == 8 for p in board["plans"])
    kls = [p["kl"] for p in board["plans"] if p["kl"] is not None]
    assert kls == sorted(kls) and best["id"] in [p["id"] for p in board["plans"]]

    code, out, _ = run_cli(capsys, "show", str(best["id"]), "--plan-json", str(tmp_path / "plan.json"), "--json")
    shown = json.loads(out)
    assert code == 0 and shown["plan"] == json.loads((tmp_path / "plan.json").read_text())
    assert sum(shown["schemes"].values()) == len(shown["plan"]["layers"])

    code, out, err = run_cli(capsys, "export", str(best["id"]), "-o", str(tmp_path / "art"), "--json")
    assert code == 0, err
    exported = json.loads(out)
    assert exported["sha256"] == best["artifacts"][0]["sha256"]
    assert {"plan.json", "quantized.safetensors", "manifest.json"} <= {p.name for p in (tmp_path / "art").iterdir()}
    code, out, err = run_cli(capsys, "eval", "--model", env["model"], "--data", env["data"], "--artifact",
                             str(tmp_path / "art"), "--seq-len", "64", "--samples", "8", "--json")
    assert code == 0, err
    assert json.loads(out)["perplexity"] == pytest.approx(best["perplexity"], rel=0.005)

    code, _, err = run_cli(capsys, "export", str(best["id"]), "-o", str(tmp_path / "art"))
    assert code == 1 and "already exists" in err


def test_bad_jobs_fail_with_a_clear_error_and_store_nothing(env, ray_local) -> None:
    repo, store = Repository(env["db"]), open_store(env["artifacts"])
    plans, artifacts = _count(repo, PlanRow), _count(repo, ArtifactRow)
    runner = Runner(repo, store, config=RunnerConfig(heartbeat_interval=0.5))
    cases = {
        "malformed": ({"model": env["model"], "data": env["data"], "budget_bits": "lots"}, "budget_bits"),
        "no budget": ({"model": env["model"], "data": env["data"]}, "exactly one budget"),
        "unknown model": ({"model": str(Path(env["root"]) / "no-such-model"), "data": env["data"],
                           "budget_bits": 4.5}, "no-such-model"),
        "infeasible": ({"model": env["model"], "data": env["data"], "budget_bits": 1.0, "samples": 16,
                        "seq_len": 64, "eval_samples": 8, "trials": 5}, "is infeasible"),
    }
    for name, (spec, message) in cases.items():
        job = repo.create_job(spec)
        done = runner.run_job(job.id)
        assert done.status == "failed", name
        assert message in done.error and "Traceback" not in done.error, (name, done.error)
        assert done.attempts == 1, name  # bad input is not retried
    assert (_count(repo, PlanRow), _count(repo, ArtifactRow)) == (plans, artifacts)
    assert not list(Path(env["artifacts"]).rglob("*.tmp*"))


def test_spec_validation_names_the_field() -> None:
    with pytest.raises(SpecError, match=r"trials: Input should be greater than or equal to 0"):
        JobSpec.parse({"model": "m", "data": "wikitext2", "budget_bits": 4, "trials": -1})
    with pytest.raises(SpecError, match=r"colour: Extra inputs are not permitted"):
        JobSpec.parse({"model": "m", "data": "wikitext2", "budget_bits": 4, "colour": "red"})
    spec = JobSpec.parse({"model": "m", "data": "wikitext2", "budget_mb": 1.5})
    assert spec.to_json() == {"model": "m", "data": "wikitext2", "budget_mb": 1.5}


def test_killed_runner_job_is_resumed_without_recomputing(env, ray_address, monkeypatch) -> None:
    repo, store = Repository(env["db"]), open_store(env["artifacts"])
    spec = {"model": env["model"], "data": env["data"], "budget_bits": 4.25, "trials": 150, "samples": 12,
            "seq_len": 64, "eval_samples": 8, "eval_top": 1}
    job = repo.create_job(spec)
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantplan.service.cli", "runner", "--heartbeat", "0.5", "--poll", "0.2",
         "--max-jobs", "1"],
        env={**os.environ, "COLUMNS": "200", "QUANTPLAN_RAY_ADDRESS": ray_address},  # the session's Ray
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        # the runner has computed and stored the table and is inside the Optuna study when it is killed
        assert wait_for(lambda: repo.get_job(job.id).stage == "search" or proc.poll() is not None, timeout=240)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert wait_for(lambda: _trials(env["db"], f"job-{job.id}") >= 10, timeout=120)
        os.killpg(proc.pid, signal.SIGKILL)  # the runner (Ray drops the tasks and workers of its dead driver)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed = repo.get_job(job.id)
    assert (killed.status, killed.stage, killed.attempts) == ("running", "search", 1)
    done_before = _trials(env["db"], f"job-{job.id}")
    assert 10 <= done_before < 150 + 6  # stopped mid-study (150 trials plus the enqueued references)
    assert _count(repo, SensitivityTableRow) >= 1  # computed and stored before the kill

    def no_recompute(*args, **kwargs):
        raise AssertionError("the restarted runner recomputed the sensitivity table")

    monkeypatch.setattr("quantplan.workers.tasks.compute_sensitivity", no_recompute)
    # the restarted runner is "another machine": an empty local cache, so the table comes from the store
    monkeypatch.setenv("QUANTPLAN_CACHE_DIR", str(Path(env["root"]) / "cache-of-another-runner"))
    runner = Runner(repo, store, config=RunnerConfig(heartbeat_interval=0.5, stale_after=2.0))
    assert wait_for(lambda: repo.requeue_stale(2.0).requeued == (job.id,), timeout=30)
    done = runner.run_once()
    assert done is not None and done.id == job.id
    assert (done.status, done.attempts) == ("succeeded", 2), done.error
    trials = _trials(env["db"], f"job-{job.id}")
    assert done_before <= trials <= 150 + 6  # the study continued, it did not start over
    plans = repo.plans_for_job(job.id)
    assert len({p.plan_sha256 for p in plans}) == len(plans) > 0  # no duplicate plans
    assert sum(1 for p in plans for a in p.artifacts if a.kind == "packed") == 1
    assert _count(repo, MetricRow) > 0


def _trials(url: str, study: str) -> int:
    """The trials of an Optuna study in any state, counted read-only in Optuna's tables: opening an Optuna storage
    here would create those tables and race the runner creating them ("table studies already exists")."""
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            return c.execute(text("SELECT COUNT(*) FROM trials JOIN studies ON trials.study_id = studies.study_id "
                                  "WHERE studies.study_name = :name"), {"name": study}).scalar_one()
    except OperationalError:  # no Optuna tables yet
        return 0
    finally:
        engine.dispose()


def test_cancel_of_a_running_job_is_honoured_at_the_next_stage(tmp_path, monkeypatch) -> None:
    repo = Repository(f"sqlite:///{tmp_path / 'q.db'}")
    runner = Runner(repo, open_store(tmp_path / "art"), config=RunnerConfig(heartbeat_interval=0.2))
    job = repo.create_job({"model": "m", "data": "wikitext2", "budget_bits": 4.25})

    def load_then_get_cancelled(self, progress):
        repo.cancel_job(self.job.id)  # a user cancels while the model loads
        return None

    monkeypatch.setattr("quantplan.service.runner.JobRun._load", load_then_get_cancelled)
    monkeypatch.setattr("quantplan.service.runner.JobRun._sensitivity",
                        lambda self, loaded, progress: pytest.fail("not cancelled"))
    done = runner.run_job(job.id)
    assert (done.status, done.stage, done.finished_at is not None) == ("cancelled", "load", True)


def test_a_crashing_job_is_retried_then_failed(tmp_path, monkeypatch) -> None:
    repo = Repository(f"sqlite:///{tmp_path / 'q.db'}")
    runner = Runner(repo, open_store(tmp_path / "art"), config=RunnerConfig(heartbeat_interval=0.2, max_attempts=2))
    job = repo.create_job({"model": "m", "data": "wikitext2", "budget_bits": 4.25})

    def crash(self, progress):
        raise RuntimeError("worker node lost")

    monkeypatch.setattr("quantplan.service.runner.JobRun._load", crash)
    first = runner.run_once()
    assert first.id == job.id
    assert (first.status, first.attempts, first.stage, first.error) == ("queued", 1, "load",
                                                                        "RuntimeError: worker node lost")
    second = runner.run_once()
    assert (second.status, second.attempts) == ("failed", 2)
    assert second.error == "gave up after 2 attempts; last error: RuntimeError: worker node lost"
    assert runner.run_once() is None  # nothing left in the queue


def test_cancel_between_search_trials(env, ray_local) -> None:
    repo, store = Repository(env["db"]), open_store(env["artifacts"])
    runner = Runner(repo, store, config=RunnerConfig(heartbeat_interval=0.2))
    job = repo.create_job({"model": env["model"], "data": env["data"], "budget_bits": 4.5, "trials": 100_000,
                           "samples": 16, "seq_len": 64, "eval_samples": 8})
    result: list = []
    thread = threading.Thread(target=lambda: result.append(runner.run_job(job.id)))
    thread.start()
    assert wait_for(lambda: _trials(env["db"], f"job-{job.id}") >= 20, timeout=180)
    repo.cancel_job(job.id)
    thread.join(timeout=60)
    assert not thread.is_alive() and result[0].status == "cancelled"
    assert result[0].stage == "search" and 0.35 < result[0].progress < 0.75  # progress moved within the study
    assert _trials(env["db"], f"job-{job.id}") < 100_000 and repo.plans_for_job(job.id) == []


def test_runner_once_json(capsys, tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'q.db'}"
    job = Repository(db).create_job({"model": "m", "data": "wikitext2"})  # no budget: fails at once
    args = ("runner", "--once", "--db", db, "--artifacts", str(tmp_path / "art"), "--json")
    code, out, _ = run_cli(capsys, *args)
    done = json.loads(out)["job"]
    assert code == 0 and (done["id"], done["status"]) == (job.id, "failed") and "exactly one budget" in done["error"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and json.loads(out)["job"] is None  # the queue is empty
