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

from quantplan.quant.schemes import UNQUANTIZED, ActScheme, LayerScheme, WeightScheme
from quantplan.search.problem import Candidate, Problem

FPTQ_V0, FPTQ_V1 = 15.0, 150.0
SEVERITY = (ActScheme.STATIC, ActScheme.LAE, ActScheme.DYNAMIC)  # FPTQ's rule, least to most robust
W4G128, W4, W8 = WeightScheme(4, 128), WeightScheme(4), WeightScheme(8)

Recipe = Callable[[Problem], tuple[LayerScheme, ...]]
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


def w4g128(problem: Problem, i: int) -> WeightScheme:
    """w4g128 where the group fits K (the table scored it), else per-channel w4 (one group per row either way)."""
    return W4G128 if str(W4G128) in problem.layers[i].weight_cost else W4


def _uniform(weight: Callable[[Problem, int], WeightScheme], act: ActScheme) -> Recipe:
    def schemes(problem: Problem) -> tuple[LayerScheme, ...]:
        return tuple(
            UNQUANTIZED if problem.skipped[i] else LayerScheme(weight(problem, i), act)
            for i in range(len(problem.names))
        )

    return schemes


for _act in (ActScheme.STATIC, ActScheme.A16):
    recipe(f"{W4G128}:{_act}")(_uniform(w4g128, _act))
recipe(f"{W8}:{ActScheme.STATIC}")(_uniform(lambda _p, _i: W8, ActScheme.STATIC))


@recipe("fptq")
def fptq(problem: Problem) -> tuple[LayerScheme, ...]:
    acts = fptq_acts(problem, FPTQ_V0, FPTQ_V1)
    return tuple(
        UNQUANTIZED if problem.skipped[i] else LayerScheme(w4g128(problem, i), problem.acts[acts[i]])
        for i in range(len(acts))
    )


def fptq_acts(problem: Problem, v0: float, v1: float) -> np.ndarray:
    """[L] activation scheme index per layer by FPTQ's thresholds, made consistent within each group."""
    absmax = np.array([layer.act_absmax for layer in problem.layers])
    level = np.where(absmax <= v0, 0, np.where(absmax <= v1, np.where(foldable(problem), 1, 2), 2))
    group_level = np.zeros(len(problem.groups), dtype=np.int64)
    np.maximum.at(group_level, problem.group_of, level)
    severity = np.array([problem.acts.index(a) for a in SEVERITY])
    return severity[group_level[problem.group_of]]


def foldable(problem: Problem) -> np.ndarray:
    """[L] True where an equalization scale folds into the feeding norm (no skipped layer reads that norm)."""
    shared = {layer.feeder for layer, s in zip(problem.layers, problem.skipped, strict=True) if s}
    return np.array([layer.feeder is not None and layer.feeder not in shared for layer in problem.layers])
