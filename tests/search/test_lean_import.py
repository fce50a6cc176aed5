"""`search` never imports torch (like torchao's test_lean_import): search sees numbers, not models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULES = ("quantplan", "quantplan.search", *(f"quantplan.search.{m}" for m in (
    "space", "budget", "problem", "knapsack", "lagrange", "recipes", "trials", "study", "synthetic", "variants",
    "refine")), "quantplan.service.search_cmd")


def test_search_does_not_import_torch() -> None:
    code = "import sys\n" + "".join(f"import {m}\n" for m in MODULES) + (
        "heavy = sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
