"""Storage fixtures: every repository test runs on SQLite (a temporary file) and on PostgreSQL.

PostgreSQL is the server at 127.0.0.1:5432 (`.ci/run` starts it); `QUANTPLAN_TEST_PG_URL` points elsewhere.
Each test session creates uniquely named databases on it and drops them at the end. An unreachable server
FAILS the PostgreSQL tests: they never skip, so CI cannot pass without exercising PostgreSQL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import text

from storage import Repository
from storage.models import Base

PG_ADMIN_URL = os.environ.get("QUANTPLAN_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]


class PgDatabases:
    """Creates fresh databases on the test server and drops them all at the end of the session."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.prefix = f"quantplan_test_{uuid.uuid4().hex[:10]}"
        self.created: list[str] = []
        try:
            self.conn = psycopg.connect(admin_url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as e:
            pytest.fail(f"PostgreSQL is unreachable at {admin_url} ({e}); start it with `.ci/run` or set "
                        "QUANTPLAN_TEST_PG_URL - the PostgreSQL storage tests must not be skipped", pytrace=False)

    def create(self) -> str:
        name = f"{self.prefix}_{len(self.created)}"
        self.conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.created.append(name)
        base = self.admin_url.rsplit("/", 1)[0]
        return f"{base}/{name}"

    def drop_all(self) -> None:
        for name in self.created:
            self.conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        self.conn.close()


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    databases = PgDatabases(PG_ADMIN_URL)
    yield databases
    databases.drop_all()


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
