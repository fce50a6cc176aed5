"""Storage fixtures: every repository test runs on SQLite (a temporary file) and on PostgreSQL.

PostgreSQL databases come from the `pg_databases` fixture in tests/conftest.py (an unreachable server FAILS the
PostgreSQL tests: they never skip, so CI cannot pass without exercising PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from quantplan.storage import Repository
from quantplan.storage.models import Base

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty database of the backend named by the test's `backend` parameter."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("pg_databases").create()


@pytest.fixture(scope="session", params=BACKENDS)
def session_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Repository]:
    """One migrated database per backend for the whole session."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'quantplan.db'}"
    else:
        url = request.getfixturevalue("pg_databases").create()
    repo = Repository(url)
    yield repo
    repo.close()


@pytest.fixture
def repo(session_repo: Repository) -> Repository:
    """The session's repository with every QuantPlan table emptied."""
    with session_repo.db.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            names = ", ".join(t.name for t in Base.metadata.sorted_tables)
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        else:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())
    return session_repo
