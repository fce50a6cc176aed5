"""`quantplan.storage` never imports torch (checked in a fresh interpreter, migrations included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CODE = """
import sys
import quantplan.storage
import quantplan.settings
from quantplan.storage import artifacts, migrate, repository
repo = quantplan.storage.Repository("sqlite:///{db}")  # runs the migrations, so env.py and versions/ load too
repo.close()
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
"""


def test_storage_does_not_import_torch(tmp_path: Path) -> None:
    code = CODE.format(db=tmp_path / "lean.db")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
