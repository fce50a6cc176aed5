"""The built wheel ships one import package, `quantplan`, and works when installed outside the repository.

The wheel is built offline from a copy of the sources (`pip wheel --no-build-isolation` with the venv's
setuptools, so nothing is written into the checkout), then installed with `pip install --target` and imported in
a fresh interpreter, from another directory, with `-S`: the editable install's `.pth` hook never runs, so every
import comes from the installed wheel (dependencies from the venv's site-packages on PYTHONPATH).
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.test_layering import module_names

REPO = Path(__file__).resolve().parents[1]
MIGRATIONS = ("env.py", "versions/0001_initial.py", "script.py.mako")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the source copy it was built from)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO / "quantplan", src / "quantplan", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                "-w", tmp / "dist", src, cwd=tmp)
    assert built.returncode == 0, built.stdout + built.stderr
    [whl] = (tmp / "dist").glob("quantplan-*.whl")
    return whl, src


def test_the_venvs_setuptools_satisfies_the_build_system() -> None:
    """`--no-build-isolation` builds with the venv's setuptools (which has built wheels itself since 70.1, so the
    `wheel` package pyproject also names is not needed here): it must satisfy pyproject's requirement."""
    requires = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]["requires"]
    [setuptools] = [r for r in map(Requirement, requires) if r.name == "setuptools"]
    assert setuptools.specifier.contains(version("setuptools"), prereleases=True), setuptools
    assert Version(version("setuptools")) >= Version("70.1")


def test_the_wheel_holds_only_quantplan(wheel: tuple[Path, Path]) -> None:
    whl, src = wheel
    with zipfile.ZipFile(whl) as zf:
        names = zf.namelist()
        [dist_info] = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        top_level = zf.read(f"{dist_info}/top_level.txt").decode().split()
        entry_points = configparser.ConfigParser(delimiters=("=",))
        entry_points.read_string(zf.read(f"{dist_info}/entry_points.txt").decode())
    assert top_level == ["quantplan"]
    assert [n for n in names if not n.startswith(("quantplan/", f"{dist_info}/"))] == []
    assert {f"quantplan/storage/migrations/{m}" for m in MIGRATIONS} <= set(names)
    service = src / "quantplan" / "service"
    web = {p.relative_to(src).as_posix() for d in ("templates", "static") for p in (service / d).iterdir()}
    assert web and web <= set(names)  # the web UI's templates and static files
    sources = {p.relative_to(src).as_posix() for p in (src / "quantplan").rglob("*.py")}
    assert sources - set(names) == set()  # every module, namespace folders (migrations/versions/) included
    assert len(sources) == len(module_names(src)) > 50
    assert dict(entry_points["console_scripts"]) == {"quantplan": "quantplan.service.cli:main"}


def test_the_installed_wheel_imports_from_elsewhere(wheel: tuple[Path, Path], tmp_path: Path) -> None:
    whl, _ = wheel
    target = tmp_path / "site"
    installed = run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", target, whl,
                    cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "quantplan"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}
    code = f"""if True:
        import importlib, json
        import quantplan.quant, quantplan.search, quantplan.storage, quantplan.service
        from quantplan.storage import Repository
        Repository("sqlite:///{tmp_path / 'q.db'}").close()  # the migrations run from the installed copy
        missing = []
        for name in ("storage", "quant", "workers", "search", "service"):
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                missing.append(name)
        print(json.dumps({{"file": quantplan.storage.__file__, "missing": missing}}))
    """
    result = run(sys.executable, "-S", "-c", code, cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert Path(report["file"]).is_relative_to(target)
    assert report["missing"] == ["storage", "quant", "workers", "search", "service"]
    assert (tmp_path / "q.db").stat().st_size > 0
