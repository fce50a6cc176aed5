"""The Optuna driver: reference trials enqueued once, RDB persistence, resume after a kill, clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from quantplan.search.budget import Budget
from quantplan.search.problem import compile_problem
from quantplan.search.recipes import RECIPES
from quantplan.search.space import SearchError, SearchSpace
from quantplan.search.study import DB_ENV, KNAPSACK, StudySettings, database_url, run_search, study_storage
from quantplan.search.synthetic import llama_block, synthetic_table

REPO = Path(__file__).resolve().parents[2]
REFERENCES = {KNAPSACK, *RECIPES}
SETUP = """
from quantplan.search.budget import Budget
from quantplan.search.problem import compile_problem
from quantplan.search.space import SearchSpace
from quantplan.search.synthetic import llama_block, synthetic_table
problem = compile_problem(synthetic_table(4, llama_block(64, 172, 32)), SearchSpace(act_bits=8), Budget(avg_bits=4.5))
"""


@pytest.fixture(scope="module")
def problem():
    return compile_problem(synthetic_table(4, llama_block(64, 172, 32)), SearchSpace(act_bits=8), Budget(avg_bits=4.5))


def _stored(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    # the process's storage, created under the schema lock: the poller below opens the database while the search
    # it watches creates Optuna's tables
    return optuna.load_study(study_name=name, storage=study_storage(url)).get_trials(deepcopy=False)


def _recipes(trials) -> Counter:
    return Counter(t.user_attrs.get("recipe") for t in trials if t.user_attrs.get("recipe"))


def test_search_stores_trials_and_references_once(tmp_path: Path, problem) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    first = run_search(problem, StudySettings(trials=40, storage=url, name="s"))
    assert first.trials == first.new_trials == 40
    assert first.best().under_budget and first.best().predicted_loss <= first.knapsack.loss + 1e-12
    assert {r.recipe for r in first.references} == REFERENCES and all(r.trial is not None for r in first.references)
    assert first.pareto and all(not any(_dominates(o, c) for o in first.pareto) for c in first.pareto)
    again = run_search(problem, StudySettings(trials=60, storage=url, name="s"))
    assert (again.trials, again.new_trials) == (60, 20)
    stored = _stored(url, "s")
    assert len(stored) == 60 and all(t.state == TrialState.COMPLETE for t in stored)
    assert _recipes(stored) == Counter(dict.fromkeys(REFERENCES, 1))
    assert [t.number for t in stored] == list(range(60))
    done = run_search(problem, StudySettings(trials=60, storage=url, name="s"))
    assert done.new_trials == 0 and done.best().label == again.best().label


def _dominates(a, b) -> bool:
    return (a.predicted_loss <= b.predicted_loss and a.bytes <= b.bytes
            and (a.predicted_loss, a.bytes) != (b.predicted_loss, b.bytes))


def test_killed_search_resumes(tmp_path: Path, problem) -> None:
    """SIGKILL a running search; the rerun continues the stored study; references stay unique."""
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    script = SETUP + textwrap.dedent(f"""
        from quantplan.search.study import StudySettings, run_search
        run_search(problem, StudySettings(trials=100_000, storage={url!r}, name="k"))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                if len(_stored(url, "k")) >= 30:
                    break
            except KeyError:  # the study is not created yet
                continue
        assert proc.poll() is None, "the search ended before it was killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = len(_stored(url, "k"))
    assert before >= 30
    result = run_search(problem, StudySettings(trials=before + 25, storage=url, name="k"))
    stored = _stored(url, "k")
    assert result.new_trials == 25 and len(stored) == before + 25
    assert _recipes(stored) == Counter(dict.fromkeys(REFERENCES, 1))
    assert [t.number for t in stored] == list(range(before + 25))


def test_per_layer_space(tmp_path: Path, problem) -> None:
    result = run_search(problem, StudySettings(trials=30, space="per-layer", storage=f"sqlite:///{tmp_path}/p.db"))
    assert result.new_trials == 30 and all(c.under_budget for c in result.pareto if c.recipe is None)


def test_a_study_name_belongs_to_one_search(tmp_path: Path, problem) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    run_search(problem, StudySettings(trials=10, storage=url, name="x"))
    other = compile_problem(problem.table, SearchSpace(act_bits=8), Budget(avg_bits=4.75))
    with pytest.raises(SearchError, match="created for another search.*budget"):
        run_search(other, StudySettings(trials=10, storage=url, name="x"))
    default = run_search(other, StudySettings(trials=10, storage=url))  # a derived name: a new study
    assert default.study != "x" and default.new_trials == 10


def test_database_url_and_errors(tmp_path: Path, monkeypatch, problem) -> None:
    monkeypatch.setenv(DB_ENV, "sqlite:///elsewhere.db")
    assert database_url(None) == "sqlite:///elsewhere.db" and database_url("sqlite:///a.db") == "sqlite:///a.db"
    monkeypatch.delenv(DB_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert database_url(None).startswith("sqlite:///") and database_url(None).endswith("quantplan.db")
    with pytest.raises(SearchError, match="cannot open the study database"):
        run_search(problem, StudySettings(trials=1, storage="nosuchdialect://x"))
    with pytest.raises(SearchError, match="cannot open the study database"):
        run_search(problem, StudySettings(trials=1, storage=f"sqlite:///{tmp_path}"))  # a directory
    created = run_search(problem, StudySettings(trials=1, storage=f"sqlite:///{tmp_path}/new/dir/q.db"))
    assert created.trials == len(REFERENCES)  # the references always run
    with pytest.raises(SearchError, match="trial space"):
        StudySettings(space="grid")
