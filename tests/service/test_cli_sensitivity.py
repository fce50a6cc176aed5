"""`quantplan sensitivity`: the JSON contract, reuse of a cached table, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantplan.quant.costs import read_table_info
from tests.service.test_cli import run_cli


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QUANTPLAN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_sensitivity_json_and_reuse(capsys, ray_local, cache_dir: Path, tmp_path: Path, stories_hf: Path,
                                    stories_dir: Path) -> None:
    args = ["sensitivity", "--model", str(stories_hf), "--data", f"text:{stories_dir / 'sampled_seed1.txt'}",
            "--samples", "4", "--seq-len", "64", "--json"]
    code, out, _ = run_cli(capsys, *args, "--out", str(tmp_path / "a.safetensors"))
    assert code == 0
    first = json.loads(out)
    assert first["cached"] is False and len(first["layers"]) == 35
    layer = first["layers"][0]
    assert set(layer) == {"name", "params", "weight_cost", "act_cost", "act_absmax"}
    assert {"w4g32", "w4", "w8", "w2g32", "w16"} <= set(layer["weight_cost"])
    assert set(layer["act_cost"]) == {"a16", "a8-static", "a8-dynamic", "a8-lae", "a8-smooth"}
    assert layer["weight_cost"]["w8"] < layer["weight_cost"]["w4g32"] < layer["weight_cost"]["w2g32"]
    assert layer["act_cost"]["a8-dynamic"] < layer["act_cost"]["a8-static"]

    code, out, err = run_cli(capsys, *args, "--out", str(tmp_path / "b.safetensors"))
    second = json.loads(out)
    assert code == 0 and second["cached"] is True and second["key"] == first["key"]
    assert second["layers"] == first["layers"]
    assert read_table_info(tmp_path / "b.safetensors").key == first["key"]
    cached = cache_dir / "sensitivity" / f"{first['key']}.safetensors"
    assert list(cache_dir.glob("sensitivity/*.safetensors")) == [cached]
    assert first["estimator"]["act_samples"] == 4 and first["estimator"]["act_batches"] == 4

    code, out, _ = run_cli(capsys, *args, "--act-samples", "2", "--out", str(tmp_path / "c.safetensors"))
    third = json.loads(out)  # another act set is another table: computed, with the act costs of the last 2 windows
    assert code == 0 and third["cached"] is False and third["key"] != first["key"]
    assert third["estimator"]["act_samples"] == 2 and third["estimator"]["act_batches"] == 2
    assert third["estimator"]["batches"] == first["estimator"]["batches"] == 4
    assert [la["weight_cost"]["w4"] for la in third["layers"]] == pytest.approx(
        [la["weight_cost"]["w4"] for la in first["layers"]], rel=1e-4)  # the Fisher uses every window either way


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--samples", "1000", "--seq-len", "128"], "use at most"),
        (["--samples", "2", "--seq-len", "32", "--ray-address", "127.0.0.1:9"], "cannot reach the Ray cluster"),
    ],
)
def test_sensitivity_bad_input(capsys, cache_dir: Path, tmp_path: Path, stories_hf: Path, stories_dir: Path,
                               extra: list[str], message: str) -> None:
    code, out, err = run_cli(capsys, "sensitivity", "--model", str(stories_hf), "--data",
                             f"text:{stories_dir / 'sampled_seed1.txt'}", "--out", str(tmp_path / "t.safetensors"),
                             *extra)
    assert code == 1 and "Traceback" not in err
    assert message in err and err.strip().splitlines()[-1].startswith("error:") or message in err
    assert not (tmp_path / "t.safetensors").exists()
