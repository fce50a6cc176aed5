"""Alembic environment: runs on the connection or URL that `storage.migrate` passes in `config.attributes`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from quantplan.storage.db import make_engine
from quantplan.storage.migrate import VERSION_TABLE
from quantplan.storage.models import Base

config = context.config


def _ours(name: str | None, type_: str, parent_names: object) -> bool:
    # Optuna's tables share the database: autogenerate must neither drop nor alter them.
    return type_ != "table" or name in Base.metadata.tables


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        include_name=_ours,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.attributes["url"])
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported; run storage.migrate.upgrade(url)")
run_migrations_online()
