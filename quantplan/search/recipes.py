"""Fixed recipes the search must beat: FPTQ's layer rule and uniform schemes, as a registry of per-layer rules.

FPTQ (arXiv 2308.15987): int4 weights, group 128, everywhere; activations by v = max|X| over calibration data:
v <= v0 -> a8-static, v0 < v <= v1 -> a8-lae (log equalization folded into the feeding norm), v > v1 ->
a8-dynamic, with v0 = 15, v1 = 150. Where no norm feeds the layer (o_proj, down_proj) LAE cannot fold; this
rule then takes a8-dynamic, the scheme FPTQ uses for outlier-heavy inputs (a runtime pre-scale would be the
other way out). Layers fed by one norm take the most robust scheme any of them needs (static < lae < dynamic).

"w4g128" where K < 128 means per-channel w4: the same single group per row (stories260K has K = 64).
Recipes keep the search's skipped layers at w16:a16 and use the table's Fisher-optimal clip, like the search.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from quantplan.search.problem import Candidate, Problem
from quantplan.search.space import ACTS

FPTQ_V0, FPTQ_V1 = 15.0, 150.0
SEVERITY = ("a8-static", "a8-lae", "a8-dynamic")  # FPTQ's rule, least to most robust

Recipe = Callable[[Problem], tuple[str, ...]]
RECIPES: dict[str, Recipe] = {}


def recipe(name: str) -> Callable[[Recipe], Recipe]:
    def register(fn: Recipe) -> Recipe:
        RECIPES[name] = fn
        return fn

    return register


def baseline(problem: Problem, name: str) -> Candidate:
    """The candidate of registered recipe `name`."""
    return problem.score(RECIPES[name](problem), name, recipe=name)


def baselines(problem: Problem) -> list[Candidate]:
    return [baseline(problem, name) for name in RECIPES]


def w4g128(problem: Problem, i: int) -> str:
    """w4g128 where the group fits K, else per-channel w4 (one group per row either way)."""
    return "w4g128" if "w4g128" in problem.layers[i].weight_cost else "w4"


def _uniform(weight: Callable[[Problem, int], str], act: str) -> Recipe:
    def schemes(problem: Problem) -> tuple[str, ...]:
        return tuple(
            "w16:a16" if problem.skipped[i] else f"{weight(problem, i)}:{act}" for i in range(len(problem.names))
        )

    return schemes


for _act in ("a8-static", "a16"):
    recipe(f"w4g128:{_act}")(_uniform(w4g128, _act))
recipe("w8:a8-static")(_uniform(lambda _p, _i: "w8", "a8-static"))


@recipe("fptq")
def fptq(problem: Problem) -> tuple[str, ...]:
    acts = fptq_acts(problem, FPTQ_V0, FPTQ_V1)
    return tuple(
        "w16:a16" if problem.skipped[i] else f"{w4g128(problem, i)}:{ACTS[acts[i]]}" for i in range(len(acts))
    )


def fptq_acts(problem: Problem, v0: float, v1: float) -> np.ndarray:
    """[L] activation scheme index per layer by FPTQ's thresholds, made consistent within each group."""
    absmax = np.array([layer.act_absmax for layer in problem.layers])
    level = np.where(absmax <= v0, 0, np.where(absmax <= v1, np.where(foldable(problem), 1, 2), 2))
    group_level = np.zeros(len(problem.groups), dtype=np.int64)
    np.maximum.at(group_level, problem.group_of, level)
    return np.array([ACTS.index(SEVERITY[v]) for v in group_level[problem.group_of]])


def foldable(problem: Problem) -> np.ndarray:
    """[L] True where an equalization scale folds into the feeding norm (no skipped layer reads that norm)."""
    shared = {layer.feeder for layer, s in zip(problem.layers, problem.skipped, strict=True) if s}
    return np.array([layer.feeder is not None and layer.feeder not in shared for layer in problem.layers])
