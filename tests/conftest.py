"""Shared fixtures: offline hub settings, the shared test data, converted stories260K."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that wait for work sleep instead of spinning. Read when torch loads its OpenMP runtime, so set
# before torch is imported; inherited by the Ray workers (which run a task on all of a 2-CPU Ray's threads) and
# by the runner and server processes the tests start. Spinning threads of a worker, the driver and the other
# processes on 2 cores made the Ray tasks of the tiny test models 5-10x slower; the results do not change.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after OMP_WAIT_POLICY)

# Tiny models gain nothing from intra-op threads, and on 2 cores shared with Ray workers the OpenMP spinning
# of a second thread makes small ops 10-20x slower; one thread keeps the suite fast and deterministic.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QUANTPLAN_SHARED_DATA", REPO.parent / "shared" / "data"))
STORIES = SHARED_DATA / "models" / "stories260K"


# PostgreSQL is the server at 127.0.0.1:5432 (`.ci/run` starts it); `QUANTPLAN_TEST_PG_URL` points elsewhere.
# Each test session creates uniquely named databases on it and drops them at the end.
PG_ADMIN_URL = os.environ.get("QUANTPLAN_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"shared test data not found at {SHARED_DATA}; set QUANTPLAN_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def stories_dir(shared_data: Path) -> Path:
    return STORIES


@pytest.fixture(scope="session")
def stories_hf(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path) -> Path:
    """stories260K converted once per test session to a Hugging Face Llama directory."""
    from quantplan.workers.llama2c import convert_llama2c

    out = tmp_path_factory.mktemp("stories260K") / "hf"
    return convert_llama2c(stories_dir / "stories260K.bin", stories_dir / "tok512.bin", out)


DEMO_STEPS = 30  # training steps of the session's demo model (the loss falls by more than 0.3 within them)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-model cache holding the demo model trained for DEMO_STEPS steps, built once per session for every
    test that needs a demo model (workers/test_demo.py tests the build itself)."""
    from quantplan.workers.demo import build_demo_model

    cache = tmp_path_factory.mktemp("demo-cache")
    build_demo_model(cache, steps=DEMO_STEPS, progress=False)
    return cache


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) for the whole session; shut down at the end."""
    import ray

    from quantplan.workers.tasks import init_ray

    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The session's Ray instance (its GCS address) for the `quantplan runner` / `serve` processes a test starts:
    they join it (QUANTPLAN_RAY_ADDRESS) instead of starting a Ray instance of their own, which takes seconds."""
    return ray_local.get_runtime_context().gcs_address
