"""`--format compressed-tensors` on the command line: materialize a plan into it, convert a packed artifact (what
`quantplan export` and `download` do), and the one-line error for a plan it cannot express."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantplan.quant.plan import Plan
from quantplan.service.artifact_cmd import write_in_format
from tests.service.test_cli import run_cli

pytest.importorskip("compressed_tensors")

PLAN = Plan.from_layers({r"re:.*self_attn\.[qkv]_proj": "w4g64:a8-lae", r"re:.*mlp\.down_proj": "w8:a8-static"},
                        default=Plan.uniform("w4g64:a8-dynamic").default)


def test_materialize_and_convert_agree(capsys, tmp_path: Path, stories_hf: Path, stories_dir: Path) -> None:
    data = f"text:{stories_dir / 'sampled_seed1.txt'}"
    plan = PLAN.save(tmp_path / "plan.json")
    common = ("--model", str(stories_hf), "--plan", str(plan), "--data", data, "--calib-samples", "4",
              "--seq-len", "64", "--samples", "2")
    code, out, _ = run_cli(capsys, "materialize", *common, "--out", str(tmp_path / "ct"), "--format",
                           "compressed-tensors", "--json")
    assert code == 0, out
    assert json.loads(out)["format"] == "compressed-tensors"
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and len(config["config_groups"]) == 3
    assert (tmp_path / "ct" / "tokenizer_config.json").is_file()

    code, _, _ = run_cli(capsys, "materialize", *common, "--out", str(tmp_path / "art"))
    assert code == 0
    converted = write_in_format(lambda d: shutil.copytree(tmp_path / "art", d), tmp_path / "conv",
                                "compressed-tensors")  # the path of `export ID --format` and `download --format`
    a, b = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "ct", converted))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), "one calibration, the same codes"


def test_an_inexpressible_plan_is_one_line_before_any_work(capsys, tmp_path: Path, stories_hf: Path,
                                                           stories_dir: Path) -> None:
    plan = Plan.from_layers({r"re:.*layers\.0\.self_attn\.k_proj": "w8"}, default=Plan.uniform("w4g32").default)
    path = plan.save(tmp_path / "p.json")
    code, _, err = run_cli(capsys, "materialize", "--model", str(stories_hf), "--plan", str(path), "--data",
                           f"text:{stories_dir / 'sampled_seed1.txt'}", "--out", str(tmp_path / "ct"),
                           "--format", "compressed-tensors")
    assert code == 1 and "--target compressed-tensors" in err and "q_proj" in err
    assert not (tmp_path / "ct").exists()
