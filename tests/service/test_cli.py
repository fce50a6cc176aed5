"""The quantplan command line on the real stories260K model: eval, plans, conversion, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantplan.quant.plan import Plan
from quantplan.service.cli import main
from tests.conftest import DEMO_STEPS


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="module")
def stories_text(stories_dir: Path) -> str:
    return f"text:{stories_dir / 'tinystories_train0.txt'},{stories_dir / 'tinystories_validation0.txt'}"


@pytest.fixture(scope="module")
def sampled_text(stories_dir: Path) -> str:
    return f"text:{stories_dir / 'sampled_seed1.txt'}"


def test_eval_reproduces_reference_perplexity(capsys, stories_hf: Path, stories_text: str) -> None:
    code, out, _ = run_cli(capsys, "eval", "--model", str(stories_hf), "--data", stories_text, "--json")
    assert code == 0
    result = json.loads(out)
    # ../shared/data/models/stories260K/README.md: both stories joined with "\n", one BOS: PPL 3.738
    assert result["perplexity"] == pytest.approx(3.738, rel=0.05)
    assert result["tokens"] == 492 and result["kl"] is None


def test_eval_with_plan_reports_kl_and_exact_cost(capsys, tmp_path, stories_hf: Path, sampled_text: str) -> None:
    plan = Plan.from_layers(
        {"re:.*mlp\\.down_proj": "w8:a8-dynamic", "re:.*self_attn\\.[qkv]_proj": "w4g32:a8-lae"},
        default=Plan.uniform("w4g64:a8-static").default,
    )
    path = plan.save(tmp_path / "plan.json")
    args = ["eval", "--model", str(stories_hf), "--data", sampled_text, "--seq-len", "128", "--samples", "16"]
    code, out, _ = run_cli(capsys, *args, "--plan", str(path), "--calib-samples", "8", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["kl"] > 0 and r["perplexity"] > r["base_perplexity"]
    assert r["perplexity"] < 1.5 * r["base_perplexity"]  # a sane 4/8-bit plan, not a broken model
    # 5 layers: q (64x64) k,v (32x64) at w4g32, o (64x64), gate/up (172x64) at w4g64, down (64x172) at w8
    per_block = (64 + 32 + 32) * (64 * 4 + 2 * 16) + (64 + 2 * 172) * (64 * 4 + 16) + 64 * (172 * 8 + 16)
    assert r["bytes"] == 5 * per_block // 8
    assert r["avg_bits"] == pytest.approx(per_block / (64 * 64 * 2 + 32 * 64 * 2 + 3 * 172 * 64))


def test_convert_command(capsys, tmp_path, stories_dir: Path) -> None:
    out_dir = tmp_path / "hf"
    code, out, _ = run_cli(capsys, "convert-llama2c", str(stories_dir / "stories260K.bin"),
                           str(stories_dir / "tok512.bin"), "--out", str(out_dir), "--json")
    assert code == 0 and json.loads(out)["out"] == str(out_dir)
    assert (out_dir / "config.json").is_file()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_model", "model directory not found"),
        ("unknown_data", "data spec"),
        ("malformed_plan", "not valid JSON"),
        ("unknown_scheme", "unknown weight scheme"),
        ("group_too_large", "larger than in_features"),
    ],
)
def test_bad_input_is_one_line_error(capsys, tmp_path, stories_hf: Path, stories_text: str, case: str,
                                     message: str) -> None:
    plans = {
        "malformed_plan": "{\"version\": 1, ",
        "unknown_scheme": json.dumps({"version": 1, "default": "w5g128:a8-static"}),
        "group_too_large": json.dumps({"version": 1, "default": "w4g128:a16"}),  # stories260K has K = 64
    }
    model, data = str(stories_hf), stories_text
    args = ["eval", "--json"]
    if case == "missing_model":
        model = str(tmp_path / "no-such-model")
    if case == "unknown_data":
        data = "c4:train"
    if case in plans:
        (tmp_path / "plan.json").write_text(plans[case])
        args += ["--plan", str(tmp_path / "plan.json")]
    code, out, err = run_cli(capsys, *args, "--model", model, "--data", data)
    assert code == 1 and out == ""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and message in " ".join(lines)
    assert "Traceback" not in err


def test_console_script_prints_no_traceback(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "quantplan.service.cli", "eval", "--model", str(tmp_path / "missing"),
         "--data", "text:x.txt"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error:")


def test_demo_prints_the_scheme_table(capsys, tmp_path, monkeypatch, demo_cache: Path) -> None:
    monkeypatch.setenv("QUANTPLAN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QUANTPLAN_DATABASE_URL", f"sqlite:///{tmp_path / 'demo.db'}")
    # the session's demo model, trained once for DEMO_STEPS steps (workers/test_demo.py tests the build), is in the
    # cache: the command finds it by its recipe (--steps) and trains nothing
    [built] = demo_cache.iterdir()
    shutil.copytree(built, tmp_path / "demo" / built.name)
    monkeypatch.setattr("quantplan.workers.demo._train", lambda *a, **k: pytest.fail("the cached model was retrained"))
    code, out, _ = run_cli(capsys, "demo", "--steps", str(DEMO_STEPS), "--samples", "4", "--trials", "8", "--json")
    assert code == 0
    result = json.loads(out)
    plans = [row["plan"] for row in result["rows"]]
    assert plans == ["FP32", "w4g128:a16", "w8:a8-static", "w4g128:a8-static", "w4g128:a8-dynamic", "w4g128:a8-lae"]
    fp32 = result["rows"][0]["perplexity"]
    for row in result["rows"][1:]:
        assert row["perplexity"] > 0 and row["kl"] >= 0
        if row["plan"].startswith("w4g128"):
            assert row["avg_bits"] == 4.125  # every demo layer has K = 128 or 384
        else:
            assert 8 + 16 / 384 < row["avg_bits"] < 8 + 16 / 128  # per-channel: one fp16 scale per row
    assert fp32 < 1024  # trained: far below a uniform guess over the vocabulary
    searched = result["searched"]  # the searched plan, materialized, applied with the kernels and measured
    assert searched["avg_bits"] <= 4.25 + 1e-9
    assert searched["perplexity"] == pytest.approx(searched["perplexity_simulated"], rel=0.005)
    assert (Path(searched["artifact"]) / "manifest.json").is_file()
    board = result["leaderboard"]  # the run is stored: its plans are on the model's leaderboard
    assert board["total"] >= 2 and all(p["job_id"] == result["job"] for p in board["plans"])
    ppls = [p["perplexity"] for p in board["plans"] if p["perplexity"] is not None]
    assert ppls == sorted(ppls) and searched["perplexity"] in ppls
