"""The exact knapsack: equal to brute force on small instances, never over budget (checked by Plan.cost)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from quantplan.quant.costs import TableInfo
from quantplan.search import knapsack, lagrange
from quantplan.search.budget import MB, Budget, BudgetError
from quantplan.search.problem import Problem, compile_problem
from quantplan.search.space import SearchSpace
from quantplan.search.synthetic import LLAMA_7B, llama_block, synthetic_table
from tests.search.tables import brute_force, small_tables

SMALL_WEIGHTS = ("w4", "w4g32", "w8")  # few options per layer keep brute force cheap
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _budget(table: TableInfo, bits: float, in_mb: bool) -> Budget:
    if not in_mb:
        return Budget(avg_bits=bits)
    params = sum(layer.params for layer in table.layers)
    return Budget(megabytes=bits * params / 8 / MB)


def _check_within(problem: Problem, choice: np.ndarray, budget: Budget) -> None:
    """Independent check: the plan's own exact cost (quant.plan) is within the budget."""
    plan = problem.plan(problem.candidate(choice, "x"))
    cost = plan.cost({layer.name: layer.shape for layer in problem.layers})
    if budget.avg_bits is not None:
        assert cost.avg_bits <= budget.avg_bits
    else:
        assert cost.bytes <= budget.megabytes * MB


@SETTINGS
@given(table=small_tables(8), bits=st.floats(3.5, 9.0), act_bits=st.sampled_from([8, 16]),
       in_mb=st.booleans())
def test_knapsack_equals_brute_force_and_fits(table: TableInfo, bits: float, act_bits: int, in_mb: bool) -> None:
    budget = _budget(table, bits, in_mb)
    space = SearchSpace(act_bits=act_bits, symmetry="sym", weights=SMALL_WEIGHTS)
    try:
        problem = compile_problem(table, space, budget)
    except BudgetError as e:
        assert "smallest plan" in str(e)
        event("infeasible")
        return
    reference = brute_force(problem)
    event(f"feasible, {len(problem.names)} layers, {len(problem.groups)} groups")
    result = knapsack.solve(problem)
    assert reference is not None and result.exact
    assert result.size <= problem.limit and result.size == problem.total_size(result.choice)
    assert result.loss == pytest.approx(reference[0], rel=1e-9, abs=1e-15)
    assert result.lower_bound <= result.loss * (1 + 1e-9)
    _check_within(problem, result.choice, budget)


@SETTINGS
@given(table=small_tables(6), bits=st.floats(3.8, 8.5))
def test_knapsack_with_both_activation_widths(table: TableInfo, bits: float) -> None:
    """a16 allows w16, the a8 schemes do not: groups see two option patterns."""
    space = SearchSpace(act_bits=None, symmetry="sym", weights=(*SMALL_WEIGHTS, "w16"))
    try:
        problem = compile_problem(table, space, Budget(avg_bits=bits))
    except BudgetError:
        return
    result = knapsack.solve(problem)
    assert result.loss == pytest.approx(brute_force(problem)[0], rel=1e-9, abs=1e-15)
    assert result.size <= problem.limit


@SETTINGS
@given(table=small_tables(8), bits=st.floats(4.0, 9.0), share=st.floats(0.0, 1.0))
def test_dynamic_cap_equals_brute_force(table: TableInfo, bits: float, share: float) -> None:
    """W4A8: the activation choice splits off exactly, so the capped optimum equals brute force under the cap."""
    space = SearchSpace(act_bits=8, symmetry="sym", weights=SMALL_WEIGHTS, max_dynamic_share=share)
    try:
        problem = compile_problem(table, space, Budget(avg_bits=bits))
    except BudgetError:
        return
    result = knapsack.solve(problem)
    best = brute_force(problem, problem.dynamic_cap)
    uncapped = brute_force(problem)
    event("cap binds" if best[0] > uncapped[0] * (1 + 1e-12) else "cap does not bind")
    assert problem.dynamic_layers(result.choice) <= problem.dynamic_cap
    assert result.size <= problem.limit and result.size == problem.total_size(result.choice)
    assert result.exact
    assert result.loss == pytest.approx(best[0], rel=1e-9, abs=1e-15)
    assert result.lower_bound <= best[0] * (1 + 1e-9)
    _check_within(problem, result.choice, problem.budget)


@SETTINGS
@given(table=small_tables(8), bits=st.floats(4.0, 9.0), share=st.floats(0.0, 1.0))
def test_dynamic_cap_penalty_fallback_is_feasible(table: TableInfo, bits: float, share: float) -> None:
    """The penalty bisection (used where activation schemes allow different weights) meets the cap and the
    budget and is never better than the exact optimum."""
    space = SearchSpace(act_bits=8, symmetry="sym", weights=SMALL_WEIGHTS, max_dynamic_share=share)
    try:
        problem = compile_problem(table, space, Budget(avg_bits=bits))
    except BudgetError:
        return
    grid = knapsack._grid(problem, knapsack.MAX_CELLS)
    if problem.dynamic_layers(knapsack._solve(problem, grid, 0.0)) <= problem.dynamic_cap:
        return
    choice, mu = knapsack._cap(problem, grid, problem.dynamic_cap)
    best = brute_force(problem, problem.dynamic_cap)[0]
    assert problem.dynamic_layers(choice) <= problem.dynamic_cap
    assert problem.total_size(choice) <= problem.limit
    assert float(problem.take(problem.cost, choice).sum()) >= best * (1 - 1e-9)
    assert knapsack.dual_bound(problem, mu) <= best * (1 + 1e-9)


@SETTINGS
@given(table=small_tables(8), bits=st.floats(4.0, 9.0), cells=st.integers(1, 40))
def test_coarse_grid_is_feasible_and_bounded(table: TableInfo, bits: float, cells: int) -> None:
    """With too few cells sizes are rounded up: still within budget, between the dual bound and... itself."""
    try:
        problem = compile_problem(table, SearchSpace(act_bits=8, weights=SMALL_WEIGHTS), Budget(avg_bits=bits))
    except BudgetError:
        return
    result = knapsack.solve(problem, max_cells=cells)
    optimum = brute_force(problem)[0]
    assert result.size <= problem.limit
    assert result.loss >= optimum * (1 - 1e-9)
    assert result.lower_bound <= optimum * (1 + 1e-9)
    if result.exact:
        assert result.loss == pytest.approx(optimum, rel=1e-9, abs=1e-15)


@SETTINGS
@given(table=small_tables(8), bits=st.floats(3.5, 9.0), lam=st.floats(0.0, 10.0))
def test_lagrangian_fit_never_exceeds_budget(table: TableInfo, bits: float, lam: float) -> None:
    try:
        problem = compile_problem(table, SearchSpace(act_bits=8), Budget(avg_bits=bits))
    except BudgetError:
        return
    choice = lagrange.fit(problem, lam)
    assert choice is not None and problem.total_size(choice) <= problem.limit
    assert problem.take(problem.valid, choice).all()
    _check_within(problem, choice, problem.budget)


def test_equals_brute_force_on_eight_real_shaped_layers() -> None:
    """One Llama block plus a q_proj (8 layers, three norm groups) with the full activation choice."""
    table = synthetic_table(2, llama_block(64, 172, 32), seed=3)
    table = TableInfo(table.key, table.model, {}, {}, table.layers[:8])
    for bits in (4.3, 4.5, 5.0, 6.0):
        problem = compile_problem(table, SearchSpace(act_bits=8, weights=SMALL_WEIGHTS), Budget(avg_bits=bits))
        result = knapsack.solve(problem)
        assert result.exact and result.size <= problem.limit
        assert result.loss == pytest.approx(brute_force(problem)[0], rel=1e-12)


@pytest.mark.parametrize("share", [None, 0.5, 0.2])
def test_seven_b_table_is_solved_within_budget(share: float | None) -> None:
    """224 layers shaped like Llama-2 7B: a coarse grid, feasible, within 0.5% of the dual bound (with the cap
    binding too: the uncapped optimum takes a8-dynamic almost everywhere)."""
    space = SearchSpace(act_bits=8, max_dynamic_share=share)
    problem = compile_problem(synthetic_table(32, LLAMA_7B), space, Budget(avg_bits=4.25))
    result = knapsack.solve(problem)
    assert result.size <= problem.limit
    assert result.loss - result.lower_bound <= 5e-3 * result.loss
    if share is not None:
        assert problem.dynamic_layers(result.choice) <= problem.dynamic_cap
    _check_within(problem, result.choice, problem.budget)
