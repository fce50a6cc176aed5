"""Problem: a sensitivity table, a search space and a budget compiled into per-layer choice arrays.

Layer i may take weight scheme `weights[w]` with activation scheme `ACTS[a]` when `valid[i, a, w]`; the choice
predicts a loss increase `cost[i, a, w]` = weight cost + activation cost (nats/token, additive over layers)
and stores `size[i, a, w]` in the budget's unit (`bits[i, a, w]` exactly). A choice for the whole model is one
flat index `a * W + w` per layer. Layers fed by the same norm form a group and share one activation scheme;
skipped layers stay w16:a16 (and still count in the budget).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quantplan.errors import QuantPlanError
from quantplan.quant.costs import LayerSensitivity, TableError, TableInfo
from quantplan.quant.plan import LayerSpec, ModelRef, Plan, weight_cost
from quantplan.quant.schemes import ActScheme, LayerScheme, WeightScheme
from quantplan.search.budget import Budget
from quantplan.search.space import ACTS, DYNAMIC, SearchSpace, layer_type

UNQUANTIZED = ("w16", "a16")
BIG = 1e18  # stands for "not allowed" in sums (finite, so masked sums stay ordered)


@dataclass(frozen=True)
class Candidate:
    """A whole-model choice with its predicted loss and exact size."""

    label: str
    schemes: tuple[str, ...]  # per layer, table order: "w4g64:a8-dynamic"
    predicted_loss: float
    bits: int
    bytes: int
    avg_bits: float
    under_budget: bool
    in_space: bool = True  # every layer's scheme is a choice of the search space (baselines may not be)
    trial: int | None = None
    recipe: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "recipe": self.recipe,
            "trial": self.trial,
            "predicted_loss": self.predicted_loss,
            "avg_bits": self.avg_bits,
            "bytes": self.bytes,
            "under_budget": self.under_budget,
            "in_space": self.in_space,
        }


@dataclass(frozen=True, eq=False)
class Problem:
    """Arrays over (layer, activation scheme, weight scheme); see the module docstring."""

    table: TableInfo
    space: SearchSpace
    budget: Budget
    weights: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]
    group_keys: tuple[str, ...]  # the feeding norm, or the layer name for a group of one
    valid: np.ndarray  # [L, A, W] bool
    cost: np.ndarray  # [L, A, W] float64
    bits: np.ndarray  # [L, A, W] int64
    size: np.ndarray  # [L, A, W] int64, budget unit
    skipped: np.ndarray  # [L] bool
    limit: int  # largest total size within the budget
    params: int
    group_of: np.ndarray = field(init=False)  # [L] group index
    member: np.ndarray = field(init=False)  # [G, L] 0/1: sums per group by matrix product
    rows: np.ndarray = field(init=False)  # [L] arange, for fancy indexing

    def __post_init__(self) -> None:
        group_of = np.zeros(len(self.names), dtype=np.int64)
        for g, members in enumerate(self.groups):
            group_of[list(members)] = g
        member = np.zeros((len(self.groups), len(self.names)))
        member[group_of, np.arange(len(self.names))] = 1.0
        object.__setattr__(self, "group_of", group_of)
        object.__setattr__(self, "member", member)
        object.__setattr__(self, "rows", np.arange(len(self.names)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.table.layers)

    @property
    def layers(self) -> tuple[LayerSensitivity, ...]:
        return self.table.layers

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.valid.shape  # type: ignore[return-value]

    @property
    def dynamic_cap(self) -> int | None:
        """The most layers that may use a8-dynamic (None: no cap)."""
        share = self.space.max_dynamic_share
        return None if share is None else math.floor(share * int((~self.skipped).sum()) + 1e-9)

    def group_acts(self, g: int) -> np.ndarray:
        """[A] bool: activation schemes every member of group g can take with some weight scheme."""
        return self.valid[list(self.groups[g])].any(axis=2).all(axis=0)

    # -- evaluating choices -----------------------------------------------------------------------------
    def take(self, array: np.ndarray, choice: np.ndarray) -> np.ndarray:
        """array[i, choice[i]] for every layer (array [L, A, W], choice [L] flat indices)."""
        return array.reshape(len(choice), -1)[self.rows, choice]

    def total_size(self, choice: np.ndarray) -> int:
        return int(self.take(self.size, choice).sum())

    def dynamic_layers(self, choice: np.ndarray) -> int:
        return int((choice // self.shape[2] == ACTS.index(DYNAMIC)).sum())

    def schemes(self, choice: np.ndarray) -> tuple[str, ...]:
        a, w = np.divmod(choice, self.shape[2])
        return tuple(f"{self.weights[wi]}:{ACTS[ai]}" for ai, wi in zip(a.tolist(), w.tolist(), strict=True))

    def candidate(self, choice: np.ndarray, label: str, **kw: Any) -> Candidate:
        assert self.take(self.valid, choice).all(), "choice outside the valid set"
        bits = self.take(self.bits, choice)
        loss, total = float(self.take(self.cost, choice).sum()), int(bits.sum())
        size = total if self.budget.unit == "bits" else int((-(-bits // 8)).sum())
        return Candidate(label, self.schemes(choice), loss, total, int((-(-bits // 8)).sum()), total / self.params,
                         size <= self.limit, **kw)

    def score(self, schemes: Sequence[str], label: str, **kw: Any) -> Candidate:
        """Predicted loss and exact size of arbitrary per-layer schemes (baselines may lie outside the space)."""
        loss, bits, nbytes = 0.0, 0, 0
        for i, text in enumerate(schemes):
            layer_loss, layer_bits = self._score_layer(i, text)
            loss, bits, nbytes = loss + layer_loss, bits + layer_bits, nbytes + -(-layer_bits // 8)
        size = bits if self.budget.unit == "bits" else nbytes
        in_space = all(self._allows(i, text) for i, text in enumerate(schemes))
        return Candidate(label, tuple(schemes), loss, bits, nbytes, bits / self.params, size <= self.limit,
                         in_space, **kw)

    def _allows(self, i: int, text: str) -> bool:
        w, _, a = text.partition(":")
        return w in self.weights and bool(self.valid[i, ACTS.index(a), self.weights.index(w)])

    def _score_layer(self, i: int, text: str) -> tuple[float, int]:
        cache = self.__dict__.setdefault("_scores", {})
        if (i, text) not in cache:
            layer, scheme = self.layers[i], LayerScheme.parse(text)
            cache[i, text] = _layer_loss(layer, scheme), weight_cost(scheme.weight, *layer.shape, layer.name).bits
        return cache[i, text]

    def plan(self, candidate: Candidate, meta: Mapping[str, Any] | None = None) -> Plan:
        """The plan: every quantized layer by name with the table's Fisher-optimal clip for its weights."""
        layers = {}
        for layer, text in zip(self.layers, candidate.schemes, strict=True):
            scheme = LayerScheme.parse(text)
            if scheme.quantized:
                layers[layer.name] = LayerSpec(scheme, clip=float(layer.clip.get(str(scheme.weight), 1.0)))
        model = ModelRef(str(self.table.model.get("name", "")), None, self.table.model.get("fingerprint"))
        return Plan.from_layers(layers, model=model, meta=dict(meta or {}))

    def min_size(self) -> int:
        """The smallest total size any choice in the space reaches (each group at its best act)."""
        smallest = np.where(self.valid, self.size, np.iinfo(np.int64).max // 4).min(axis=2)  # [L, A]
        per_group = self.member @ smallest.astype(np.float64)  # [G, A]; exact below 2^53
        return int(per_group.min(axis=1).sum())


def _layer_loss(layer: LayerSensitivity, scheme: LayerScheme) -> float:
    w, a = str(scheme.weight), str(scheme.act)
    if w not in layer.weight_cost or a not in layer.act_cost:
        missing = w if w not in layer.weight_cost else a
        raise TableError(f"the sensitivity table has no cost for {missing} on {layer.name}; recompute the table")
    return float(layer.weight_cost[w]) + float(layer.act_cost[a])


# -- compiling ----------------------------------------------------------------------------------------------
def compile_problem(
    table: TableInfo, space: SearchSpace, budget: Budget, shapes: Mapping[str, tuple[int, int]] | None = None
) -> Problem:
    """Check the table (and that it matches a model's layer `shapes`), then build the choice arrays."""
    check_table(table, shapes)
    weight_acts = space.weight_acts()
    weights = tuple(weight_acts) + (() if "w16" in weight_acts else ("w16",))
    skipped = np.array([space.skipped(layer.name) for layer in table.layers])
    if skipped.all():
        raise QuantPlanError(f"--skip {space.skip!r} matches every layer: nothing is left to search")
    groups, keys = _groups(table.layers, skipped)
    valid, cost, bits = _arrays(table.layers, weights, weight_acts, space, skipped)
    _restrict_groups(valid, groups)
    _check_choices(table.layers, valid, weights)
    params = sum(layer.params for layer in table.layers)
    size = bits if budget.unit == "bits" else -(-bits // 8)
    problem = Problem(table, space, budget, weights, groups, keys, valid, cost, bits, size, skipped,
                      budget.limit(params), params)
    smallest = problem.min_size()
    if smallest > problem.limit:
        raise budget.infeasible(smallest, params)
    return problem


def check_table(table: TableInfo, shapes: Mapping[str, tuple[int, int]] | None = None) -> None:
    """A usable table: layers present, costs for w16 and a16, known scheme names, matching the model."""
    if not table.layers:
        raise TableError("the sensitivity table has no layers; recompute it with `quantplan sensitivity`")
    for layer in table.layers:
        for name in layer.weight_cost:
            _parse(WeightScheme.parse, name, layer.name)
        for name in layer.act_cost:
            _parse(ActScheme.parse, name, layer.name)
        if "w16" not in layer.weight_cost or "a16" not in layer.act_cost:
            raise TableError(f"table layer {layer.name} lacks the w16/a16 reference costs; recompute the table")
    if shapes is not None:
        _check_shapes(table, shapes)


def _parse(parse: Any, name: str, where: str) -> None:
    try:
        parse(name)
    except QuantPlanError as e:
        raise TableError(f"table layer {where}: {e}; recompute the table with this QuantPlan") from None


def _check_shapes(table: TableInfo, shapes: Mapping[str, tuple[int, int]]) -> None:
    mine = {layer.name: tuple(layer.shape) for layer in table.layers}
    missing, extra = sorted(set(shapes) - set(mine)), sorted(set(mine) - set(shapes))
    wrong = sorted(n for n in set(mine) & set(shapes) if tuple(shapes[n]) != mine[n])
    if missing or extra or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for what, names in (("not in the table", missing), ("not in the model", extra),
                                ("other shape", wrong))
            if names
        )
        raise TableError(
            f"the sensitivity table does not match the model ({detail}); compute the table for this model "
            "(leave out --table, or run `quantplan sensitivity`)"
        )


def _groups(layers: Sequence[LayerSensitivity], skipped: np.ndarray) -> tuple[tuple[tuple[int, ...], ...],
                                                                              tuple[str, ...]]:
    by_key: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        key = layer.name if layer.feeder is None or skipped[i] else layer.feeder
        by_key.setdefault(key, []).append(i)
    return tuple(tuple(v) for v in by_key.values()), tuple(by_key)


def _arrays(layers, weights, weight_acts, space, skipped) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shape = (len(layers), len(ACTS), len(weights))
    valid, cost, bits = np.zeros(shape, bool), np.full(shape, BIG), np.zeros(shape, np.int64)
    # a norm that also feeds a skipped (unquantized) layer cannot absorb an equalization scale
    no_fold = {layer.feeder for layer, s in zip(layers, skipped, strict=True) if s and layer.feeder}
    for i, layer in enumerate(layers):
        acts = _layer_acts(layer, space, bool(skipped[i]), no_fold)
        for w, name in enumerate(weights):
            if name not in layer.weight_cost:
                continue  # the scheme's group does not fit K
            bits[i, :, w] = weight_cost(WeightScheme.parse(name), *layer.shape, layer.name).bits
            for a in acts & _served(name, weight_acts, bool(skipped[i])):
                valid[i, a, w] = True
                cost[i, a, w] = float(layer.weight_cost[name]) + float(layer.act_cost.get(ACTS[a], BIG))
    return valid, cost, bits


def _layer_acts(layer: LayerSensitivity, space: SearchSpace, skipped: bool, no_fold: set[str]) -> set[int]:
    if skipped:
        return {ACTS.index(UNQUANTIZED[1])}
    acts = space.layer_acts(layer)
    if layer.feeder in no_fold:
        acts = tuple(a for a in acts if not ActScheme(a).equalized)
    return {ACTS.index(a) for a in acts}


def _served(weight: str, weight_acts: Mapping[str, tuple[str, ...]], skipped: bool) -> set[int]:
    if skipped:
        return {ACTS.index(UNQUANTIZED[1])} if weight == UNQUANTIZED[0] else set()
    return {ACTS.index(a) for a in weight_acts.get(weight, ())}


def _restrict_groups(valid: np.ndarray, groups: Sequence[Sequence[int]]) -> None:
    """A group keeps the activation schemes all its members can take."""
    for members in groups:
        idx = list(members)
        shared = valid[idx].any(axis=2).all(axis=0)  # [A]
        valid[idx] &= shared[None, :, None]


def _check_choices(layers: Sequence[LayerSensitivity], valid: np.ndarray, weights: tuple[str, ...]) -> None:
    empty = [layer.name for layer, v in zip(layers, valid, strict=True) if not v.any()]
    if empty:
        raise TableError(
            f"no searched scheme ({', '.join(weights)}) has a cost for {', '.join(empty[:3])} in the table, or the "
            "group's layers share no activation scheme; recompute the table or widen the space"
        )


def layer_types(problem: Problem) -> dict[str, list[int]]:
    """Layer type ('self_attn.q_proj') -> searched layer indices."""
    out: dict[str, list[int]] = {}
    for i, name in enumerate(problem.names):
        if not problem.skipped[i]:
            out.setdefault(layer_type(name), []).append(i)
    return out
