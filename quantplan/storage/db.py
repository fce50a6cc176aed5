"""Engines and the one session scope: commit on success, roll back on error, re-raise as `StorageError`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from quantplan.settings import StorageSettings, normalize_url, safe_url, transient  # noqa: F401 - re-exported
from quantplan.storage.errors import DatabaseUnavailableError, StorageError


def make_engine(url: str, settings: StorageSettings | None = None) -> Engine:
    """An engine for a SQLite or PostgreSQL URL; SQLite gets WAL, foreign keys and a busy timeout."""
    settings = settings or StorageSettings(database_url=url)
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise StorageError(f"database URL {url!r} does not parse; use sqlite:///path or postgresql://...") from e
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, parsed.database, settings)
    if parsed.get_backend_name() != "postgresql":
        raise StorageError(f"unsupported database {parsed.get_backend_name()!r}; use SQLite or PostgreSQL")
    return create_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_recycle=settings.pool_recycle,
        pool_pre_ping=True,
    )


def _sqlite_engine(url: str, database: str | None, settings: StorageSettings) -> Engine:
    if database and database != ":memory:" and not database.startswith("file:"):
        from pathlib import Path

        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": settings.sqlite_busy_timeout})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # autocommit at the driver level, so SQLAlchemy's "begin" event below decides when a transaction starts
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        if database and database != ":memory:":
            cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front: two writers queue on the busy timeout instead of one of
        # them failing with "database is locked" when it upgrades a read lock mid-transaction.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class Database:
    """An engine plus its session factory; `session()` is the only way repository code touches the database."""

    def __init__(self, url: str, settings: StorageSettings | None = None) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url, settings)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back on any error.

        Database errors are re-raised as `StorageError` (the original chained as `__cause__`); other
        exceptions pass through unchanged after the rollback.
        """
        session = self._factory()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as e:
            session.rollback()
            raise translate(e, self.url) from e
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()


def translate(e: SQLAlchemyError, url: str) -> StorageError:
    """A `StorageError` whose message says what went wrong and what to do."""
    where = safe_url(url)
    detail = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
    if isinstance(e, IntegrityError):
        return StorageError(f"the write conflicts with stored data ({detail}); nothing was stored - "
                            "check for a duplicate key or a missing referenced row")
    if isinstance(e, (OperationalError, InterfaceError, PoolTimeoutError)):
        return DatabaseUnavailableError(f"database {where} failed: {detail}; check that it is reachable and migrated "
                            "(QUANTPLAN_DATABASE_URL, `storage.migrate.upgrade`)")
    if isinstance(e, DBAPIError):
        return StorageError(f"database {where} rejected the request: {detail}; the transaction was rolled back")
    return StorageError(f"storage error on {where}: {detail}; the transaction was rolled back")
