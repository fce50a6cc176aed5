"""One option set, one table of defaults: `quantplan search --help`, `JobSpec` and the API's OpenAPI schema agree,
and a job's input is validated when it is submitted (data spec syntax, weight schemes, skip regex), not first in
the runner."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from quantplan.service.api import create_app
from quantplan.service.cli import app
from quantplan.service.jobs import DEFAULTS, JobSpec, SpecError
from quantplan.service.jobs_cmd import spec_from_options
from quantplan.service.search_cmd import search_spec
from quantplan.storage import load_settings
from tests.service.test_cli import run_cli

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = {"model": "org/some-model", "data": "wikitext2", "budget_bits": 4.25}
JOB_ONLY = {"materialize_top"}  # a search writes a plan; only a job materializes


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = load_settings(database_url=f"sqlite:///{tmp_path / 'api.db'}", artifacts=str(tmp_path / "artifacts"),
                             api_tokens=f"tester={TOKEN}")
    with TestClient(create_app(settings)) as c:
        yield c


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert result.exit_code == 0, result.output
    return result.output


def _option_blocks(help_text: str) -> dict[str, str]:
    """Each option's row of the rendered help (its wrapped continuation lines joined), by its first flag."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in help_text.splitlines():
        cells = line.strip().strip("│").strip()
        match = re.match(r"^\*?\s*(--[a-z][a-z0-9-]*)", cells)
        if match:
            current = match.group(1)
            blocks[current] = []
        if current is not None:
            blocks[current].append(cells)
    return {flag: " ".join(lines) for flag, lines in blocks.items()}


def _shown_default(block: str) -> str | None:
    found = re.findall(r"\[default: \(?(.*?)\)?\]", block)
    assert len(found) <= 1, block
    return found[0] if found else None


def _as_field_value(flag: str, shown: str, like: Any) -> Any:
    """The help's default text as the JobSpec field's value (bool flags show the flag that is on)."""
    if isinstance(like, bool):
        assert shown in (flag[2:], f"no-{flag[2:]}"), shown
        return shown == flag[2:]
    return type(like)(shown)


def _field(flag: str) -> str:
    return flag[2:].replace("-", "_")


def test_search_help_jobspec_and_openapi_show_the_same_defaults(client: TestClient) -> None:
    blocks = _option_blocks(_help("search"))
    fields = JobSpec.model_fields
    shared = {_field(f) for f in blocks} & set(fields)
    assert shared == set(fields) - JOB_ONLY  # every spec field is a search option (a new one must be too)
    schema = client.get("/openapi.json").json()["components"]["schemas"]["JobSpec"]["properties"]
    with_default = {name for name in shared if not fields[name].is_required() and fields[name].default is not None}
    assert with_default == set(DEFAULTS) - JOB_ONLY
    for name in sorted(shared):
        flag = "--" + name.replace("_", "-")
        default = fields[name].default
        shown = _shown_default(blocks[flag])
        if name in with_default:
            assert shown is not None, f"{flag} shows no default"
            assert _as_field_value(flag, shown, default) == default == DEFAULTS[name], (flag, shown, default)
            assert schema[name]["default"] == default, name
        else:  # required, or derived from the model or another option: no default to show
            assert shown is None, (flag, shown)
            assert schema[name].get("default") is None, name
    # the chosen values (docs/SERVICE.md, "The job spec")
    assert (DEFAULTS["trials"], DEFAULTS["eval_top"], DEFAULTS["samples"], DEFAULTS["low_bits"]) == (300, 3, 128, False)
    assert schema["materialize_top"]["default"] == fields["materialize_top"].default == DEFAULTS["materialize_top"]


def test_the_search_library_defaults_agree_with_the_table() -> None:
    """`quantplan.search` cannot import the service (layering), so its own defaults are checked against the table."""
    from quantplan.search.space import SearchSpace
    from quantplan.search.study import StudySettings

    settings, space = StudySettings(), SearchSpace()
    assert (settings.trials, settings.space, settings.seed) == (DEFAULTS["trials"], DEFAULTS["space"], DEFAULTS["seed"])
    assert (space.symmetry, space.low_bits) == (DEFAULTS["symmetry"], DEFAULTS["low_bits"])


@pytest.mark.parametrize("command", ["run", "submit"])
def test_run_and_submit_help_show_the_table(command: str) -> None:
    blocks = _option_blocks(_help(command))
    checked = 0
    for flag, block in blocks.items():
        name = _field(flag)
        if name in DEFAULTS:
            assert _as_field_value(flag, _shown_default(block) or "", DEFAULTS[name]) == DEFAULTS[name], flag
            checked += 1
    assert checked >= 5  # act_bits, trials, eval_top, materialize_top, samples


def test_search_builds_the_spec_that_run_and_submit_send() -> None:
    params = typer.main.get_command(app).commands["search"].params  # type: ignore[attr-defined]
    options = {p.name: p.default for p in params if p.name not in ("out", "db", "study", "table", "ray_address",
                                                                    "json_out")}
    options |= {"model": "m", "data": "wikitext2", "budget_bits": 4.25}
    searched = search_spec(options)
    submitted = spec_from_options(None, {"model": "m", "data": "wikitext2", "budget_bits": 4.25})
    assert searched.model_dump() == submitted.model_dump()
    assert search_spec(options | {"weights": "w4g128, w8", "low_bits": True}).weights == ["w4g128", "w8"]


BAD = {
    "data": ({"data": "csv:train.csv"}, "data: unknown data spec 'csv:train.csv'"),
    "empty text": ({"data": "text:"}, "data: text: needs at least one file"),
    "eval_data": ({"eval_data": "wikitext2:"}, "eval_data: wikitext2: needs a directory"),
    "select_data": ({"select_data": "hub:x", "select": "perplexity"}, "select_data: unknown data spec"),
    "weights": ({"weights": ["w4g128", "w4g7"]}, "weights: unknown weight scheme 'w4g7'"),
    "not served": ({"weights": ["w3g128"]}, "2/3-bit weights need --low-bits"),
    "skip": ({"skip": "(q|k"}, "skip: '(q|k' is not a valid regular expression"),
    "skip overflow": ({"skip": "a{4294967296}"}, "skip: 'a{4294967296}' is not a valid regular expression"),
}


@pytest.mark.parametrize("case", BAD)
def test_jobspec_refuses_bad_input(case: str) -> None:
    extra, message = BAD[case]
    with pytest.raises(SpecError, match=re.escape(message)):
        JobSpec.parse(SPEC | extra)


def test_jobspec_accepts_what_the_runner_reads() -> None:
    spec = JobSpec.parse(SPEC | {"data": "text:/runner/only/a.txt,b.txt", "eval_data": "wikitext2:/data/wt2",
                                 "weights": ["w3g128", "w4g64"], "low_bits": True, "skip": r"lm_head|\.0\."})
    assert spec.search_space().low_bits and spec.search_space().weights == ("w3g128", "w4g64")
    assert spec.to_json()["low_bits"] is True and "trials" not in spec.to_json()  # defaults stay out of the row
    assert spec.budget().avg_bits == 4.25


@pytest.mark.parametrize("case", BAD)
def test_api_answers_422_and_stores_nothing(client: TestClient, case: str) -> None:
    extra, message = BAD[case]
    r = client.post("/v1/jobs", json=SPEC | extra, headers=AUTH)
    assert r.status_code == 422 and message in r.json()["detail"], r.json()
    assert client.get("/v1/jobs").json() == []


@pytest.mark.parametrize("command", ["search", "run", "submit"])
def test_cli_refuses_bad_input_in_one_line_before_loading(capsys, tmp_path: Path, command: str) -> None:
    args = [command, "--model", str(tmp_path / "no-such-model"), "--data", "text:a.txt", "--budget-bits", "4.25"]
    if command == "search":
        args += ["--skip", "(q|k", "--out", str(tmp_path / "plan.json")]
    else:
        spec = tmp_path / "spec.json"
        spec.write_text('{"skip": "(q|k"}', encoding="utf-8")
        args += ["--spec", str(spec), "--db", f"sqlite:///{tmp_path / 'q.db'}"] if command == "run" else \
            ["--spec", str(spec), "--server", "http://127.0.0.1:9"]
    code, out, err = run_cli(capsys, *args)
    assert code == 1 and out == ""
    assert err.startswith("error: invalid ") and err.count("\n") == 1, err
    assert "skip" in err and "not a valid regular expression" in err and "no-such-model" not in err
    assert not (tmp_path / "q.db").exists()  # refused before any storage was opened


def test_search_errors_name_the_flags(capsys, tmp_path: Path) -> None:
    base = ["search", "--model", "m", "--data", "wikitext2", "--out", str(tmp_path / "p.json")]
    code, _, err = run_cli(capsys, *base, "--budget-bits", "4", "--select", "ppl")
    assert code == 1 and "--select: Input should be 'kl' or 'perplexity'" in err
    code, _, err = run_cli(capsys, *base, "--budget-bits", "4", "--weights", "w4g7")
    assert code == 1 and "--weights: unknown weight scheme 'w4g7'" in err
    code, _, err = run_cli(capsys, *base)
    assert code == 1 and "give exactly one budget" in err


def test_job_spec_and_pipeline_stay_torch_free() -> None:
    code = ("import sys\nimport quantplan.service.jobs, quantplan.service.pipeline, quantplan.service.search_cmd\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'ray', 'optuna') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
