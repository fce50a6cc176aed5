"""`quantplan search --target compressed-tensors` on stories260K: the plan it writes exports as compressed-tensors
(every layer expressible, q/k/v and gate/up on one scheme), and the constraint's price is measured beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantplan.quant.plan import Plan
from quantplan.quant.targets import fused_groups
from quantplan.workers.models import load_model
from tests.search.test_cli import _args
from tests.service.test_cli import run_cli

pytest.importorskip("compressed_tensors")


def test_search_for_compressed_tensors_writes_an_exportable_plan(capsys, tmp_path: Path, stories_search) -> None:
    from quantplan.quant.export_ct import check_expressible

    runs = {}
    for target in ("quantplan", "compressed-tensors"):
        args = _args(stories_search, tmp_path, "--budget-bits", "4.25", "--trials", "20", "--eval-top", "1",
                     "--no-eval-baselines", "--target", target, "--json")
        args[args.index("--out") + 1] = str(tmp_path / f"{target}.json")
        code, out, err = run_cli(capsys, *args)
        assert code == 0, err
        runs[target] = json.loads(out)
    doc = runs["compressed-tensors"]
    assert doc["knapsack"]["exact"] and doc["best"]["avg_bits"] <= 4.25
    plan = Plan.load(doc["out"])
    assert plan.meta["search"]["space"]["target"] == "compressed-tensors"
    model, _ = load_model(str(stories_search.model_dir))
    specs = check_expressible(model, plan)  # raises on any layer the format cannot express
    for group in fused_groups(specs, "llama"):
        assert len({str(specs[n].scheme) for n in group}) == 1, group
    free, constrained = (runs[t]["knapsack"]["predicted_loss"] for t in ("quantplan", "compressed-tensors"))
    assert free <= constrained * (1 + 1e-9), "the target only takes choices away"
