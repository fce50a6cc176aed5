"""Sub-space optima (search.variants): within the budget and the cap, true to their restriction, optimal in it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantplan.quant.costs import TableInfo
from quantplan.quant.schemes import LayerScheme
from quantplan.search import knapsack, variants
from quantplan.search.budget import Budget, BudgetError
from quantplan.search.problem import compile_problem
from quantplan.search.space import SearchSpace
from quantplan.search.synthetic import llama_block, synthetic_table
from tests.search.tables import brute_force, small_tables

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _keeps_restriction(name: str, schemes: tuple[LayerScheme, ...]) -> bool:
    acts = {str(s.act) for s in schemes if s.quantized}
    sym = not any(s.weight.asymmetric for s in schemes)
    return {
        "sym": sym, "no-dynamic": "a8-dynamic" not in acts, "static": acts <= {"a8-static"},
        "dynamic": acts <= {"a8-dynamic"}, "sym+static": sym and acts <= {"a8-static"},
        "sym+dynamic": sym and acts <= {"a8-dynamic"},
    }[name]


@SETTINGS
@given(table=small_tables(6), bits=st.floats(4.0, 9.0), share=st.sampled_from([None, 0.0, 0.5]))
def test_variants_fit_and_are_optimal_in_their_sub_space(table: TableInfo, bits: float, share: float | None) -> None:
    space = SearchSpace(act_bits=8, weights=("w4", "w4a", "w4g32", "w8"), max_dynamic_share=share)
    try:
        problem = compile_problem(table, space, Budget(avg_bits=bits))
    except BudgetError:
        return
    optimum = knapsack.solve(problem).loss
    for name, restrict in variants.RESTRICTIONS.items():
        c = variants.variant(problem, name)
        if c is None:
            continue
        assert c.under_budget and c.in_space and c.avg_bits <= bits and c.recipe == f"knapsack:{name}"
        assert _keeps_restriction(name, c.schemes)
        assert c.predicted_loss >= optimum * (1 - 1e-9)
        choice = np.array([problem.weights.index(s.weight) + problem.shape[2] * problem.acts.index(s.act)
                           for s in c.schemes])
        assert share is None or problem.dynamic_layers(choice) <= problem.dynamic_cap
        valid = problem.valid & restrict(problem)
        sub = dataclasses.replace(problem, valid=valid)
        assert c.predicted_loss == pytest.approx(brute_force(sub, sub.dynamic_cap)[0], rel=1e-9, abs=1e-15)


def test_variants_on_a_stories_shaped_table_are_distinct() -> None:
    table = synthetic_table(5, llama_block(64, 172, 32), seed=1)
    problem = compile_problem(table, SearchSpace(act_bits=8), Budget(avg_bits=4.25))
    found = variants.variants(problem)
    assert len({c.schemes for c in found}) == len(found) >= 3
    assert all(c.under_budget and c.label.startswith("knapsack:") for c in found)
    assert variants.variant(problem, "sym") is not None
