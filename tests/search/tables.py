"""Small random tables (hypothesis strategies) and a brute-force reference optimum, for the search tests."""

from __future__ import annotations

import itertools
import random

import numpy as np
from hypothesis import strategies as st

from quantplan.quant.costs import TableInfo
from quantplan.quant.schemes import ActScheme
from quantplan.search.problem import Problem
from quantplan.search.synthetic import synthetic_layer

K_CHOICES = (32, 64, 96, 128, 160)
N_CHOICES = (8, 16, 24)
FEEDERS = ("norm.a", "norm.b", None)


@st.composite
def small_tables(draw: st.DrawFn, max_layers: int = 8) -> TableInfo:
    """1..max_layers layers; random shapes, feeders (shared ones form groups) and costs."""
    n = draw(st.integers(1, max_layers))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    layers = []
    for i in range(n):
        shape = (draw(st.sampled_from(N_CHOICES)), draw(st.sampled_from(K_CHOICES)))
        feeder = draw(st.sampled_from(FEEDERS))
        layers.append(synthetic_layer(f"layers.{i}.proj", shape, feeder, rng.uniform(1, 300), rng, (2, 3, 4, 8)))
    return TableInfo("random", {"name": "random", "fingerprint": "random"}, {}, {}, tuple(layers))


def brute_force(problem: Problem, dynamic_cap: int | None = None) -> tuple[float, int] | None:
    """(least loss, its size) over every choice within the budget (and cap), by enumeration; None if none fits.
    Partial choices already over the budget are dropped as they appear (sizes only grow)."""
    cost, size, dyn = np.zeros(1), np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    cap = len(problem.names) if dynamic_cap is None else dynamic_cap
    for members in problem.groups:
        costs, sizes, dyns = _group_options(problem, members)
        cost, size = (cost[:, None] + costs[None]).ravel(), (size[:, None] + sizes[None]).ravel()
        dyn = (dyn[:, None] + dyns[None]).ravel()
        keep = (size <= problem.limit) & (dyn <= cap)
        cost, size, dyn = cost[keep], size[keep], dyn[keep]
    if len(cost) == 0:
        return None
    best = cost.argmin()
    return float(cost[best]), int(size[best])


def _group_options(problem: Problem, members: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    costs, sizes, dyns = [], [], []
    for a, act in enumerate(problem.acts):
        per_layer = [np.flatnonzero(problem.valid[i, a]) for i in members]
        if any(len(w) == 0 for w in per_layer):
            continue
        for ws in itertools.product(*per_layer):
            costs.append(sum(problem.cost[i, a, w] for i, w in zip(members, ws, strict=True)))
            sizes.append(sum(int(problem.size[i, a, w]) for i, w in zip(members, ws, strict=True)))
            dyns.append(len(members) if act == ActScheme.DYNAMIC else 0)
    return np.array(costs), np.array(sizes, dtype=np.int64), np.array(dyns, dtype=np.int64)
