"""First opens of a database race-free (issue 16): 4 processes open the same brand-new database at once, round
after round, on SQLite and PostgreSQL (a new file, a new schema): each migrates QuantPlan's schema (Alembic) and
opens an Optuna study in it (Optuna's tables, its own Alembic version table). Before `schema_lock` one of them died
with `table alembic_version already exists`, `UNIQUE constraint failed: alembic_version.version_num` or, on
PostgreSQL, `duplicate key value violates unique constraint "pg_type_typname_nsp_index"`."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from quantplan.settings import normalize_url
from quantplan.storage import migrate
from quantplan.storage.db import Database

from .conftest import BACKENDS

PROCESSES = 4
ROUNDS = {"sqlite": 10, "postgresql": 10}  # a fresh database each round; the test stays well under 30 s


def _open_race(inbox: Any, outbox: Any, barrier: Any, index: int) -> None:
    """A worker: for each URL it is sent, wait for the others, then migrate and open a study; report the error."""
    from quantplan.search import study
    from quantplan.storage import Repository

    while (url := inbox.get()) is not None:
        barrier.wait()
        try:
            Repository(url).close()
            study._open_study(url, f"race-{index}", {"round": url})
            outbox.put(None)
        except Exception as e:  # reported to the test, which shows them all
            outbox.put(f"{type(e).__name__}: {str(e).splitlines()[0]}")
        finally:  # the process keeps its storage for the URL; a round's database is not used again
            storage = study._storages.pop(url, None)
            if storage is not None:
                storage.engine.dispose()


def _new_schema(request: pytest.FixtureRequest, round_: int) -> str:
    """An empty schema of one PostgreSQL database, first on the search path of the URL returned: as new as a new
    database for the race (tables, types and the version tables are per schema) but created in milliseconds
    (CREATE/DROP DATABASE take seconds each)."""
    url = getattr(request, "_race_database", None) or request.getfixturevalue("pg_databases").create()
    request._race_database = url  # type: ignore[attr-defined]
    engine = create_engine(normalize_url(url))
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA round{round_}"))
    engine.dispose()
    return f"{url}?options=-csearch_path%3Dround{round_}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_four_processes_open_a_new_database_at_once(backend: str, tmp_path: Path, request) -> None:
    context = mp.get_context("spawn")  # no forked copies of this process's engines and threads
    barrier, outbox = context.Barrier(PROCESSES), context.Queue()
    inboxes = [context.Queue() for _ in range(PROCESSES)]
    workers = [context.Process(target=_open_race, args=(inboxes[i], outbox, barrier, i), daemon=True)
               for i in range(PROCESSES)]
    for worker in workers:
        worker.start()
    failures: list[str] = []
    try:
        for round_ in range(ROUNDS[backend]):
            url = f"sqlite:///{tmp_path / f'round{round_}.db'}" if backend == "sqlite" else _new_schema(request, round_)
            for inbox in inboxes:
                inbox.put(url)
            failures += [f"round {round_}: {e}" for e in (outbox.get(timeout=60) for _ in workers) if e]
            db = Database(url)
            try:
                assert migrate.current_revision(db.engine) == migrate.head_revision()
            finally:
                db.dispose()
    finally:
        for inbox in inboxes:
            inbox.put(None)
        for worker in workers:
            worker.join(timeout=30)
    assert failures == []


def test_four_runners_migrate_a_new_postgresql_database_at_once(pg_databases, tmp_path: Path) -> None:
    """`quantplan runner` x 4 started together on a database nobody has migrated (issue 16's report: one exited with
    `duplicate key value violates unique constraint "pg_type_typname_nsp_index"`)."""
    url = pg_databases.create()
    env = {**os.environ, "QUANTPLAN_CACHE_DIR": str(tmp_path / "cache"), "QUANTPLAN_ARTIFACTS": str(tmp_path / "a")}
    procs = [subprocess.Popen([sys.executable, "-m", "quantplan.service.cli", "runner", "--once", "--db", url],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(PROCESSES)]
    errors = [p.communicate(timeout=120)[1].decode()[-2000:] for p in procs]
    assert [p.returncode for p in procs] == [0] * PROCESSES, errors
    db = Database(url)
    try:
        assert migrate.current_revision(db.engine) == migrate.head_revision()
    finally:
        db.dispose()
