"""The torch-side pipeline stages on stories260K: `load` builds exactly the token sets its frozen `LoadSpec` asks
for, checks before any data work, and fails on bad data specs before the model loads; data-spec syntax is
torch-free."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from quantplan.errors import DataError, PlanError
from quantplan.quant.plan import Plan
from quantplan.workers.data import DataSpec
from quantplan.workers.dataspec import parse_syntax
from quantplan.workers.pipeline import LoadSpec, load

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def text(stories_dir: Path) -> str:
    return f"text:{stories_dir / 'sampled_seed1.txt'}"


def test_load_builds_what_the_spec_asks_for(stories_hf: Path, text: str) -> None:
    spec = LoadSpec(model=str(stories_hf), data=text, seq_len=64, calib_samples=8, windows=True, eval_samples=4,
                    select=True, select_samples=3)
    loaded = load(spec)
    assert loaded.seq_len == 64 and loaded.calibration is not None
    assert tuple(loaded.calibration.tokens.shape) == (8, 64) and loaded.calibration.split == "train"
    assert loaded.windows is not None and tuple(loaded.windows.shape) == (4, 64)
    assert loaded.select_windows is not None and tuple(loaded.select_windows.shape) == (3, 64)
    assert loaded.eval_data == loaded.data == DataSpec.parse(text)
    assert loaded.eval_info() == {"data": str(loaded.data), "split": "test", "seq_len": 64, "windows": 4}
    assert len(loaded.fingerprint) == 64 and loaded.fingerprint == loaded.fingerprint  # hashed once, cached
    assert set(loaded.shapes) and all(len(s) == 2 for s in loaded.shapes.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.seq_len = 128  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.calib_samples = 1  # type: ignore[misc]


def test_load_defaults_and_nothing_unasked(stories_hf: Path, text: str) -> None:
    loaded = load(LoadSpec(model=str(stories_hf), data=text))
    max_positions = int(loaded.net.config.max_position_embeddings)
    assert loaded.seq_len == min(512, max_positions)
    assert (loaded.calibration, loaded.windows, loaded.select_windows) == (None, None, None)


def test_a_plan_calibrates_only_when_it_needs_to(stories_hf: Path, text: str) -> None:
    spec = LoadSpec(model=str(stories_hf), data=text, seq_len=128, max_seq_len=2048, calib_samples=4,
                    calib_max_seq_len=32, windows=True, eval_samples=2)
    weight_only = load(spec, plan=Plan.uniform("w8:a16"))
    assert weight_only.calibration is None and weight_only.windows is not None
    static = load(spec, plan=Plan.uniform("w8:a8-static"))
    assert static.calibration is not None and tuple(static.calibration.tokens.shape) == (4, 32)  # capped length


def test_check_runs_before_any_data_work(stories_hf: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_data(*args, **kwargs):
        raise AssertionError("data work before the check")

    monkeypatch.setattr("quantplan.workers.pipeline.calibration_set", no_data)
    monkeypatch.setattr("quantplan.workers.pipeline.eval_windows", no_data)

    def refuse(net) -> None:
        raise PlanError("refused by the check")

    with pytest.raises(PlanError, match="refused by the check"):
        load(LoadSpec(model=str(stories_hf), data=text, calib_samples=4, windows=True), check=refuse)
    with pytest.raises(PlanError, match="no-such-layer"):  # a plan is validated against the model by default
        load(LoadSpec(model=str(stories_hf), data=text, calib_samples=4, windows=True),
             plan=Plan.from_layers({"no-such-layer": "w8:a8-static"}))


def test_bad_data_fails_before_the_model_loads(tmp_path: Path) -> None:
    missing_model = str(tmp_path / "no-such-model")
    with pytest.raises(DataError, match="text file not found"):
        load(LoadSpec(model=missing_model, data=f"text:{tmp_path / 'missing.txt'}"))
    with pytest.raises(DataError, match="unknown data spec"):
        load(LoadSpec(model=missing_model, data="wikitext2", eval_data="csv:x"))


@pytest.mark.parametrize(("spec", "parsed"), [
    ("wikitext2", ("wikitext2", ())),
    (" WikiText2:/data/wt2 ", ("wikitext2", ("/data/wt2",))),
    ("text:a.txt, b.txt,", ("text", ("a.txt", "b.txt"))),
])
def test_data_spec_syntax(spec: str, parsed: tuple) -> None:
    assert parse_syntax(spec) == parsed  # no file system access: the paths are the runner's


@pytest.mark.parametrize(("spec", "message"), [
    ("csv:x", "unknown data spec"), ("text:", "needs at least one file"), ("text: , ", "needs at least one file"),
    ("wikitext2:", "needs a directory"), ("", "unknown data spec"),
])
def test_data_spec_syntax_errors(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_syntax(spec)


def test_data_spec_syntax_is_torch_free() -> None:
    code = ("import sys\nimport quantplan.workers.dataspec\n"
            "assert 'torch' not in sys.modules and 'datasets' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
