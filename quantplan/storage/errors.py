"""Storage errors: database, job-state and artifact failures, each a `QuantPlanError` whose message says what to do."""

from __future__ import annotations

from quantplan.errors import QuantPlanError


class StorageError(QuantPlanError):
    """A database or artifact-store operation failed; the transaction was rolled back."""


class DatabaseUnavailableError(StorageError):
    """The database cannot be reached or refused the connection (a service answers 503 and the caller retries)."""

    transient = True  # `quantplan.settings.transient`: worth another try


class NotFoundError(StorageError, LookupError):
    """A job, plan, model or artifact id that is not in the database or store."""


class JobStateError(StorageError):
    """A job transition that its current state forbids (e.g. finishing a job this runner no longer owns)."""


class ArtifactStoreError(StorageError):
    """An artifact that cannot be written, read, or whose content no longer matches its sha256."""


class InvalidRecordError(StorageError, ValueError):
    """A value that cannot be stored (negative bytes, NaN metric, progress outside [0, 1], ...)."""
