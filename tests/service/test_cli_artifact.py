"""quantplan materialize / apply / eval --artifact on the real stories260K model, and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantplan.quant.plan import Plan
from tests.service.test_cli import run_cli

EVAL = ("--seq-len", "128", "--samples", "8")


@pytest.fixture(scope="module")
def sampled_text(stories_dir: Path) -> str:
    return f"text:{stories_dir / 'sampled_seed1.txt'}"


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    plan = Plan.from_layers({r"re:.*self_attn\.[qkv]_proj": "w4g64:a8-lae", r"re:.*mlp\.down_proj": "w8:a8-static"},
                            default=Plan.uniform("w4g64:a8-dynamic").default)
    return plan.save(tmp_path / "plan.json")


def test_materialize_apply_export_and_eval(capsys, tmp_path, stories_hf: Path, sampled_text: str,
                                           plan_file: Path) -> None:
    art, hf = tmp_path / "art", tmp_path / "hf"
    code, out, _ = run_cli(capsys, "materialize", "--model", str(stories_hf), "--plan", str(plan_file),
                           "--data", sampled_text, "--out", str(art), *EVAL, "--calib-samples", "8", "--json")
    assert code == 0
    made = json.loads(out)
    assert made["artifact"] == str(art) and made["layers"] == 35
    assert set(made["files"]) == {"plan.json", "quantized.safetensors"}
    metrics = made["metrics"]
    assert metrics["bytes"] == made["cost"]["bytes"] and metrics["kl"] > 0
    assert metrics["eval"] == {"data": sampled_text, "split": "test", "seq_len": 128, "windows": 8}

    code, out, _ = run_cli(capsys, "apply", str(art), "--model", str(stories_hf), "--out", str(hf), "--json")
    assert code == 0
    applied = json.loads(out)
    assert applied["fingerprint"] == made["fingerprint"] and applied["backend"] == "torch"
    assert applied["kernels"] == {"w4a8": 30, "w8a8": 5}
    assert (hf / "config.json").is_file() and (hf / "manifest.json").is_file()

    code, out, _ = run_cli(capsys, "eval", "--model", str(hf), "--artifact", str(hf), "--data", sampled_text,
                           *EVAL, "--json")
    assert code == 0
    result = json.loads(out)
    for key in ("perplexity", "tokens", "kl", "avg_bits", "bytes"):
        assert result[key] == pytest.approx(metrics[key]), key  # the same model, measured again


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_artifact", "no artifact at"),
        ("plan_does_not_fit", "group size 128 is larger than in_features K=64"),
        ("no_kernel", "cannot materialize the plan"),
        ("plan_and_artifact", "either --plan"),
        ("tampered", "fails its sha256 check"),
    ],
)
def test_bad_input_is_one_line_error(capsys, tmp_path, stories_hf: Path, sampled_text: str, plan_file: Path,
                                     case: str, message: str) -> None:
    model = ["--model", str(stories_hf)]
    if case == "missing_artifact":
        args = ["apply", str(tmp_path / "nowhere"), *model]
    elif case in ("plan_does_not_fit", "no_kernel"):
        scheme = "w4g128:a8-dynamic" if case == "plan_does_not_fit" else "w3g32:a16"
        bad = Plan.uniform(scheme).save(tmp_path / "bad.json")
        args = ["materialize", *model, "--plan", str(bad), "--data", sampled_text, "--out", str(tmp_path / "a")]
    elif case == "plan_and_artifact":
        args = ["eval", *model, "--data", sampled_text, "--plan", str(plan_file), "--artifact", str(tmp_path)]
    else:
        art = tmp_path / "a"
        assert run_cli(capsys, "materialize", *model, "--plan", str(plan_file), "--data", sampled_text,
                       "--out", str(art), *EVAL, "--calib-samples", "4")[0] == 0
        (art / "plan.json").write_text((art / "plan.json").read_text().replace("w8:a8-static", "w8:a8-dynamic"))
        args = ["eval", *model, "--data", sampled_text, "--artifact", str(art), *EVAL]
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 1 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last and "Traceback" not in err, err
    assert not (tmp_path / "a").exists() or case == "tampered"
