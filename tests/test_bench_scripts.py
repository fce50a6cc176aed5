"""bench/ and tests/ shadow no installed package, and every bench script starts the way docs/BENCHMARKS.md runs it.

`python bench/X.py` puts bench/ first on sys.path, so a bench module named like an installed package replaces it
for every library the script imports (bench/kernels.py once hid the `kernels` package that transformers imports).
pytest puts the repository root on sys.path, so `tests` (and any folder under it without `__init__.py`) is a
top-level name too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))
# imported with bench/ first on sys.path: transformers, and the hub-kernels integration that imports `kernels`
LIBRARIES = ("transformers", "transformers.integrations.hub_kernels", "kernels")

FIND = """import importlib.util, json, sys
def where(name):
    spec = importlib.util.find_spec(name)
    return None if spec is None else spec.origin or str(list(spec.submodule_search_locations or []))
print(json.dumps({name: where(name) for name in sys.argv[1:]}))
"""
# `python bench/X.py` makes sys.path[0] the script's folder; `-c` code does the same by hand
IMPORT_LIKE_A_BENCH_SCRIPT = """import importlib, json, sys
sys.path[0] = sys.argv[1]
print(json.dumps({name: importlib.import_module(name).__file__ for name in sys.argv[2:]}))
"""


def find_outside_the_repository(names: list[str], cwd: Path) -> dict[str, str | None]:
    """Where an isolated interpreter (`-I`: no cwd, script folder or PYTHONPATH on sys.path) finds each name."""
    result = subprocess.run([sys.executable, "-I", "-c", FIND, *names], cwd=cwd, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def top_level_names() -> list[str]:
    """bench/*.py, `tests`, and every entry directly under tests/ (top-level too in pytest's rootdir-less modes)."""
    under_tests = {p.stem for p in (REPO / "tests").iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    return sorted({p.stem for p in BENCH.glob("*.py")} | {"tests"} | (under_tests - {"__init__"}))


def test_no_bench_or_test_module_name_is_found_outside_the_repository(tmp_path: Path) -> None:
    names = top_level_names()
    assert {"kernel_speed", "search_speed", "tests", "conftest"} <= set(names)
    found = find_outside_the_repository([*names, "kernels"], tmp_path)
    assert found.pop("kernels") is not None  # the lookup does see installed packages (transformers needs this one)
    assert {name: origin for name, origin in found.items() if origin is not None} == {}


def test_every_folder_under_tests_is_a_package() -> None:
    """So pytest puts only the repository root on sys.path and `tests` is the one top-level name it adds."""
    folders = [p for p in (REPO / "tests").rglob("*") if p.is_dir() and p.name != "__pycache__"]
    assert folders and [p for p in folders if not (p / "__init__.py").is_file()] == []


def test_no_installed_distribution_ships_a_top_level_tests_package() -> None:
    """(In site-packages: a `quantplan.egg-info` left in the checkout by an in-place build lists tests/ as sources.)"""
    installed = distributions(path=sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}))
    shipping = sorted({d.metadata["Name"] for d in installed for f in (d.files or ()) if f.parts[:1] == ("tests",)})
    assert shipping == []


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """`python bench/X.py --help` for every script, the library imports with bench/ first on sys.path, and the
    same imports next to a fake `kernels.py` (the shadowing they must detect): all at once, as they take seconds."""
    shadow = tmp_path_factory.mktemp("bench")
    (shadow / "kernels.py").write_text("SHADOW = True\n", encoding="utf-8")
    commands = {name: [sys.executable, f"bench/{name}", "--help"] for name in SCRIPTS}
    commands["libraries"] = [sys.executable, "-c", IMPORT_LIKE_A_BENCH_SCRIPT, str(BENCH), *LIBRARIES]
    commands["shadowed"] = [sys.executable, "-c", IMPORT_LIKE_A_BENCH_SCRIPT, str(shadow), "kernels"]
    procs = {name: subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[name] = subprocess.CompletedProcess(commands[name], proc.returncode, stdout, stderr)
    return out


def test_the_docs_name_exactly_the_bench_scripts() -> None:
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {m for p in docs for m in re.findall(r"bench/(\w+\.py)", p.read_text(encoding="utf-8"))}
    assert sorted(named) == SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_help_exits_0(script: str, bench_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    run = bench_runs[script]
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("usage:") and "--help" in run.stdout


def test_transformers_imports_with_bench_first_on_sys_path(bench_runs: dict[str, subprocess.CompletedProcess[str]]
                                                           ) -> None:
    run = bench_runs["libraries"]
    assert run.returncode == 0, run.stderr[-3000:]
    files = json.loads(run.stdout)
    site = {Path(sysconfig.get_path("purelib")), Path(sysconfig.get_path("platlib"))}
    assert set(files) == set(LIBRARIES)
    assert [name for name, file in files.items() if not any(Path(file).is_relative_to(s) for s in site)] == []


def test_the_bench_import_check_sees_a_shadowing_module(bench_runs: dict[str, subprocess.CompletedProcess[str]]
                                                        ) -> None:
    run = bench_runs["shadowed"]
    assert run.returncode == 0, run.stderr
    [file] = json.loads(run.stdout).values()
    assert Path(file).name == "kernels.py" and Path(file).parent.name.startswith("bench")
