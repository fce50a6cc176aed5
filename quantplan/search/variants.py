"""Knapsack optima of restricted sub-spaces: in-budget plans that differ in structure, for measured selection.

The proxy's best plans differ from each other in a few layers; where the proxy ranks plans poorly (text far
from what the model was trained on) the measured stage needs candidates that differ in kind. Each variant is
the exact proxy optimum under one restriction a deployer may choose anyway: symmetric weights only (no
zero-points), no a8-dynamic (no per-token scales at run time), one activation scheme everywhere. Skipped layers
keep w16:a16; a restriction that leaves some layer without a choice, or no plan within the budget, gives none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from quantplan.quant.schemes import ActScheme, LayerScheme
from quantplan.search import knapsack
from quantplan.search.problem import Candidate, Problem, restrict_groups

Restriction = Callable[[Problem], np.ndarray]  # [L, A, W] bool: the choices kept
RESTRICTIONS: dict[str, Restriction] = {}


def restriction(name: str) -> Callable[[Restriction], Restriction]:
    def register(fn: Restriction) -> Restriction:
        RESTRICTIONS[name] = fn
        return fn

    return register


def _acts(problem: Problem, keep: Callable[[ActScheme], bool]) -> np.ndarray:
    mask = np.array([keep(a) for a in problem.acts])
    return np.broadcast_to(mask[None, :, None], problem.shape)


@restriction("sym")
def symmetric(problem: Problem) -> np.ndarray:
    mask = np.array([not w.asymmetric for w in problem.weights])
    return np.broadcast_to(mask[None, None, :], problem.shape)


@restriction("no-dynamic")
def no_dynamic(problem: Problem) -> np.ndarray:
    return _acts(problem, lambda a: a != ActScheme.DYNAMIC)


@restriction("static")
def static(problem: Problem) -> np.ndarray:
    return _acts(problem, lambda a: a in (ActScheme.A16, ActScheme.STATIC))


@restriction("dynamic")
def dynamic(problem: Problem) -> np.ndarray:
    return _acts(problem, lambda a: a in (ActScheme.A16, ActScheme.DYNAMIC))


@restriction("sym+static")
def symmetric_static(problem: Problem) -> np.ndarray:
    return symmetric(problem) & static(problem)


@restriction("sym+dynamic")
def symmetric_dynamic(problem: Problem) -> np.ndarray:
    return symmetric(problem) & dynamic(problem)


def variant(problem: Problem, name: str) -> Candidate | None:
    """The proxy optimum within the budget under restriction `name` (labelled `knapsack:<name>`), or None."""
    valid = problem.valid & RESTRICTIONS[name](problem)
    valid[problem.skipped] = problem.valid[problem.skipped]
    restrict_groups(valid, problem.groups)
    if not valid.any(axis=(1, 2)).all():
        return None
    restricted = dataclasses.replace(problem, valid=valid)
    cap = problem.dynamic_cap
    if restricted.min_size() > problem.limit or (cap is not None and _forced_dynamic(restricted) > cap):
        return None
    choice = knapsack.solve(restricted).choice
    return problem.candidate(choice, f"knapsack:{name}", recipe=f"knapsack:{name}")


def _forced_dynamic(problem: Problem) -> int:
    """Layers in groups whose only activation scheme is a8-dynamic."""
    only = np.array([problem.group_acts(g).sum() == 1 and problem.group_acts(g)[problem.acts.index(ActScheme.DYNAMIC)]
                     for g in range(len(problem.groups))])
    return int(problem.member[only].sum())


def variants(problem: Problem) -> list[Candidate]:
    """Every registered variant that exists for this problem, distinct plans only."""
    out: dict[tuple[LayerScheme, ...], Candidate] = {}
    for name in RESTRICTIONS:
        c = variant(problem, name)
        if c is not None:
            out.setdefault(c.schemes, c)
    return list(out.values())
