"""Lagrangian choices on a Problem: minimize loss + lambda * size, repair to the budget, fill the slack.

For a multiplier lambda (nats per average bit), every layer takes its best weight scheme for each activation
scheme, every group the activation scheme with the smallest summed value: the exact minimizer of
sum cost + lambda * size over the (masked) space, computed with a few array operations. Its size falls as
lambda grows, so bisection finds the smallest lambda within the budget; a greedy pass then spends the
remaining slack on the upgrades with the best loss saved per unit of size. Trials use these functions to map
a few knobs to a per-layer choice in well under a millisecond per call. Layers fused into one unit
(`Problem.units`) are one item throughout: their values are summed and they move together.
"""

from __future__ import annotations

import numpy as np

from quantplan.search.problem import BIG, Problem
from quantplan.search.space import ACTS, DYNAMIC

LAMBDA_MAX = 1e12  # beyond this every layer is at its smallest size (ties broken by loss)
BISECTIONS = 40
DYN = ACTS.index(DYNAMIC)


def scale(problem: Problem) -> float:
    """Size units per average bit per weight: lambda * size / scale is in nats."""
    return problem.params / (1.0 if problem.budget.unit == "bits" else 8.0)


def solve(problem: Problem, lam: float, allowed: np.ndarray | None = None) -> np.ndarray:
    """The choice [L] minimizing sum cost + lam * size over `allowed` [L, A, W] (default: valid)."""
    allowed = problem.valid if allowed is None else problem.tie(allowed)
    value = _values(problem, lam, allowed)  # [L, A, W]; per unit (summed) when layers are fused
    a = (problem.member @ value.min(axis=2)).argmin(axis=1)[problem.group_of]  # [L] each group's best act
    if problem.fused:
        unit_value = _unit_sum(problem, value)  # [U, A, W]
        return a * problem.shape[2] + unit_value[problem.unit_of, a].argmin(axis=1)
    return a * problem.shape[2] + value[problem.rows, a].argmin(axis=1)


def group_values(problem: Problem, lam: float, allowed: np.ndarray) -> np.ndarray:
    """[G, A] the best summed value of each group under each activation scheme (>= BIG: impossible)."""
    return problem.member @ _values(problem, lam, problem.tie(allowed)).min(axis=2)


def _values(problem: Problem, lam: float, allowed: np.ndarray) -> np.ndarray:
    """cost + lam * size where allowed (else BIG), [L, A, W]; with fused units, each unit's summed value is put
    on its first member and 0 on the others, so sums over layers stay right and a minimum is the unit's."""
    value = np.where(allowed, problem.cost + (lam / scale(problem)) * problem.size, BIG)
    if not problem.fused:
        return value
    first = np.array([u[0] for u in problem.units])
    out = np.where(allowed, 0.0, BIG)
    out[first] = _unit_sum(problem, value)
    return out


def _unit_sum(problem: Problem, array: np.ndarray) -> np.ndarray:
    """[U, ...] sums of `array` [L, ...] over each unit's members."""
    return (problem.unit_member @ array.reshape(len(array), -1)).reshape(len(problem.units), *array.shape[1:])


def fit(problem: Problem, lam: float, allowed: np.ndarray | None = None) -> np.ndarray | None:
    """The Lagrangian choice at `lam` if it fits the budget; else at the smallest multiplier that fits, with the
    slack filled. None when even the smallest sizes in `allowed` exceed the budget."""
    allowed = problem.valid if allowed is None else allowed
    choice = solve(problem, lam, allowed)
    if problem.total_size(choice) <= problem.limit:
        return choice  # a multiplier above the budget's asks for a smaller plan: keep it
    choice = _bisect(problem, max(lam, 0.0), allowed)
    return None if choice is None else fill(problem, choice, allowed)


def _bisect(problem: Problem, lo: float, allowed: np.ndarray) -> np.ndarray | None:
    hi = max(lo, 1e-9) * 2
    while problem.total_size(solve(problem, hi, allowed)) > problem.limit:
        if hi > LAMBDA_MAX:
            return None
        hi *= 8
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2 if lo <= 0 else float(np.sqrt(lo * hi))
        if problem.total_size(solve(problem, mid, allowed)) > problem.limit:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-3 * hi:  # the fill pass spends what is left
            break
    return solve(problem, hi, allowed)


def fill(problem: Problem, choice: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Greedy upgrades (same activation scheme) with the most loss saved per unit size that still fit."""
    choice, (cost, size, ok, first) = choice.copy(), _unit_options(problem, choice, allowed)
    while True:
        slack = problem.limit - problem.total_size(choice)
        cur_c = cost[_rows(cost), choice[first] % problem.shape[2]][:, None]
        cur_s = size[_rows(size), choice[first] % problem.shape[2]][:, None]
        gain = np.where(ok & (cost < cur_c) & (size - cur_s <= slack), (cur_c - cost) / np.maximum(size - cur_s, 1),
                        -1.0)
        u, w = np.unravel_index(gain.argmax(), gain.shape)
        if gain[u, w] <= 0:
            return choice
        _move(problem, choice, u, w)


def shrink(problem: Problem, choice: np.ndarray, allowed: np.ndarray) -> np.ndarray | None:
    """Greedy downgrades (same activation scheme) losing the least per unit size saved, until within budget."""
    choice, (cost, size, ok, first) = choice.copy(), _unit_options(problem, choice, allowed)
    while problem.total_size(choice) > problem.limit:
        cur_c = cost[_rows(cost), choice[first] % problem.shape[2]][:, None]
        cur_s = size[_rows(size), choice[first] % problem.shape[2]][:, None]
        loss = np.where(ok & (size < cur_s), (cost - cur_c) / np.maximum(cur_s - size, 1), np.inf)
        u, w = np.unravel_index(loss.argmin(), loss.shape)
        if not np.isfinite(loss[u, w]):
            return None
        _move(problem, choice, u, w)
    return choice


def _unit_options(problem: Problem, choice: np.ndarray, allowed: np.ndarray):
    """Per unit (a layer, or layers fused into one) under its current activation scheme: cost, size and allowed
    [U, W] over the weight schemes, and each unit's first layer [U]."""
    rows = np.arange(len(choice))
    acts = choice // problem.shape[2]
    cost, size, ok = problem.cost[rows, acts], problem.size[rows, acts], problem.tie(allowed)[rows, acts]  # [L, W]
    first = np.array([u[0] for u in problem.units])
    if not problem.fused:
        return cost, size, ok, first
    blocked = _unit_sum(problem, (~ok).astype(np.float64)) > 0
    return _unit_sum(problem, cost), _unit_sum(problem, size).astype(np.int64), ~blocked, first


def _rows(array: np.ndarray) -> np.ndarray:
    return np.arange(array.shape[0])


def _move(problem: Problem, choice: np.ndarray, u: int, w: int) -> None:
    for i in problem.units[u]:
        choice[i] = choice[i] // problem.shape[2] * problem.shape[2] + w


def cap_dynamic(problem: Problem, lam: float, allowed: np.ndarray, acts: np.ndarray | None = None) -> np.ndarray:
    """`allowed` with a8-dynamic removed from the groups where dropping it costs least, until at most
    `problem.dynamic_cap` layers can use it. `acts` [G] fixes each group's scheme (else the Lagrangian picks)."""
    cap = problem.dynamic_cap
    values = group_values(problem, lam, allowed)  # [G, A]
    acts = values.argmin(axis=1) if acts is None else acts
    sizes = problem.member.sum(axis=1)
    dynamic = np.flatnonzero(acts == DYN)
    if cap is None or sizes[dynamic].sum() <= cap:
        return allowed
    others = values.copy()
    others[:, DYN] = np.inf
    penalty = (others.min(axis=1) - values[:, DYN])[dynamic] / sizes[dynamic]
    order = dynamic[np.argsort(penalty)]
    keep = np.cumsum(sizes[order[::-1]])[::-1] <= cap  # the most expensive groups to switch keep a8-dynamic
    allowed = allowed.copy()
    for g in order[~keep]:
        members = list(problem.groups[g])
        allowed[members, DYN, :] = False
        if not allowed[members].any(axis=(1, 2)).all():  # a restriction had left only a8-dynamic
            allowed[members] = problem.valid[members]
            allowed[members, DYN, :] = False
    return allowed
