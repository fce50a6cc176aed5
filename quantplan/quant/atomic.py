"""Atomic directories (torch-free): build a directory beside its destination, then rename it into place, so a
reader never sees half of it and a failure leaves nothing behind.

Used for artifacts (`quant.artifact`), exported and downloaded artifacts (`quantplan export`, `download`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantplan.errors import ArtifactError

MARKER = "manifest.json"  # a directory holding it may be replaced with --overwrite (it is one of ours)


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse an existing `out` unless `overwrite`, and even then unless it is empty or one of our directories."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ArtifactError(f"{out} already exists: choose another output directory, or pass --overwrite")
    replaceable = out.is_dir() and (not any(out.iterdir()) or (out / MARKER).is_file())
    if not replaceable:
        raise ArtifactError(f"{out} exists and is not an artifact directory: refusing to replace it")


@contextmanager
def staging_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` when the block succeeds and removed in any case."""
    out = Path(out)
    check_destination(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ArtifactError(f"cannot write to {out.parent}: {e.strerror or e}") from None
    tmp.chmod(0o755)  # mkdtemp makes it 0700; an artifact should read like any downloaded directory
    try:
        yield tmp
        _publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op after the rename


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    old = None
    if overwrite and out.exists():
        check_destination(out, overwrite)  # again: it may have appeared since the first check
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    try:
        os.rename(tmp, out)
    except OSError as e:
        if old is not None:
            os.replace(old, out)
        raise ArtifactError(f"cannot create {out}: {e.strerror or e} (another process may have written it)") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
