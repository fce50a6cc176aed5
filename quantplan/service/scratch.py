"""Where the datasets library's temporary copies of local data files go: under the cache directory, one directory
per process, removed when the process exits and, after a process was killed, by the next one on the host."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DATASETS_ENV = "QUANTPLAN_DATASETS_CACHE"  # where `workers.data` keeps its copies of local data files


@contextmanager
def datasets_scratch(cache_root: str | os.PathLike[str] | None = None) -> Iterator[Path | None]:
    """`QUANTPLAN_DATASETS_CACHE` set, while the block runs, to `<cache>/datasets-tmp/<host>-<pid>-<random>`
    (created by the first copy, removed on every exit); the directories of this host's processes that are no
    longer alive (killed) are removed on entry. A `QUANTPLAN_DATASETS_CACHE` set by the user is kept as it is
    (None is yielded), and so is the one of an enclosing block."""
    if os.environ.get(DATASETS_ENV):
        yield None
        return
    import platformdirs

    root = cache_root or os.environ.get("QUANTPLAN_CACHE_DIR") or platformdirs.user_cache_dir("quantplan")
    parent, host = Path(root) / "datasets-tmp", socket.gethostname()
    for old in parent.glob(f"{host}-*") if parent.is_dir() else ():
        pid = old.name.removeprefix(f"{host}-").partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = parent / f"{host}-{os.getpid()}-{secrets.token_hex(4)}"
    os.environ[DATASETS_ENV] = str(path)
    try:
        yield path
    finally:
        os.environ.pop(DATASETS_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
