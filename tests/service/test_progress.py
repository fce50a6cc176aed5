"""Progress everywhere (issue 14, acceptance 3): a job driven through every stage reports counted steps at least
every 10 s of work, and `quantplan status --json` shows where the running step stands (stage, step, done, total,
eta) while it runs. Also: the events themselves (rate, eta) and the rich bars."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from rich.console import Console

from quantplan.progress import Progress, ProgressEvent, RichBars, reporting
from quantplan.service.jobs import JobSpec
from quantplan.service.runner import STAGES, JobRun, Runner, RunnerConfig
from quantplan.storage import Repository, open_store
from tests.service.test_cli import run_cli

MAX_GAP_S = 10.0  # the acceptance: an event at least every 10 s of work in every stage


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_events_carry_rate_and_eta() -> None:
    clock, events = Clock(), []
    step = Progress(events.append, stage="sensitivity", clock=clock).step("sensitivity pass", 8)
    clock.now += 4.0
    step.advance(2)
    clock.now += 2.0
    step.tick(every=5.0)  # reported 2 s ago: nothing new
    clock.now += 4.0
    step.tick(every=5.0)  # 6 s ago: the same count again, with a fresh elapsed time and eta
    step.update(1)  # counts never go back (a retried task counts its windows again)
    step.update(99)  # nor past the total
    assert [(e.done, e.elapsed, e.rate, e.eta) for e in events] == [
        (0, 0.0, None, None), (2, 4.0, 0.5, 12.0), (2, 10.0, 0.2, 30.0), (8, 10.0, 0.8, 0.0)]
    assert {(e.stage, e.step, e.unit, e.total) for e in events} == {("sensitivity", "sensitivity pass", "windows", 8)}
    assert events[-1].finished and not events[0].finished
    assert events[1].to_dict() == {"stage": "sensitivity", "step": "sensitivity pass", "unit": "windows", "done": 2,
                                   "total": 8, "elapsed": 4.0, "rate": 0.5, "eta": 12.0}


def test_nested_work_shares_one_progress_and_bars_draw_rate_and_eta() -> None:
    out = io.StringIO()
    bars = RichBars(Console(file=out, width=120, force_terminal=False))
    events: list[ProgressEvent] = []
    outer = Progress(events.append, bars, stage="materialize")
    with reporting(outer) as inner:  # a Progress is used as it is (one display for nested work)
        assert inner is outer
        step = inner.step("quantize layers", 4, "layers")
        step.advance(4)
    with reporting(False, "load") as silent:
        assert not silent.enabled and silent.stage == "load"
    bars.close()
    assert [e.done for e in events] == [0, 4]
    assert "materialize: quantize layers" in out.getvalue() and "4/4" in out.getvalue()


@pytest.fixture
def db_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"db": f"sqlite:///{tmp_path / 'quantplan.db'}", "artifacts": str(tmp_path / "artifacts")}
    monkeypatch.setenv("QUANTPLAN_CACHE_DIR", str(tmp_path / "cache"))  # the sensitivity table is computed
    monkeypatch.setenv("QUANTPLAN_DATABASE_URL", env["db"])
    monkeypatch.setenv("QUANTPLAN_ARTIFACTS", env["artifacts"])
    return env


@pytest.mark.slow
def test_a_job_reports_progress_in_every_stage_and_status_shows_it(
        capsys: pytest.CaptureFixture[str], db_env: dict[str, str], ray_local, stories_hf: Path, stories_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository(db_env["db"])
    spec = JobSpec.parse({"model": str(stories_hf), "data": f"text:{stories_dir / 'sampled_seed1.txt'}",
                          "budget_bits": 4.5, "trials": 12, "samples": 8, "seq_len": 64, "eval_samples": 4,
                          "eval_top": 1, "workers": 2})
    job = repo.create_job(spec.to_json())

    stages: list[tuple[float, str]] = []  # when each stage began
    enter_stage = JobRun.stage

    def timed_stage(self: JobRun, name: str, progress: float | None = None) -> Progress:
        stages.append((time.monotonic(), name))
        return enter_stage(self, name, progress)

    monkeypatch.setattr(JobRun, "stage", timed_stage)
    events: list[tuple[float, ProgressEvent]] = []
    shown: list[tuple[ProgressEvent, dict]] = []

    def listen(event: ProgressEvent) -> None:  # runs after the runner has stored the event with the job
        events.append((time.monotonic(), event))
        if event.done == 0 or event.finished:  # a step's first and last events are always stored
            code, out, err = run_cli(capsys, "status", str(job.id), "--json")
            assert code == 0, err
            shown.append((event, json.loads(out)))

    runner = Runner(repo, open_store(db_env["artifacts"]), config=RunnerConfig(heartbeat_interval=0.5),
                    listeners=[listen])
    done = runner.run_job(job.id)
    end = time.monotonic()
    assert done.status == "succeeded", done.error

    # every stage reports, at least every 10 s of its work (from its start to its end)
    assert [name for _, name in stages] == list(STAGES)
    bounds = [t for t, _ in stages] + [end]
    for (start, name), stop in zip(stages, bounds[1:], strict=True):
        times = [t for t, e in events if e.stage == name]
        assert times, f"no progress event in stage {name}"
        gaps = [b - a for a, b in zip([start, *times], [*times, stop], strict=True)]
        assert max(gaps) <= MAX_GAP_S, (name, max(gaps))

    # each step counts from 0 up to its total; the totals are the work's units
    steps: dict[tuple[str, str], list[ProgressEvent]] = {}
    for _, e in events:
        steps.setdefault((e.stage, e.step), []).append(e)
    for key, seen in steps.items():
        counts = [e.done for e in seen]
        assert counts[0] == 0 and counts[-1] == seen[0].total and counts == sorted(counts), key
        assert len({(e.unit, e.total) for e in seen}) == 1, key
    totals = {key: (seen[0].total, seen[0].unit) for key, seen in steps.items()}
    assert totals[("sensitivity", "sensitivity pass")] == (8 + 8, "windows")  # 2 workers: the act set twice
    assert totals[("sensitivity", "weight costs")] == (35, "layers")  # stories260K: 5 blocks x 7 linear layers
    trials, unit = totals[("search", "trials")]
    assert unit == "trials" and 0 < trials < 12  # the searched trials (the recipes' trials come first)
    plans, unit = totals[("search", "plan evaluation")]
    assert unit == "windows" and plans % 4 == 0 and plans >= 4 * 2  # 4 windows per plan: the best + baselines
    assert totals[("materialize", "quantize layers")][1] == "layers"
    assert totals[("materialize", "quantized model")] == (4, "windows")

    # `quantplan status --json` showed each step's start and end while the job ran
    assert {(e.stage, e.step) for e, _ in shown} == set(steps)
    for event, status in shown:
        assert status["status"] == "running" and status["stage"] == event.stage
        assert (status["step"], status["unit"], status["done"], status["total"]) == (
            event.step, event.unit, event.done, event.total)
        assert "eta" in status and status["eta"] == (0.0 if event.finished else event.eta)
        assert 0.0 <= status["progress"] <= 1.0
    final = json.loads(run_cli(capsys, "status", str(job.id), "--json")[1])
    assert (final["status"], final["progress"], final["stage"]) == ("succeeded", 1.0, "materialize")


@pytest.mark.slow
def test_a_cancel_is_honoured_inside_a_stage(db_env: dict[str, str], ray_local, stories_hf: Path,
                                             stories_dir: Path) -> None:
    """A cancel request stops the sensitivity pass at its next stored event, not at the next stage."""
    repo = Repository(db_env["db"])
    spec = JobSpec.parse({"model": str(stories_hf), "data": f"text:{stories_dir / 'sampled_seed1.txt'}",
                          "budget_bits": 4.5, "samples": 8, "seq_len": 64, "eval_samples": 4, "workers": 2})
    job = repo.create_job(spec.to_json())
    steps: list[str] = []

    def cancel_once_the_pass_starts(event: ProgressEvent) -> None:
        steps.append(event.step)
        if event.step == "sensitivity pass" and event.done == 0:
            repo.cancel_job(job.id)  # a user cancels while the pass runs

    runner = Runner(repo, open_store(db_env["artifacts"]), config=RunnerConfig(heartbeat_interval=60.0),
                    listeners=[cancel_once_the_pass_starts])
    done = runner.run_job(job.id)
    assert (done.status, done.stage) == ("cancelled", "sensitivity")
    assert "weight costs" not in steps  # stopped inside the pass (the heartbeat, every 60 s, never ran)
