"""Migrations: upgrade from empty and downgrade back on both databases; the schema matches the models."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from quantplan.storage import migrate
from quantplan.storage.db import Database
from quantplan.storage.models import Base

from .conftest import BACKENDS

OURS = set(Base.metadata.tables)


def _tables(db: Database) -> set[str]:
    return set(inspect(db.engine).get_table_names())


@pytest.mark.parametrize("empty_url", BACKENDS, indirect=True)
def test_upgrade_from_empty_and_downgrade_back(empty_url: str) -> None:
    db = Database(empty_url)
    try:
        assert migrate.current_revision(db.engine) is None and not _tables(db) & OURS
        migrate.upgrade(db.engine)
        assert migrate.current_revision(db.engine) == migrate.head_revision()
        assert _tables(db) >= OURS
        with db.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs = [d for d in compare_metadata(context, Base.metadata) if migrate.VERSION_TABLE not in repr(d)]
        assert diffs == [], "migrations and storage/models.py disagree; add a migration"
        migrate.downgrade(db.engine)
        assert migrate.current_revision(db.engine) is None and not _tables(db) & OURS
        migrate.upgrade(db.engine)  # and up again: the round trip leaves nothing behind
        assert migrate.current_revision(db.engine) == migrate.head_revision()
    finally:
        db.dispose()


@pytest.mark.parametrize("empty_url", BACKENDS, indirect=True)
def test_optuna_tables_share_the_database(empty_url: str) -> None:
    import optuna

    db = Database(empty_url)
    try:
        migrate.upgrade(db.engine)
        storage = optuna.storages.RDBStorage(db.url)
        study = optuna.create_study(storage=storage, study_name="s")
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        assert "alembic_version" in _tables(db) and "studies" in _tables(db)
        assert migrate.current_revision(db.engine) == migrate.head_revision()  # separate version tables
        migrate.downgrade(db.engine)
        assert not _tables(db) & OURS
        assert len(optuna.load_study(study_name="s", storage=db.url).trials) == 2  # Optuna's data untouched
        storage.engine.dispose()
    finally:
        db.dispose()

