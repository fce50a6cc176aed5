"""The exact optimum of the additive proxy under the budget: a multiple-choice knapsack over groups.

Minimize sum_i cost[i, a_g(i), w_i] subject to sum_i size[i, a_g(i), w_i] <= limit, one activation scheme a_g
per group (layers fed by one norm), one weight scheme per layer. Dynamic programming over a size grid:
V[c] = least loss with extra size <= c, where a layer's extra size is its size above its smallest option.
A group is folded in once per activation scheme (its layers one after another) and the best scheme kept
per cell, so the cost is O(layers x schemes x options x cells). Layers fused into one unit (`Problem.units`) fold
in as one item whose options are the options all of them allow, with their sizes and costs summed: still exact.

Exactness: the grid unit is the gcd of every extra size whenever that leaves at most `max_cells` cells; the
result is then the exact optimum. Otherwise the unit is coarser and extra sizes are rounded *up*, so the
plan is still within the budget and `lower_bound` (the Lagrangian dual) bounds how far from optimal it can be.
A cap on a8-dynamic layers: where every activation scheme a group may take allows the same weight options (always
so under `--act-bits 8`), the activation choice only adds a constant per layer and never changes a size, so the
problem splits exactly into the weight knapsack above and an activation assignment under the cap (a small
0/1 knapsack over groups, cells = a8-dynamic layers): one DP, exact on an exact grid. Otherwise a penalty mu per
a8-dynamic layer is bisected until the cap holds (Lagrangian relaxation of the second constraint: exact when the
cap does not bind or is met with equality).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from quantplan.search import lagrange
from quantplan.search.problem import BIG, Problem

MAX_CELLS = 1 << 15
MU_BISECTIONS = 20


@dataclass(frozen=True)
class KnapsackResult:
    """The optimal choice [L] with its loss and size, whether the grid was exact, and a dual bound."""

    choice: np.ndarray
    loss: float
    size: int
    exact: bool  # True: the proven optimum (with no binding a8-dynamic cap)
    lower_bound: float  # no choice within the budget predicts less loss
    cells: int
    seconds: float


@dataclass(frozen=True)
class _Grid:
    extra: np.ndarray  # [L, A, W] int64 cells above each layer's smallest option (-1: not allowed)
    cells: int
    exact: bool


def solve(problem: Problem, *, max_cells: int = MAX_CELLS) -> KnapsackResult:
    """The exact (or, on a coarse grid, feasible and bounded) proxy optimum within the budget."""
    start = time.perf_counter()
    grid = _grid(problem, max_cells)
    choice, mu = _solve(problem, grid, 0.0), 0.0
    bound = dual_bound(problem)
    cap = problem.dynamic_cap
    if cap is not None and problem.dynamic_layers(choice) > cap:
        capped = _cap_separable(problem, grid, choice, cap)
        if capped is not None:  # the split is exact: the weight part's bound plus the exact activation part
            bound += float(problem.take(problem.cost, capped).sum() - problem.take(problem.cost, choice).sum())
            choice = capped
        else:
            choice, mu = _cap(problem, grid, cap)
            bound = dual_bound(problem, mu)
    loss = float(problem.take(problem.cost, choice).sum())
    exact = grid.exact and (mu == 0 or problem.dynamic_layers(choice) == cap)
    return KnapsackResult(choice, loss, problem.total_size(choice), exact, min(bound, loss), grid.cells,
                          time.perf_counter() - start)


def _grid(problem: Problem, max_cells: int) -> _Grid:
    size = np.where(problem.valid, problem.size, np.iinfo(np.int64).max // 4)
    base = size.min(axis=(1, 2))  # [L]
    capacity = problem.limit - int(base.sum())
    if capacity < 0:
        raise problem.budget.infeasible(problem.min_size(), problem.params)
    extra = np.where(problem.valid, problem.size - base[:, None, None], 0)
    unit = math.gcd(*extra[problem.valid & (extra > 0)].tolist()) or 1
    exact = capacity // unit <= max_cells
    if not exact:
        unit = -(-capacity // max_cells)
    cells = capacity // unit
    extra = -(-extra // unit)  # rounded up: never over the budget
    return _Grid(np.where(problem.valid & (extra <= cells), extra, -1), cells, exact)


def _solve(problem: Problem, grid: _Grid, mu: float) -> np.ndarray:
    """DP over groups (forward), then the choice by backtracking from the full capacity."""
    cost = problem.cost + mu * (np.arange(problem.shape[1]) == lagrange.DYN)[None, :, None]
    value = np.zeros(grid.cells + 1)
    trace = []
    for members, units in zip(problem.groups, problem.group_units, strict=True):
        value, step = _fold_group(value, members, [problem.units[u] for u in units], grid, cost)
        trace.append(step)
    if value[-1] >= BIG:
        raise AssertionError("the knapsack found no choice although the smallest sizes fit")
    return _backtrack(problem, grid, trace)


def _fold_group(value: np.ndarray, members: tuple[int, ...], units: list[tuple[int, ...]], grid: _Grid,
                cost: np.ndarray):
    """Fold one group into V, once per activation scheme that can matter, then the best scheme per cell.

    cost[i, a, w] = weight cost + act cost, so two schemes allowing the same weight options differ by a
    constant per layer: only the cheaper of them is folded (for the 5 schemes, usually 1 or 2 folds)."""
    results, acts = [], []
    for a in _representatives(members, grid, cost):
        v, args = value, []
        for unit in units:
            extra = grid.extra[list(unit), a]  # [members, W]
            w = np.flatnonzero((extra >= 0).all(axis=0) & (extra.sum(axis=0) <= grid.cells))
            v, arg = _fold_layer(v, extra[:, w].sum(axis=0), cost[list(unit), a][:, w].sum(axis=0))
            args.append((w, arg))  # option w[arg[c]] at cell c (uint8 per cell keeps the trace small)
        results.append(v)
        acts.append((a, args))
    stacked = np.stack(results)  # [acts, cells]
    best = stacked.argmin(axis=0)
    return stacked[best, np.arange(stacked.shape[1])], (best.astype(np.uint8), acts)


def _representatives(members: tuple[int, ...], grid: _Grid, cost: np.ndarray) -> list[int]:
    """Per distinct pattern of allowed options over the group, the activation scheme with the least cost."""
    best: dict[bytes, tuple[float, int]] = {}
    for a in range(grid.extra.shape[1]):
        pattern = grid.extra[list(members), a]  # [members, W]
        if not (pattern >= 0).any(axis=1).all():
            continue
        w0 = (pattern >= 0).argmax(axis=1)  # any allowed option: the act cost is the same for all of them
        total = float(cost[list(members), a, w0].sum())
        key = pattern.tobytes()
        if key not in best or total < best[key][0]:
            best[key] = (total, a)
    return [a for _, a in best.values()]


def _fold_layer(value: np.ndarray, extra: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """V'[c] = min_k V[c - e_k] + cost_k, and the argmin k per cell."""
    n = value.shape[0]
    out, arg = np.full(n, np.inf), np.zeros(n, dtype=np.uint8)
    for k, (e, c) in enumerate(zip(extra.tolist(), cost.tolist(), strict=True)):
        candidate = value[: n - e] + c
        better = candidate < out[e:]
        out[e:][better] = candidate[better]
        arg[e:][better] = k
    return out, arg


def _backtrack(problem: Problem, grid: _Grid, trace: list) -> np.ndarray:
    choice = np.zeros(problem.shape[0], dtype=np.int64)
    c = grid.cells
    for units, (best, acts) in zip(reversed(problem.group_units), reversed(trace), strict=True):
        a, args = acts[best[c]]
        for u, (options, arg) in zip(reversed(units), reversed(args), strict=True):
            w = int(options[arg[c]])
            for i in problem.units[u]:
                choice[i] = a * problem.shape[2] + w
                c -= int(grid.extra[i, a, w])
    return choice


def _cap_separable(problem: Problem, grid: _Grid, choice: np.ndarray, cap: int) -> np.ndarray | None:
    """`choice` (the uncapped optimum) with each group's activation scheme re-assigned to meet the cap, exactly;
    None when some group's activation schemes allow different weight options (the split does not hold)."""
    dyn_groups, saving, other, sizes = [], [], [], []
    for g, members in enumerate(problem.groups):
        acts = np.flatnonzero(problem.group_acts(g))
        if lagrange.DYN not in acts:
            continue
        idx = list(members)
        pattern = grid.extra[idx, lagrange.DYN] >= 0  # [members, W]
        if any(((grid.extra[idx, a] >= 0) != pattern).any() for a in acts):
            return None
        w0 = pattern.argmax(axis=1)  # any allowed option: the act cost is the same for all of them
        totals = {int(a): float(problem.cost[idx, a, w0].sum()) for a in acts}
        best_other = min((a for a in totals if a != lagrange.DYN), key=totals.get, default=None)
        dyn_groups.append(g)
        other.append(best_other)
        saving.append(np.inf if best_other is None else totals[best_other] - totals[lagrange.DYN])
        sizes.append(len(members))
    take = _dynamic_assignment(np.array(saving), np.array(sizes, dtype=np.int64), cap)
    choice = choice.copy()
    width = problem.shape[2]
    for g, a, dynamic in zip(dyn_groups, other, take.tolist(), strict=True):
        idx = list(problem.groups[g])
        choice[idx] = (lagrange.DYN if dynamic else a) * width + choice[idx] % width
    return choice


def _dynamic_assignment(saving: np.ndarray, sizes: np.ndarray, cap: int) -> np.ndarray:
    """[G] bool: which groups take a8-dynamic, maximizing the saving with at most `cap` layers (0/1 knapsack,
    cells = layers). A group without another scheme (saving inf) must take it."""
    forced = np.isinf(saving)
    room = cap - int(sizes[forced].sum())
    if room < 0:
        raise AssertionError("a8-dynamic is the only activation scheme of too many layers")
    best, keep = np.zeros(room + 1), []  # best[c]: the largest saving with at most c dynamic layers
    for s, n in zip(saving.tolist(), sizes.tolist(), strict=True):
        better = np.zeros(room + 1, dtype=bool)
        if 0 < s < np.inf and n <= room:
            candidate = best[: room + 1 - n] + s
            better[n:] = candidate > best[n:]
            best[n:] = np.where(better[n:], candidate, best[n:])
        keep.append(better)
    take, c = forced.copy(), room
    for g in reversed(range(len(saving))):
        if keep[g][c]:
            take[g], c = True, c - int(sizes[g])
    return take


def _cap(problem: Problem, grid: _Grid, cap: int) -> tuple[np.ndarray, float]:
    """The smallest penalty mu per a8-dynamic layer whose optimum respects the cap (bisection)."""
    lo, hi = 0.0, float(np.where(problem.valid, problem.cost, 0).max(axis=(1, 2)).sum()) + 1.0
    best = _solve(problem, grid, hi)
    if problem.dynamic_layers(best) > cap:
        raise AssertionError("a8-dynamic is the only activation scheme of too many layers")
    for _ in range(MU_BISECTIONS):
        mid = (lo + hi) / 2
        choice = _solve(problem, grid, mid)
        count = problem.dynamic_layers(choice)
        if count <= cap:
            hi, best = mid, choice
        else:
            lo = mid
        if count == cap:
            break  # complementary slackness: the penalized optimum is the constrained optimum
    return best, hi


def dual_bound(problem: Problem, mu: float = 0.0, steps: int = 80) -> float:
    """max over lambda >= 0 of the Lagrangian dual (concave in lambda): a lower bound on the optimum."""
    cap = problem.dynamic_cap or 0
    dyn = (np.arange(problem.shape[1]) == lagrange.DYN)[None, :, None]
    cost = problem.cost + mu * dyn

    def dual(lam: float) -> float:
        value = np.where(problem.valid, cost + lam * problem.size, BIG).min(axis=2)  # [L, A]
        return float((problem.member @ value).min(axis=1).sum()) - lam * problem.limit - mu * cap

    lo, hi = -20.0, 10.0  # log10 lambda per size unit; the dual is unimodal in log lambda as well
    for _ in range(steps):  # ternary search
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (m1, hi) if dual(10**m1) < dual(10**m2) else (lo, m2)
    return max(dual(10**lo), dual(0.0))
