"""storage: SQLAlchemy models, Alembic migrations, the repository API and the artifact store (never imports torch).

    from quantplan.storage import Repository, NewPlan, open_store, load_settings
    settings = load_settings()                       # QUANTPLAN_DATABASE_URL, QUANTPLAN_ARTIFACTS, config file
    repo = Repository(settings=settings)             # opens the database and migrates it to the newest schema
    store = open_store(settings.artifacts)

See docs/STORAGE.md for the schema and the invariants. The settings live in `quantplan.settings` (the search's
Optuna study and the service read them too); this package re-exports them.
"""

from quantplan.errors import SettingsError
from quantplan.settings import StorageSettings, load_settings
from quantplan.storage.artifacts import (
    ArtifactStore,
    FsspecArtifactStore,
    LocalArtifactStore,
    StoredArtifact,
    open_store,
)
from quantplan.storage.db import transient
from quantplan.storage.errors import (
    ArtifactStoreError,
    DatabaseUnavailableError,
    InvalidRecordError,
    JobStateError,
    NotFoundError,
    StorageError,
)
from quantplan.storage.repository import (
    ArtifactRecord,
    JobRecord,
    LeaderboardPage,
    MetricRecord,
    ModelRecord,
    ModelSummary,
    NewPlan,
    PlanRecord,
    Repository,
    RequeueResult,
    StudyProgress,
    TableRecord,
    plan_sha256,
)

__all__ = [
    "ArtifactStoreError",
    "ArtifactRecord",
    "ArtifactStore",
    "DatabaseUnavailableError",
    "FsspecArtifactStore",
    "InvalidRecordError",
    "JobRecord",
    "JobStateError",
    "LeaderboardPage",
    "LocalArtifactStore",
    "MetricRecord",
    "ModelRecord",
    "ModelSummary",
    "NewPlan",
    "NotFoundError",
    "PlanRecord",
    "Repository",
    "RequeueResult",
    "SettingsError",
    "StorageError",
    "StorageSettings",
    "StoredArtifact",
    "StudyProgress",
    "TableRecord",
    "load_settings",
    "open_store",
    "transient",
    "plan_sha256",
]
