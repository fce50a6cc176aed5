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


@pytest.fixture(scope="module")
def fused_report(stories_search, tmp_path_factory):
    """test_quality's 4.25-bit W4A8 search with --target compressed-tensors (fused groups on)."""
    from quantplan.quant.apply import layer_shapes
    from quantplan.search.budget import Budget
    from quantplan.search.space import SearchSpace
    from quantplan.search.study import StudySettings
    from quantplan.service.pipeline import SearchInputs, search_plans

    s = stories_search
    inputs = SearchInputs(s.net, s.table, s.calib_tokens, s.windows, layer_shapes(s.net))
    settings = StudySettings(trials=80, storage=f"sqlite:///{tmp_path_factory.mktemp('db') / 'q.db'}")
    return search_plans(inputs, Budget(avg_bits=4.25), SearchSpace(act_bits=8, target="compressed-tensors"),
                        settings, eval_top=2, workers=2)


@pytest.mark.parametrize("baseline", ["w4g128:a8-static", "fptq"])
def test_fused_plan_still_beats_fixed_recipes(fused_report, baseline: str) -> None:
    best, measured = fused_report.best, fused_report.measured
    reference = next(c for c in fused_report.result.references if c.recipe == baseline)
    assert best.under_budget and best.avg_bits <= 4.25 and best.bytes <= reference.bytes
    assert measured[best.label]["perplexity"] < measured[baseline]["perplexity"]
    assert measured[best.label]["kl"] < measured[baseline]["kl"]
    print(f"\nfused best {best.label}: {measured[best.label]} vs {baseline}: {measured[baseline]}")
