"""The Optuna driver: one ask/tell loop over the proxy, its study kept in the project database (RDB storage).

Objectives: predicted loss (nats/token) and bytes, both minimized (a Pareto front). The reference plans (the
exact knapsack optimum, FPTQ's rule and the uniform baselines of `search.recipes`) are enqueued in the stored
study and run as its first trials; a resumed study enqueues only those it lacks, so each appears once.
Searched trials take milliseconds of proxy work, so the driver asks and tells them on an in-memory mirror
holding the study's searched trials (TPE's time then stays in numpy, not in SQL round trips, and its
multivariate model sees one parameter set) while a background thread writes each completed trial to the RDB
study (`add_trial`, one transaction each). A search killed at any point resumes from the trials written;
`--trials N` is the number of completed trials the study should hold, so rerunning the same command finishes
the job. One driver per study at a time: trials left RUNNING are failed when a driver starts.
`optuna-dashboard <db-url>` shows the study.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from quantplan.quant.schemes import LayerScheme
from quantplan.search import knapsack, recipes
from quantplan.search.problem import Candidate, Problem
from quantplan.search.space import SearchError
from quantplan.search.trials import SPACES
from quantplan.settings import load_settings, normalize_url, retry_transient, safe_url, schema_lock

log = logging.getLogger(__name__)

DB_ENV = "QUANTPLAN_DATABASE_URL"
CONFIG_ATTR = "quantplan.config"
STUDY_VERSION = 1
DIRECTIONS = ("minimize", "minimize")  # predicted loss, bytes
KNAPSACK = "knapsack"


def database_url(url: str | None = None) -> str:
    """--db, else the project database (`quantplan.settings`: $QUANTPLAN_DATABASE_URL, the config file, or
    SQLite in the user data dir), with postgresql:// mapped to the installed psycopg 3 driver."""
    return normalize_url(url or load_settings().database_url)


@dataclass(frozen=True)
class StudySettings:
    """How many trials the study should hold, in which trial space, and where it lives."""

    trials: int = 300  # the same as quantplan.service.jobs.DEFAULTS (tests/service/test_defaults.py)
    space: str = "structured"  # a key of search.trials.SPACES
    seed: int = 0
    name: str | None = None  # default: derived from the table, budget and space (reruns resume)
    storage: str | None = None  # SQLAlchemy URL (default: database_url())

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise SearchError(f"unknown trial space {self.space!r}; use one of {', '.join(SPACES)}")
        if self.trials < 0:
            raise SearchError(f"--trials must be >= 0, got {self.trials}")


@dataclass
class SearchResult:
    """The study's Pareto set, the enqueued reference plans, and what this run did."""

    study: str
    storage: str
    knapsack: knapsack.KnapsackResult
    pareto: list[Candidate]  # nondominated (predicted loss, bytes), by bytes
    references: list[Candidate]  # knapsack optimum + recipes, in enqueue order
    trials: int  # completed trials in the study
    new_trials: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def trials_per_minute(self) -> float:
        return 60 * self.new_trials / max(self.seconds, 1e-9)

    def best(self) -> Candidate:
        """The least predicted loss within the budget and the search space."""
        fits = [c for c in self.pareto + self.references if c.under_budget and c.in_space]
        return min(fits, key=lambda c: c.predicted_loss)


def study_config(problem: Problem, settings: StudySettings) -> dict[str, Any]:
    """What a study was created for: reusing its name with other settings is an error."""
    return {"version": STUDY_VERSION, "table": problem.table.key, "budget": problem.budget.to_dict(),
            "space": problem.space.to_dict(), "trial_space": settings.space}


def default_study_name(problem: Problem, settings: StudySettings) -> str:
    model = Path(str(problem.table.model.get("name") or "model").rstrip("/")).name or "model"
    digest = hashlib.sha256(json.dumps(study_config(problem, settings), sort_keys=True).encode()).hexdigest()
    return f"quantplan-{re.sub(r'[^A-Za-z0-9_.-]+', '-', model)}-{digest[:10]}"


def run_search(
    problem: Problem, settings: StudySettings, *, on_trial: Callable[[int, int], None] | None = None
) -> SearchResult:
    """Run (or resume) the study until it holds `settings.trials` completed trials; return its Pareto set."""
    start = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = database_url(settings.storage)
    name = settings.name or default_study_name(problem, settings)
    stored = _open_study(url, name, study_config(problem, settings))
    exact = knapsack.solve(problem)
    references = {KNAPSACK: problem.candidate(exact.choice, KNAPSACK, recipe=KNAPSACK)}
    references |= {c.recipe: c for c in recipes.baselines(problem)}
    new = _run_references(stored, references)
    trials = stored.get_trials(deepcopy=False)
    searched = [t for t in trials if t.state == TrialState.COMPLETE and "recipe" not in t.user_attrs]
    remaining = settings.trials - sum(t.state == TrialState.COMPLETE for t in trials)
    mirror = optuna.create_study(directions=list(DIRECTIONS), sampler=_sampler(settings.seed + len(trials)))
    mirror.add_trials(searched)
    trial_space = SPACES[settings.space](problem)
    new += _loop(mirror, stored, problem, trial_space, remaining, len(trials), on_trial)
    numbers = {t.user_attrs["recipe"]: t.number for t in stored.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE,)) if "recipe" in t.user_attrs}
    refs = [replace(c, trial=numbers.get(name)) for name, c in references.items()]
    pareto = pareto_front([decode(problem, t) for t in mirror.best_trials] + refs)
    total = len(searched) + len(numbers) + max(remaining, 0)
    return SearchResult(name, safe_url(url), exact, pareto, refs, total, new, time.perf_counter() - start)


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """The nondominated candidates in (predicted loss, bytes), one per distinct plan, by bytes."""
    front: list[Candidate] = []
    seen: set[tuple[LayerScheme, ...]] = set()
    for c in sorted(candidates, key=lambda c: (c.bytes, c.predicted_loss, c.trial if c.trial is not None else -1)):
        if c.schemes in seen or (front and front[-1].predicted_loss <= c.predicted_loss):
            continue
        seen.add(c.schemes)
        front.append(c)
    return front


def _run_references(stored: optuna.Study, references: dict[str, Candidate]) -> int:
    """Enqueue the reference plans the study lacks (each appears once, even after a resume) and run every
    waiting trial. RUNNING trials were left by a killed driver (one driver per study): they are failed first."""
    for t in stored.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        stored.tell(t.number, state=TrialState.FAIL)
    held = {t.user_attrs.get("recipe") for t in stored.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING))}
    for name in references:
        if name not in held:
            stored.enqueue_trial({}, user_attrs={"recipe": name})
    ran = 0
    while stored.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial = stored.ask()
        candidate = references.get(trial.user_attrs.get("recipe"))
        if candidate is None:  # enqueued by someone else: not a plan this search can score
            stored.tell(trial, state=TrialState.FAIL)
            continue
        trial.set_user_attr("plan", encode(candidate)["plan"])
        trial.set_user_attr("avg_bits", candidate.avg_bits)
        stored.tell(trial, [candidate.predicted_loss, candidate.bytes])
        ran += 1
    return ran


_storages: dict[str, optuna.storages.RDBStorage] = {}  # one per database URL and process
_storages_lock = threading.Lock()


def study_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage of `url`, created once per process (pass it to `optuna.load_study` to read a study).
    Creating it creates Optuna's tables: concurrent creators take turns under `schema_lock`, and one that loses a
    race or meets a short outage tries again."""
    with _storages_lock:
        if url not in _storages:
            def create() -> optuna.storages.RDBStorage:
                with schema_lock(url):
                    return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))

            storage = retry_transient(create, f"opening the study database {safe_url(url)}")
            _tune_sqlite(storage)
            _storages[url] = storage
        return _storages[url]


def _open_study(url: str, name: str, config: dict[str, Any]) -> optuna.Study:
    try:
        storage = study_storage(url)
        study = retry_transient(lambda: optuna.create_study(
            storage=storage, study_name=name, directions=list(DIRECTIONS), load_if_exists=True,
            sampler=optuna.samplers.RandomSampler()), f"opening study {name!r}")
    except (ImportError, ValueError, OSError) as e:
        raise SearchError(f"cannot open the study database {safe_url(url)}: {e}; pass --db with a SQLAlchemy URL "
                          f"(e.g. sqlite:///quantplan.db) or set {DB_ENV}") from None
    except Exception as e:  # SQLAlchemy and Optuna storage errors (unreachable server, bad credentials, ...)
        if type(e).__module__.startswith(("sqlalchemy", "optuna")):
            raise SearchError(f"cannot open the study database {safe_url(url)}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0]}; check --db or {DB_ENV}") from None
        raise
    _check_config(study, name, config)
    return study


def _engine_kwargs(url: str) -> dict[str, Any]:
    """The project's pool and busy-timeout settings (`quantplan.settings`) for Optuna's own engine."""
    settings = load_settings()
    if url.startswith("sqlite"):
        database = url.split(":///", 1)[-1]
        if database and not database.startswith((":memory:", "file:")):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return {"connect_args": {"timeout": settings.sqlite_busy_timeout}}
    return {"pool_size": settings.pool_size, "max_overflow": settings.max_overflow,
            "pool_timeout": settings.pool_timeout, "pool_recycle": settings.pool_recycle, "pool_pre_ping": True}


def _tune_sqlite(storage: optuna.storages.RDBStorage) -> None:
    """WAL journal: readers (optuna-dashboard) never block the driver, and a commit needs no fsync of the
    database file (synchronous=NORMAL keeps it consistent after a crash; the last commits may be lost)."""
    if storage.engine.dialect.name != "sqlite":
        return

    def on_connect(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened before the listener existed


def _check_config(study: optuna.Study, name: str, config: dict[str, Any]) -> None:
    if [d.name for d in study.directions] != [d.upper() for d in DIRECTIONS]:
        raise SearchError(f"study {name!r} exists with other objectives; choose another --study name")
    found = study.user_attrs.get(CONFIG_ATTR)
    if found is None:
        study.set_user_attr(CONFIG_ATTR, config)
    elif found != config:
        diff = sorted(k for k in set(found) | set(config) if found.get(k) != config.get(k))
        raise SearchError(
            f"study {name!r} was created for another search ({', '.join(diff)} differ); pass another --study "
            "name, or leave --study out to get one derived from the settings"
        )


def _sampler(seed: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def _loop(mirror, stored, problem, trial_space, remaining, numbered, on_trial) -> int:
    """`remaining` searched trials: asked and told on the in-memory mirror, written to the stored study.
    The k-th new trial is number `numbered + k` there (the writer adds them in order)."""
    with _writer(stored) as write:
        for k in range(max(remaining, 0)):
            trial = mirror.ask()
            number = numbered + k
            candidate = problem.candidate(trial_space.suggest(trial), f"trial {number}", trial=number)
            for key, value in encode(candidate).items():
                trial.set_user_attr(key, value)
            write(mirror.tell(trial, [candidate.predicted_loss, candidate.bytes]))
            if on_trial is not None:
                on_trial(k + 1, remaining)
    return max(remaining, 0)


@contextmanager
def _writer(stored: optuna.Study) -> Iterator[Callable[[FrozenTrial], None]]:
    """Adds completed trials to the stored study from a background thread (SQL round trips overlap the
    sampling); on exit, normal or not, waits until every trial handed over is written."""
    pending: queue.Queue[FrozenTrial | None] = queue.Queue()
    errors: list[BaseException] = []

    def run() -> None:
        while (trial := pending.get()) is not None:
            try:
                if not errors:
                    stored.add_trial(trial)
            except Exception as e:  # reported by the driver thread below
                errors.append(e)

    thread = threading.Thread(target=run, name="quantplan-study-writer", daemon=True)
    thread.start()
    try:
        yield pending.put
    finally:
        pending.put(None)
        thread.join()
        if errors:
            raise SearchError(f"writing trials to the study database failed: {errors[0]}") from errors[0]


# -- trials <-> candidates -------------------------------------------------------------------------------------
def encode(candidate: Candidate) -> dict[str, Any]:
    """User attributes that let any later run rebuild the plan: distinct scheme names and one index per layer."""
    names = candidate.names()
    distinct = sorted(set(names))
    index = {s: i for i, s in enumerate(distinct)}
    layout = ",".join(str(index[s]) for s in names)
    attrs: dict[str, Any] = {"plan": {"schemes": distinct, "layout": layout}, "avg_bits": candidate.avg_bits}
    if candidate.trial is not None:
        attrs["number"] = candidate.trial  # the number in the stored study (the mirror numbers differently)
    return attrs


def decode(problem: Problem, trial: FrozenTrial) -> Candidate:
    distinct, layout = trial.user_attrs["plan"]["schemes"], trial.user_attrs["plan"]["layout"].split(",")
    recipe = trial.user_attrs.get("recipe")
    number = trial.user_attrs.get("number", trial.number)
    label = recipe or f"trial {number}"
    schemes = [problem.scheme(name) for name in distinct]
    return problem.score([schemes[int(i)] for i in layout], label, trial=number, recipe=recipe)

