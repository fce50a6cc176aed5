"""`quantplan search` end to end on stories260K (with a table from the fixture), its JSON contract and errors."""

from __future__ import annotations

import json
from pathlib import Path

from quantplan.quant.plan import Plan
from quantplan.search.synthetic import synthetic_table, write_table_file
from tests.service.test_cli import run_cli


def _args(s, tmp_path: Path, *extra: str) -> list[str]:
    return ["search", "--model", str(s.model_dir), "--data", s.calib_spec, "--eval-data", s.heldout_spec,
            "--table", str(s.table_path), "--samples", "8", "--seq-len", "128", "--eval-samples", "8",
            "--db", f"sqlite:///{tmp_path / 'q.db'}", "--out", str(tmp_path / "plan.json"), *extra]


def test_search_json_contract_and_resume(capsys, tmp_path: Path, stories_search) -> None:
    args = _args(stories_search, tmp_path, "--budget-bits", "4.25", "--trials", "30", "--eval-top", "1",
                 "--workers", "2", "--json")
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["trials"] == 30 and doc["new_trials"] == 30 and doc["knapsack"]["exact"]
    for plan in doc["plans"]:
        assert {"avg_bits", "bytes", "predicted_loss", "label", "pareto", "under_budget"} <= set(plan)
    measured = [p for p in doc["plans"] if "perplexity" in p]
    assert len(measured) == 5 and all("kl" in p for p in measured)  # top 1 + four baselines
    best = doc["best"]
    assert best["avg_bits"] <= 4.25 and "perplexity" in best and best["kl"] == min(
        p["kl"] for p in measured if p["under_budget"] and p["in_space"])
    plan = Plan.load(doc["out"])
    assert plan.to_dict()["layers"] == best["plan"]["layers"]
    assert plan.meta["search"]["study"] == doc["study"]
    code, out, _ = run_cli(capsys, *args[:-1])  # the same search again, as a table: resumes, nothing to add
    assert code == 0 and "Pareto plans" in out and "knapsack" in out


def test_search_select_perplexity_json(capsys, tmp_path: Path, stories_search) -> None:
    args = _args(stories_search, tmp_path, "--budget-bits", "4.25", "--trials", "10", "--eval-top", "1",
                 "--workers", "2", "--select", "perplexity", "--select-samples", "4", "--refine", "6", "--json")
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    doc = json.loads(out)
    selected = [p for p in doc["plans"] if "select_perplexity" in p]
    assert doc["select"] == "perplexity" and any(p["recipe"] == "knapsack:sym" for p in selected)
    assert doc["best"]["select_perplexity"] == min(p["select_perplexity"] for p in selected)
    assert all("perplexity" in p for p in selected)  # reported on the evaluation windows too
    assert Plan.load(doc["out"]).meta["search"]["select"] == "perplexity"
    refined = doc["refine"]  # the descent from the selected plan, on the selection slice
    assert refined["evaluations"] <= 6 and refined["min_gain"] == 0.001
    assert len(refined["moves"]) == sum(p["recipe"] == "refined" for p in selected)
    assert refined["select_perplexity"] == doc["best"]["select_perplexity"] <= refined["start_select_perplexity"]


def test_search_errors(capsys, tmp_path: Path, stories_search) -> None:
    code, _, err = run_cli(capsys, *_args(stories_search, tmp_path))
    assert code == 1 and "give exactly one budget" in err
    code, _, err = run_cli(capsys, *_args(stories_search, tmp_path, "--budget-bits", "5", "--select", "ppl"))
    assert code == 1 and "--select: Input should be 'kl' or 'perplexity'" in err
    code, _, err = run_cli(capsys, *_args(stories_search, tmp_path, "--budget-bits", "5", "--refine", "4"))
    assert code == 1 and "refine measures candidates on the selection slice" in err
    code, _, err = run_cli(capsys, *_args(stories_search, tmp_path, "--budget-bits", "3", "--eval-top", "0"))
    assert code == 1 and "infeasible" in err and "--budget-bits to at least 4.2" in err
    code, _, err = run_cli(capsys, *_args(stories_search, tmp_path, "--budget-bits", "5", "--weights", "w4g7"))
    assert code == 1 and "unknown weight scheme 'w4g7'" in err
    other = write_table_file(synthetic_table(1), tmp_path / "other.safetensors")
    args = _args(stories_search, tmp_path, "--budget-bits", "5")
    args[args.index("--table") + 1] = str(other)
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and "computed for another model" in err
    args[args.index("--table") + 1] = str(tmp_path / "missing.safetensors")
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and "sensitivity table not found" in err
