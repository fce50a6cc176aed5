"""Problem: a sensitivity table, a search space and a budget compiled into per-layer choice arrays.

Layer i may take weight scheme `weights[w]` with activation scheme `acts[a]` when `valid[i, a, w]`; the choice
predicts a loss increase `cost[i, a, w]` = weight cost + activation cost (nats/token, additive over layers)
and stores `size[i, a, w]` in the budget's unit (`bits[i, a, w]` exactly). A choice for the whole model is one
flat index `a * W + w` per layer, and `choices[a * W + w]` is that `LayerScheme`. Layers fed by the same norm
form a group and share one activation scheme; skipped layers stay w16:a16 (and still count in the budget).
With fused groups (`SearchSpace.fused`), the layers a server fuses into one (q/k/v, gate/up) form a unit that
takes one scheme: `units` partitions the layers (singletons otherwise), every unit lies inside one group, and
`valid` is the same on all members of a unit.

Schemes are objects from here on: the table's scheme names are parsed once, when the problem is compiled, and
names appear again only where search writes them (plan JSON, the study's trials, Optuna's categorical choices).
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
from quantplan.quant.schemes import UNQUANTIZED, ActScheme, LayerScheme, WeightScheme
from quantplan.quant.targets import CT_TARGET, ct_layer_reason, fused_groups
from quantplan.search.budget import Budget
from quantplan.search.space import ACTS, SearchSpace, layer_type

BIG = 1e18  # stands for "not allowed" in sums (finite, so masked sums stay ordered)


@dataclass(frozen=True)
class Candidate:
    """A whole-model choice with its predicted loss and exact size."""

    label: str
    schemes: tuple[LayerScheme, ...]  # per layer, table order
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

    def names(self) -> list[str]:
        """The per-layer scheme names (for the study and JSON); each distinct object is formatted once, as a plan
        repeats a few of its problem's scheme objects."""
        by_id: dict[int, str] = {}
        return [by_id.get(id(s)) or by_id.setdefault(id(s), str(s)) for s in self.schemes]

    @property
    def act_bits(self) -> int:
        """The narrowest activation width any layer uses: 8 when some layer quantizes its inputs, else 16."""
        return min(s.act.bits for s in self.schemes)


@dataclass(frozen=True, eq=False)
class Problem:
    """Arrays over (layer, activation scheme, weight scheme); see the module docstring."""

    table: TableInfo
    space: SearchSpace
    budget: Budget
    weights: tuple[WeightScheme, ...]
    acts: tuple[ActScheme, ...]
    groups: tuple[tuple[int, ...], ...]
    group_keys: tuple[str, ...]  # the feeding norm, or the layer name for a group of one
    valid: np.ndarray  # [L, A, W] bool
    cost: np.ndarray  # [L, A, W] float64
    bits: np.ndarray  # [L, A, W] int64
    size: np.ndarray  # [L, A, W] int64, budget unit
    skipped: np.ndarray  # [L] bool
    limit: int  # largest total size within the budget
    params: int
    units: tuple[tuple[int, ...], ...] = ()  # layers taking one scheme together; () means one unit per layer
    group_of: np.ndarray = field(init=False)  # [L] group index
    member: np.ndarray = field(init=False)  # [G, L] 0/1: sums per group by matrix product
    rows: np.ndarray = field(init=False)  # [L] arange, for fancy indexing
    choices: tuple[LayerScheme, ...] = field(init=False)  # [A * W] the scheme of each flat index
    index: dict[LayerScheme, int] = field(init=False)  # scheme -> its flat index
    named: dict[str, LayerScheme] = field(init=False)  # canonical name -> scheme (reading stored plans)
    unit_of: np.ndarray = field(init=False)  # [L] unit index
    unit_member: np.ndarray = field(init=False)  # [U, L] 0/1
    group_units: tuple[tuple[int, ...], ...] = field(init=False)  # per group, its units in order

    def __post_init__(self) -> None:
        self._init_units()
        group_of = np.zeros(len(self.names), dtype=np.int64)
        for g, members in enumerate(self.groups):
            group_of[list(members)] = g
        member = np.zeros((len(self.groups), len(self.names)))
        member[group_of, np.arange(len(self.names))] = 1.0
        object.__setattr__(self, "group_of", group_of)
        object.__setattr__(self, "member", member)
        object.__setattr__(self, "rows", np.arange(len(self.names)))
        choices = tuple(LayerScheme(w, a) for a in self.acts for w in self.weights)
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "index", {s: k for k, s in enumerate(choices)})
        object.__setattr__(self, "named", {str(s): s for s in choices})

    def _init_units(self) -> None:
        units = self.units or tuple((i,) for i in range(len(self.table.layers)))
        unit_of = np.zeros(len(self.table.layers), dtype=np.int64)
        for u, members in enumerate(units):
            unit_of[list(members)] = u
        unit_member = np.zeros((len(units), len(unit_of)))
        unit_member[unit_of, np.arange(len(unit_of))] = 1.0
        group_units = tuple(tuple(dict.fromkeys(int(unit_of[i]) for i in members)) for members in self.groups)
        for name, value in (("units", units), ("unit_of", unit_of), ("unit_member", unit_member),
                            ("group_units", group_units)):
            object.__setattr__(self, name, value)

    @property
    def fused(self) -> bool:
        """Some unit holds more than one layer."""
        return len(self.units) < len(self.table.layers)

    def tie(self, allowed: np.ndarray) -> np.ndarray:
        """`allowed` [L, A, W] with each unit kept to the options all its members allow (a unit left with none
        gets its valid options back)."""
        if not self.fused:
            return allowed
        out = allowed.copy()
        for members in self.units:
            if len(members) > 1:
                idx = list(members)
                shared = allowed[idx].all(axis=0)
                out[idx] = shared if shared.any() else self.valid[idx[0]]
        return out

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
        return int((choice // self.shape[2] == self.acts.index(ActScheme.DYNAMIC)).sum())

    def schemes(self, choice: np.ndarray) -> tuple[LayerScheme, ...]:
        return tuple(map(self.choices.__getitem__, choice.tolist()))

    def candidate(self, choice: np.ndarray, label: str, **kw: Any) -> Candidate:
        assert self.take(self.valid, choice).all(), "choice outside the valid set"
        bits = self.take(self.bits, choice)
        loss, total = float(self.take(self.cost, choice).sum()), int(bits.sum())
        size = total if self.budget.unit == "bits" else int((-(-bits // 8)).sum())
        return Candidate(label, self.schemes(choice), loss, total, int((-(-bits // 8)).sum()), total / self.params,
                         size <= self.limit, **kw)

    def score(self, schemes: Sequence[LayerScheme], label: str, **kw: Any) -> Candidate:
        """Predicted loss and exact size of arbitrary per-layer schemes (baselines may lie outside the space)."""
        loss, bits, nbytes = 0.0, 0, 0
        for i, scheme in enumerate(schemes):
            layer_loss, layer_bits = self._score_layer(i, scheme)
            loss, bits, nbytes = loss + layer_loss, bits + layer_bits, nbytes + -(-layer_bits // 8)
        size = bits if self.budget.unit == "bits" else nbytes
        in_space = all(self._allows(i, scheme) for i, scheme in enumerate(schemes))
        return Candidate(label, tuple(schemes), loss, bits, nbytes, bits / self.params, size <= self.limit,
                         in_space, **kw)

    def scheme(self, name: str) -> LayerScheme:
        """The scheme called `name` (a stored plan's): the space's own object, parsed only if the space lacks it."""
        return self.named.get(name) or LayerScheme.parse(name)

    def _allows(self, i: int, scheme: LayerScheme) -> bool:
        k = self.index.get(scheme)
        return k is not None and bool(self.valid[i].flat[k])

    def _score_layer(self, i: int, scheme: LayerScheme) -> tuple[float, int]:
        cache = self.__dict__.setdefault("_scores", {})
        if (i, scheme) not in cache:
            layer = self.layers[i]
            cache[i, scheme] = _layer_loss(layer, scheme), weight_cost(scheme.weight, *layer.shape, layer.name).bits
        return cache[i, scheme]

    def plan(self, candidate: Candidate, meta: Mapping[str, Any] | None = None) -> Plan:
        """The plan: every quantized layer by name with the table's Fisher-optimal clip for its weights."""
        layers = {}
        for layer, scheme in zip(self.layers, candidate.schemes, strict=True):
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
    w, a = str(scheme.weight), str(scheme.act)  # the table's keys
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
    weights = tuple(weight_acts) + (() if UNQUANTIZED.weight in weight_acts else (UNQUANTIZED.weight,))
    acts = tuple(ActScheme.parse(a) for a in ACTS)
    skipped = np.array([space.skipped(layer.name) for layer in table.layers])
    if skipped.all():
        raise QuantPlanError(f"--skip {space.skip!r} matches every layer: nothing is left to search")
    groups, keys = _groups(table.layers, skipped)
    valid, cost, bits = _arrays(table.layers, weights, acts, weight_acts, space, skipped)
    if space.target == CT_TARGET:
        _restrict_target(valid, table.layers, weights, acts, skipped)
    units: tuple[tuple[int, ...], ...] = ()
    if space.fused:
        units = _fused_units(table, skipped)
        groups, keys = _merge_groups(groups, keys, units)
    restrict_groups(valid, groups)
    for members in units:
        valid[list(members)] &= valid[list(members)].all(axis=0)
    _check_choices(table.layers, valid, weights)
    params = sum(layer.params for layer in table.layers)
    size = bits if budget.unit == "bits" else -(-bits // 8)
    problem = Problem(table, space, budget, weights, acts, groups, keys, valid, cost, bits, size, skipped,
                      budget.limit(params), params, units)
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


def _arrays(layers, weights, acts, weight_acts, space, skipped) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shape = (len(layers), len(acts), len(weights))
    valid, cost, bits = np.zeros(shape, bool), np.full(shape, BIG), np.zeros(shape, np.int64)
    # a norm that also feeds a skipped (unquantized) layer cannot absorb an equalization scale
    no_fold = {layer.feeder for layer, s in zip(layers, skipped, strict=True) if s and layer.feeder}
    for i, layer in enumerate(layers):
        layer_acts = _layer_acts(layer, acts, space, bool(skipped[i]), no_fold)
        for w, scheme in enumerate(weights):
            name = str(scheme)  # the table's key
            if name not in layer.weight_cost:
                continue  # the scheme's group does not fit K
            bits[i, :, w] = weight_cost(scheme, *layer.shape, layer.name).bits
            for a in layer_acts & _served(scheme, acts, weight_acts, bool(skipped[i])):
                valid[i, a, w] = True
                cost[i, a, w] = float(layer.weight_cost[name]) + float(layer.act_cost.get(str(acts[a]), BIG))
    return valid, cost, bits


def _layer_acts(layer: LayerSensitivity, acts: tuple[ActScheme, ...], space: SearchSpace, skipped: bool,
                no_fold: set[str]) -> set[int]:
    if skipped:
        return {acts.index(UNQUANTIZED.act)}
    allowed = space.layer_acts(layer)
    if layer.feeder in no_fold:
        allowed = tuple(a for a in allowed if not a.equalized)
    return {acts.index(a) for a in allowed}


def _served(weight: WeightScheme, acts: tuple[ActScheme, ...],
            weight_acts: Mapping[WeightScheme, tuple[ActScheme, ...]], skipped: bool) -> set[int]:
    if skipped:
        return {acts.index(UNQUANTIZED.act)} if weight == UNQUANTIZED.weight else set()
    return {acts.index(a) for a in weight_acts.get(weight, ())}


def _restrict_target(valid: np.ndarray, layers: Sequence[LayerSensitivity], weights: tuple[WeightScheme, ...],
                     acts: tuple[ActScheme, ...], skipped: np.ndarray) -> None:
    """Keep to the schemes compressed-tensors expresses on each layer (its K; equalizations only where a norm feeds
    the layer, which the space already requires)."""
    for i, layer in enumerate(layers):
        if skipped[i]:
            continue
        for a, act in enumerate(acts):
            for w, weight in enumerate(weights):
                if valid[i, a, w] and ct_layer_reason(LayerScheme(weight, act), layer.shape[1]):
                    valid[i, a, w] = False


def _fused_units(table: TableInfo, skipped: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """One unit per fused set of searched layers (from the model type the table records), singletons for the rest."""
    index = {layer.name: i for i, layer in enumerate(table.layers)}
    searched = [layer.name for i, layer in enumerate(table.layers) if not skipped[i]]
    fused = [tuple(index[n] for n in g) for g in fused_groups(searched, table.model.get("model_type"))]
    taken = {i for g in fused for i in g}
    return tuple(sorted([*fused, *((i,) for i in range(len(table.layers)) if i not in taken)]))


def _merge_groups(groups: tuple[tuple[int, ...], ...], keys: tuple[str, ...], units: Sequence[Sequence[int]],
                  ) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """Groups joined wherever one unit spans several (a fused layer takes one activation scheme too)."""
    parent = list(range(len(groups)))
    group_of = {i: g for g, members in enumerate(groups) for i in members}

    def root(g: int) -> int:
        while parent[g] != g:
            g = parent[g]
        return g

    for members in units:
        for i in members[1:]:
            parent[root(group_of[i])] = root(group_of[members[0]])
    merged: dict[int, list[int]] = {}
    for g in range(len(groups)):
        merged.setdefault(root(g), []).extend(groups[g])
    return tuple(tuple(sorted(m)) for m in merged.values()), tuple(keys[g] for g in merged)


def restrict_groups(valid: np.ndarray, groups: Sequence[Sequence[int]]) -> None:
    """A group keeps the activation schemes all its members can take."""
    for members in groups:
        idx = list(members)
        shared = valid[idx].any(axis=2).all(axis=0)  # [A]
        valid[idx] &= shared[None, :, None]


def _check_choices(layers: Sequence[LayerSensitivity], valid: np.ndarray, weights: tuple[WeightScheme, ...]) -> None:
    empty = [layer.name for layer, v in zip(layers, valid, strict=True) if not v.any()]
    if empty:
        raise TableError(
            f"no searched scheme ({', '.join(map(str, weights))}) has a cost for {', '.join(empty[:3])} in the "
            "table, or the group's layers share no activation scheme; recompute the table or widen the space"
        )


def layer_types(problem: Problem) -> dict[str, list[int]]:
    """Layer type ('self_attn.q_proj') -> searched layer indices."""
    out: dict[str, list[int]] = {}
    for i, name in enumerate(problem.names):
        if not problem.skipped[i]:
            out.setdefault(layer_type(name), []).append(i)
    return out
