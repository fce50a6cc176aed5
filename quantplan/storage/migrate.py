"""Programmatic Alembic: upgrade, downgrade and inspect the schema of a database URL (no alembic.ini needed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
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


def ensure_current(engine: Engine) -> None:
    """Migrate the database to the newest revision unless it is there: the check and the upgrade together under
    `schema_lock`, tried again (briefly) after a transient error such as SQLite's "database is locked" while
    another process creates the file."""
    url = engine.url.render_as_string(hide_password=False)

    def locked() -> None:
        with _schema_lock(url):
            if current_revision(engine) != head_revision():
                _run(engine, lambda cfg: command.upgrade(cfg, "head"), "upgrade to head")

    retry_transient(locked, "migration to head", tries=4)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database up to `revision` (default: the newest). Any number of processes may do this at once:
    they take turns under `schema_lock` (the later ones find the schema current), and the loser of a race outside
    the lock, or a short outage, is retried."""
    url = engine.url.render_as_string(hide_password=False)

    def locked() -> None:
        with _schema_lock(url):
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


@contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """`schema_lock`, a database error while taking it as our `StorageError`."""
    with ExitStack() as stack:
        try:
            stack.enter_context(schema_lock(url))
        except SQLAlchemyError as e:
            raise translate(e, url) from e
        yield


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
