"""Fixtures for the search tests: stories260K with a held-out split of its in-domain text and its table."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# Hypothesis keeps caches under .hypothesis/ in the working directory: keep the checkout clean instead. No
# example database (failures print their example).
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "quantplan-hypothesis")
settings.register_profile("quantplan-search", database=None, print_blob=True)
settings.load_profile("quantplan-search")


@dataclass
class StoriesSearch:
    """stories260K loaded, its sensitivity table (also saved to `table_path`), calibration and held-out data."""

    model_dir: Path
    net: Any
    table: Any
    table_path: Path
    calib_spec: str
    heldout_spec: str
    calib_tokens: Any
    windows: Any
    calibration: Any


@pytest.fixture(scope="session")
def stories_split(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path) -> tuple[Path, Path]:
    """sampled_seed1.txt cut at a line boundary: the first half calibrates, the second half is held out."""
    lines = (stories_dir / "sampled_seed1.txt").read_text(encoding="utf-8").split("\n")
    out = tmp_path_factory.mktemp("stories_text")
    calib, heldout = out / "calib.txt", out / "heldout.txt"
    calib.write_text("\n".join(lines[: len(lines) // 2]), encoding="utf-8")
    heldout.write_text("\n".join(lines[len(lines) // 2:]), encoding="utf-8")
    return calib, heldout


@pytest.fixture(scope="session")
def stories_search(tmp_path_factory, stories_hf: Path, stories_split, ray_local) -> StoriesSearch:
    from quantplan.workers.data import calibration_set, eval_windows
    from quantplan.workers.models import load_model
    from quantplan.workers.pipeline import sensitivity_table

    calib_spec, heldout_spec = (f"text:{p}" for p in stories_split)
    net, tokenizer = load_model(str(stories_hf))
    calib = calibration_set(calib_spec, tokenizer, samples=64, seq_len=128, seed=0)
    table, _ = sensitivity_table(net, calib, model_name=str(stories_hf), workers=2, cache=False)
    path = table.save(tmp_path_factory.mktemp("stories_table") / "stories.safetensors")
    windows = eval_windows(heldout_spec, tokenizer, seq_len=128)
    return StoriesSearch(stories_hf, net, table, path, calib_spec, heldout_spec, calib.tokens, windows, calib)
