"""Measured local refinement (search.refine): one coordinate per move, never beyond the budget or the cap,
monotone in the measured score, bounded in measurements."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantplan.quant.costs import TableInfo
from quantplan.quant.schemes import PER_CHANNEL, ActScheme, LayerScheme, WeightScheme
from quantplan.search import knapsack
from quantplan.search.budget import Budget, BudgetError
from quantplan.search.problem import compile_problem
from quantplan.search.refine import _quantizer, choice_of, neighbors, refine
from quantplan.search.space import SearchSpace
from quantplan.search.synthetic import llama_block, synthetic_table
from tests.search.tables import small_tables

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _problem(share: float | None = None, bits: float = 4.25):
    table = synthetic_table(3, llama_block(64, 172, 32), seed=2)
    return compile_problem(table, SearchSpace(act_bits=8, max_dynamic_share=share), Budget(avg_bits=bits))


def _start(problem):
    return problem.candidate(knapsack.solve(problem).choice, "knapsack", recipe="knapsack")


@pytest.mark.parametrize("share", [None, 0.3])
def test_every_move_is_one_coordinate_within_budget_cap_and_space(share: float | None) -> None:
    problem = _problem(share)
    choice = choice_of(problem, _start(problem))
    moves = neighbors(problem, choice)
    assert moves and len({tuple(m.choice) for m in moves}) == len(moves)
    for m in moves:
        changed = np.flatnonzero(m.choice != choice)
        assert problem.take(problem.valid, m.choice).all() and problem.total_size(m.choice) <= problem.limit
        assert share is None or problem.dynamic_layers(m.choice) <= problem.dynamic_cap
        if m.kind == "act":  # a whole group, weights kept
            assert set(changed) == set(problem.groups[problem.group_keys.index(m.what)])
            assert (m.choice % problem.shape[2] == choice % problem.shape[2]).all()
        else:
            assert len(changed) == 1 and problem.names[changed[0]] == m.what
            assert m.choice[changed[0]] // problem.shape[2] == choice[changed[0]] // problem.shape[2]


def test_no_move_requantizes_a_layer_the_same_way() -> None:
    problem = _problem(bits=6.0)  # room for every weight move
    choice = choice_of(problem, _start(problem))
    moves = [m for m in neighbors(problem, choice) if m.kind == "weight"]
    for i, name in enumerate(problem.names):
        keys = [_quantizer(problem, i, problem.weights.index(m.after)) for m in moves if m.what == name]
        current = _quantizer(problem, i, int(choice[i] % problem.shape[2]))
        assert len(set(keys)) == len(keys) and current not in keys
    w4g64 = problem.weights.index(WeightScheme(4, 64))
    assert _quantizer(problem, 0, w4g64)[1] == PER_CHANNEL  # K = 64: one group per row


@SETTINGS
@given(table=small_tables(6), bits=st.floats(4.0, 9.0), evals=st.integers(1, 40), gain=st.sampled_from([0.0, 0.01]))
def test_descent_is_monotone_bounded_and_within_budget(table: TableInfo, bits: float, evals: int,
                                                       gain: float) -> None:
    space = SearchSpace(act_bits=8, weights=("w4", "w4a", "w4g32", "w8"), max_dynamic_share=0.5)
    try:
        problem = compile_problem(table, space, Budget(avg_bits=bits))
    except BudgetError:
        return
    rng = np.random.default_rng(0)
    noise: dict[tuple[LayerScheme, ...], float] = {}

    def measure(cands):  # the proxy plus a fixed per-plan perturbation: a "measurement" the proxy ranks poorly
        return [c.predicted_loss + noise.setdefault(c.schemes, float(rng.normal(0, 1e-3))) for c in cands]

    start = _start(problem)
    result = refine(problem, start, measure([start])[0], measure, max_evals=evals, batch=3, min_gain=gain)
    scores = [s for _, s in result.steps]
    assert result.evaluations <= evals and all(b < a * (1 - gain) for a, b in zip(scores[:-1], scores[1:],
                                                                                  strict=True))
    assert len(result.moves) == len(result.steps) - 1
    assert all(c.under_budget and c.in_space and c.avg_bits <= bits for c, _ in result.measured)
    assert len({c.label for c, _ in result.measured}) == result.evaluations
    if result.local_optimum:  # every neighbor of the last plan was measured and none is better by the margin
        assert all(measure([problem.candidate(m.choice, "n")])[0] >= scores[-1] * (1 - gain)
                   for m in neighbors(problem, choice_of(problem, result.best)))


def test_descent_reaches_a_plan_the_measure_prefers() -> None:
    """A measure that rewards a8-static everywhere: the descent walks there group by group."""
    problem = _problem()
    static = problem.acts.index(ActScheme.STATIC)

    def measure(cands):
        return [sum(s.act != ActScheme.STATIC for s in c.schemes) + c.predicted_loss for c in cands]

    start = _start(problem)
    result = refine(problem, start, measure([start])[0], measure, max_evals=200, batch=4)
    assert result.local_optimum
    assert (choice_of(problem, result.best) // problem.shape[2] == static).all()
    assert result.best.under_budget
