"""Shared fixtures: offline hub settings, the shared test data, converted stories260K."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models gain nothing from intra-op threads, and on 2 cores shared with Ray workers the OpenMP spinning
# of a second thread makes small ops 10-20x slower; one thread keeps the suite fast and deterministic.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QUANTPLAN_SHARED_DATA", REPO.parent / "shared" / "data"))
STORIES = SHARED_DATA / "models" / "stories260K"


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
    from workers.llama2c import convert_llama2c

    out = tmp_path_factory.mktemp("stories260K") / "hf"
    return convert_llama2c(stories_dir / "stories260K.bin", stories_dir / "tok512.bin", out)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) for the whole session; shut down at the end."""
    import ray

    from workers.tasks import init_ray

    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()
