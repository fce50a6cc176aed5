"""Project settings (database URL, artifact location, Ray address, pool sizing, API tokens, the server's roots) and
the database helpers (URLs; `schema_lock` and `retry_transient`, which make concurrent schema creation and short
outages safe), read by storage, the search's Optuna study and the service alike (torch-free; imports no
subpackage).

Precedence, highest first: keyword arguments to `load_settings`, environment variables (`QUANTPLAN_*`),
the TOML config file, the defaults. The config file is the path given to `load_settings`, else
`$QUANTPLAN_CONFIG`, else `<user config dir>/quantplan/config.toml` when it exists. Its keys are the field
names below (`database_url = "postgresql://..."`); an unknown key is an error, not silently ignored.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import platformdirs
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import NullPool

from quantplan.errors import SettingsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no file lock, the retries still apply
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("quantplan.settings")
T = TypeVar("T")

APP_NAME = "quantplan"
CONFIG_ENV = "QUANTPLAN_CONFIG"


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` URLs use psycopg 3 (the only PostgreSQL driver QuantPlan installs)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages and output."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


# the loser of a concurrent schema creation (Alembic's or Optuna's tables, PostgreSQL's catalog)
ALREADY_EXISTS = ("already exists", "unique constraint failed: alembic_version", "duplicate key value")
# database errors that waiting does not cure (a wrong path, name or password), though the driver calls them
# "operational" like an outage
PERMANENT = ("unable to open database file", "does not exist", "authentication failed", "no such table",
             "readonly database", "not a database")
SCHEMA_LOCK_KEY = 0x5150_1A4E_0016  # the PostgreSQL advisory lock that serializes schema creation


def causes(e: BaseException) -> Iterator[BaseException]:
    """`e` and the errors it was raised from (`__cause__`, else `__context__`), each once."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def transient(e: BaseException) -> bool:
    """Whether `e`, or an error it was raised from, is a database outage (connection refused, lock or pool
    timeout), or the loser of a concurrent schema creation: worth another try, never the caller's fault.
    Our own errors say so with a true `transient` attribute (`storage.DatabaseUnavailableError`)."""
    chain = list(causes(e))
    if any(text in str(c).lower() for c in chain for text in PERMANENT):
        return False
    return any(_transient_one(c) for c in chain)


def _transient_one(e: BaseException) -> bool:
    if getattr(e, "transient", False) is True or isinstance(e, (OperationalError, InterfaceError, PoolTimeoutError)):
        return True
    return isinstance(e, (IntegrityError, ProgrammingError)) and any(t in str(e).lower() for t in ALREADY_EXISTS)


def from_database(e: BaseException) -> bool:
    """Whether `e`, or an error it was raised from, is the database driver's: its text may hold the database's
    URL, host or schema, so it belongs in the log, not in a message a client reads."""
    return any(isinstance(c, SQLAlchemyError) for c in causes(e))


def retry_transient(action: Callable[[], T], what: str, *, tries: int = 6, first_wait: float = 0.2) -> T:
    """`action()`, tried again after 0.2, 0.4, 0.8, ... s while it fails with a `transient` error."""
    for attempt in range(tries):
        try:
            return action()
        except Exception as e:
            if attempt == tries - 1 or not transient(e):
                raise
            log.warning("%s: %s; trying again", what, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            time.sleep(first_wait * 2**attempt)
    raise AssertionError("unreachable")


@contextmanager
def schema_lock(url: str) -> Iterator[None]:
    """Serialize schema creation (migrations, Optuna's tables) across processes: a PostgreSQL advisory lock, or an
    exclusive lock on `<file>.lock` beside a SQLite file (an in-memory database needs none)."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() == "postgresql":
        engine = create_engine(parsed, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
                    conn.commit()
        finally:
            engine.dispose()
        return
    database = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:") or fcntl is None:
        yield
        return
    lock = Path(database).expanduser()
    lock = lock.with_name(lock.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def user_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME))


def default_database_url() -> str:
    return f"sqlite:///{user_data_dir() / 'quantplan.db'}"


def default_artifacts() -> str:
    return str(user_data_dir() / "artifacts")


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


class StorageSettings(BaseSettings):
    """Where QuantPlan keeps its database and artifacts; pool sizes apply to PostgreSQL only."""

    model_config = SettingsConfigDict(env_prefix="QUANTPLAN_", extra="forbid", frozen=True)
    _file_values: ClassVar[dict[str, Any]] = {}

    database_url: str = Field(default_factory=default_database_url, min_length=1)
    artifacts: str = Field(default_factory=default_artifacts, min_length=1)
    ray_address: str | None = None
    pool_size: int = Field(default=5, ge=1)
    max_overflow: int = Field(default=10, ge=0)
    pool_timeout: float = Field(default=30.0, gt=0)
    pool_recycle: int = Field(default=1800, ge=-1)  # seconds; PostgreSQL servers and proxies drop idle links
    sqlite_busy_timeout: float = Field(default=30.0, gt=0)  # seconds a writer waits for SQLite's lock
    # the HTTP service (`quantplan serve`)
    # comma-separated bearer tokens, each `token`, `name=token` (name: submitter) or either with `:admin` / `:user`
    api_tokens: str | None = None
    auth_reads: bool = False  # also require a token for reads (GET)
    max_request_bytes: int = Field(default=1_000_000, ge=1024)  # larger request bodies get 413
    # what a submitted job may read on the server (os.pathsep-separated directories; none: no local path)
    model_roots: str | None = None
    data_roots: str | None = None
    allow_hub: bool = False  # also accept Hugging Face hub ids (model) and the hub's WikiText-2 (data)

    def principals(self) -> dict[str, tuple[str, str]]:
        """The configured bearer tokens, token -> (name, role); the name is recorded as a job's submitter, the
        role is `admin` (may act on every job) or `user` (on its own jobs)."""
        out: dict[str, tuple[str, str]] = {}
        for i, item in enumerate(t.strip() for t in (self.api_tokens or "").split(",")):
            if not item:
                continue
            name, sep, token = item.partition("=")
            if not sep:
                name, token = f"token{i + 1}", item
            token, role = _role(token.strip())
            if len(token) < 8:
                raise SettingsError(f"API token {name.strip()!r} is shorter than 8 characters; use a long random "
                                    "token (e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)")
            out[token] = (name.strip(), role)
        return out

    def tokens(self) -> dict[str, str]:
        """The configured bearer tokens, token -> name (the name recorded as a job's submitter)."""
        return {token: name for token, (name, _) in self.principals().items()}

    def roots(self, kind: str) -> tuple[str, ...]:
        """The configured `model` or `data` roots, as written (`os.pathsep`-separated, empty entries dropped)."""
        value = self.model_roots if kind == "model" else self.data_roots
        return tuple(r.strip() for r in (value or "").split(os.pathsep) if r.strip())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FileValues(settings_cls, cls._file_values)


class _FileValues(PydanticBaseSettingsSource):
    """The already-validated key/value pairs of the config file, below the environment in precedence."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The keys of a TOML config file; unknown keys and bad TOML raise `SettingsError`."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist; create it or unset ${CONFIG_ENV}") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SettingsError(f"cannot read config file {path}: {e}; fix the TOML syntax") from e
    unknown = sorted(set(values) - set(StorageSettings.model_fields))
    if unknown:
        known = ", ".join(StorageSettings.model_fields)
        raise SettingsError(f"unknown key(s) {', '.join(unknown)} in config file {path}; known keys: {known}")
    return values


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> StorageSettings:
    """Settings from overrides, the environment and the config file (see the module docstring)."""
    path = _config_path(config_file)
    cls = StorageSettings
    if path is not None:
        cls = type("StorageSettingsFromFile", (StorageSettings,), {"_file_values": read_config_file(path)})
    try:
        return cls(**overrides)
    except ValidationError as e:
        where = f" (config file {path})" if path else ""
        raise SettingsError(f"invalid storage settings{where}: {_short(e)}; fix the value or unset it") from e


def _config_path(config_file: str | Path | None) -> Path | None:
    if config_file is not None:
        return Path(config_file)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    default = default_config_path()
    return default if default.is_file() else None


ROLES = ("user", "admin")


def _role(token: str) -> tuple[str, str]:
    """(token, role) of `TOKEN` or `TOKEN:role`; a `:suffix` that is not a role stays part of the token."""
    head, sep, suffix = token.rpartition(":")
    if sep and suffix.strip().lower() in ROLES:
        return head.strip(), suffix.strip().lower()
    return token, "user"


def _short(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
