"""Programmatic Alembic: upgrade, downgrade and inspect the schema of a database URL (no alembic.ini needed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from quantplan.settings import retry_transient, schema_lock
from quantplan.storage.db import translate
from quantplan.storage.errors import StorageError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "quantplan_alembic_version"  # not "alembic_version": Optuna keeps its own there


def alembic_config(engine: Engine) -> Config:
    """An Alembic config bound to `engine`; the URL never passes through ini interpolation (no `%` escaping)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = engine.url.render_as_string(hide_password=False)
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database up to `revision` (default: the newest). Any number of processes may do this at once:
    they take turns under `schema_lock` (the later ones find the schema current), and the loser of a race outside
    the lock, or a short outage, is retried."""
    url = engine.url.render_as_string(hide_password=False)

    def locked() -> None:
        with schema_lock(url):
            _run(engine, lambda cfg: command.upgrade(cfg, revision), f"upgrade to {revision}")

    retry_transient(locked, f"migration to {revision}")


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Migrate the database down to `revision` (default: empty, dropping every QuantPlan table)."""
    _run(engine, lambda cfg: command.downgrade(cfg, revision), f"downgrade to {revision}")


def head_revision() -> str:
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None, "the migrations directory has no revision"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for a database QuantPlan has never migrated."""
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    except SQLAlchemyError as e:
        raise translate(e, str(engine.url)) from e


def _run(engine: Engine, action: Callable[[Config], None], what: str) -> None:
    config = alembic_config(engine)
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            action(config)
    except SQLAlchemyError as e:
        cause = translate(e, str(engine.url))
        raise StorageError(f"migration ({what}) failed and was rolled back: {cause}; check the URL and that the "
                           "user may create tables") from e
