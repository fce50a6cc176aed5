"""Trial spaces: how an Optuna trial's parameters map through the table to a per-layer choice (a registry).

`structured` (any model size) has ~15 dimensions: the Lagrange multiplier (relative to the one that just
meets the budget), the activation rule (the proxy's choice per group, or FPTQ's thresholds v0/v1 searched),
and per-layer-type overrides of the weight bit-width and of each norm group's activation scheme. The choice is
the Lagrangian optimum under those restrictions, repaired to the budget and its slack filled.
`per-layer` has one categorical per group (activation scheme) and per layer (weight scheme): for small models
only, as TPE slows down with dimensions. A choice over the budget is shrunk greedily.
Both respect the a8-dynamic cap. Trials touch only arrays: no model, no torch. Optuna's categorical choices
are scheme names (the parameters stored in existing studies); each maps to an index of the compiled problem
once, when the trial space is built, so a trial parses nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from quantplan.quant.schemes import ActScheme
from quantplan.search import lagrange
from quantplan.search.problem import Problem, layer_types
from quantplan.search.recipes import fptq_acts
from quantplan.search.space import layer_type

AUTO = "auto"
LOG_LAMBDA = (-1.0, 2.0)  # decades around the multiplier that meets the budget
V0_RANGE, V1_RANGE = (1.0, 100.0), (10.0, 1000.0)


class TrialSpace(Protocol):
    def suggest(self, trial: Any) -> np.ndarray: ...


SPACES: dict[str, Callable[[Problem], TrialSpace]] = {}


def space(name: str) -> Callable[[type], type]:
    def register(cls: type) -> type:
        SPACES[name] = cls
        return cls

    return register


def _restrict(allowed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """allowed & mask, except for layers that the mask would leave with no choice."""
    out = allowed & mask
    empty = ~out.any(axis=(1, 2))
    out[empty] = allowed[empty]
    return out


@space("structured")
class Structured:
    """Lagrange multiplier, activation rule with FPTQ thresholds, per-layer-type overrides."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.lam_ref = _budget_lambda(problem)
        w_bits = np.array([w.bits for w in problem.weights])
        self.weight_masks: dict[str, dict[str, np.ndarray]] = {}  # type -> "w4" -> mask on its layers
        for t, idx in layer_types(problem).items():
            bits = sorted({int(b) for b in w_bits[problem.valid[idx].any(axis=(0, 1))]})
            if len(bits) > 1:
                self.weight_masks[t] = {f"w{b}": _only(problem, idx, (w_bits == b)[None, None, :]) for b in bits}
        self.act_masks: dict[str, dict[str, np.ndarray]] = {}  # group type -> act -> mask on its layers
        act_index = np.arange(len(problem.acts))
        for key, (groups, acts) in _group_types(problem).items():
            idx = [i for g in groups for i in problem.groups[g]]
            self.act_masks[key] = {str(problem.acts[a]): _only(problem, idx, (act_index == a)[None, :, None])
                                   for a in acts}
        self.rule = any(problem.valid[:, problem.acts.index(a)].any() for a in (ActScheme.STATIC, ActScheme.DYNAMIC))

    def suggest(self, trial: Any) -> np.ndarray:
        p = self.problem
        lam = self.lam_ref * 10 ** trial.suggest_float("log_lambda", *LOG_LAMBDA)
        allowed = self._act_rule(trial, p.valid)
        for prefix, overrides in (("w", self.weight_masks), ("a", self.act_masks)):
            for key, masks in overrides.items():
                value = trial.suggest_categorical(f"{prefix}:{key}", [AUTO, *masks])
                if value != AUTO:
                    allowed = _restrict(allowed, masks[value])
        allowed = lagrange.cap_dynamic(p, lam, allowed)
        choice = lagrange.fit(p, lam, allowed)
        return choice if choice is not None else lagrange.fit(p, lam, lagrange.cap_dynamic(p, lam, p.valid))

    def _act_rule(self, trial: Any, allowed: np.ndarray) -> np.ndarray:
        if not self.rule:
            return allowed
        rule = trial.suggest_categorical("act_rule", ["proxy", "fptq"])
        v0 = trial.suggest_float("v0", *V0_RANGE, log=True)
        v1 = trial.suggest_float("v1", *V1_RANGE, log=True)
        if rule == "proxy":
            return allowed
        acts = fptq_acts(self.problem, v0, max(v0, v1))  # [L]
        return _restrict(allowed, (np.arange(len(self.problem.acts))[None, :] == acts[:, None])[:, :, None])


def _only(problem: Problem, idx: list[int], restriction: np.ndarray) -> np.ndarray:
    """[L, A, W] mask: `restriction` (broadcast) on layers idx, everything allowed elsewhere."""
    mask = np.ones(problem.shape, dtype=bool)
    mask[idx] = np.broadcast_to(restriction, problem.shape)[idx]
    return mask


def _budget_lambda(problem: Problem) -> float:
    """The multiplier at which the unrestricted Lagrangian choice just fits the budget (at least 1e-9)."""
    choice = lagrange.solve(problem, 1e-9)
    if problem.total_size(choice) <= problem.limit:
        return 1e-9
    lo, hi = 1e-9, 1e-9
    while problem.total_size(lagrange.solve(problem, hi)) > problem.limit and hi < lagrange.LAMBDA_MAX:
        lo, hi = hi, hi * 8
    for _ in range(lagrange.BISECTIONS):
        mid = float(np.sqrt(lo * hi))
        lo, hi = (mid, hi) if problem.total_size(lagrange.solve(problem, mid)) > problem.limit else (lo, mid)
    return hi


def _group_types(problem: Problem) -> dict[str, tuple[list[int], list[int]]]:
    """Group type ('input_layernorm', 'self_attn.o_proj') -> (searched groups, act indices all of them may take)."""
    out: dict[str, tuple[list[int], list[int]]] = {}
    for g, key in enumerate(problem.group_keys):
        if problem.skipped[list(problem.groups[g])].all():
            continue
        out.setdefault(layer_type(key), ([], []))[0].append(g)
    for key, (groups, acts) in list(out.items()):
        shared = np.logical_and.reduce([problem.group_acts(g) for g in groups])
        acts.extend(np.flatnonzero(shared).tolist())
        if len(acts) < 2:
            del out[key]
    return out


@space("per-layer")
class PerLayer:
    """One categorical per group (activation scheme) and per layer (weight scheme)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        acts = [np.flatnonzero(problem.group_acts(g)) for g in range(len(problem.groups))]
        weights = [np.flatnonzero(problem.valid[list(u)].any(axis=1).all(axis=0)) for u in problem.units]
        # (Optuna parameter, its choices by name, the index of each choice): names only at the Optuna boundary
        self.act_params = [(f"a:{key}", [str(problem.acts[a]) for a in idx], idx.tolist())
                           for key, idx in zip(problem.group_keys, acts, strict=True)]
        # one per unit: a layer, or the layers fused into one (named by the first)
        self.weight_params = [(f"w:{problem.names[u[0]]}", [str(problem.weights[w]) for w in idx], idx.tolist())
                              for u, idx in zip(problem.units, weights, strict=True)]

    def suggest(self, trial: Any) -> np.ndarray:
        p = self.problem
        acts = self._cap(np.array([self._pick(trial, *param) for param in self.act_params]))
        weights = np.array([self._pick(trial, *param) for param in self.weight_params])[p.unit_of]
        a_l = acts[p.group_of]
        choice = np.array([a * p.shape[2] + self._nearest(i, a, w) for i, (a, w) in enumerate(zip(a_l, weights,
                                                                                                 strict=True))])
        allowed = p.valid & (np.arange(p.shape[1])[None, :] == a_l[:, None])[:, :, None]
        shrunk = lagrange.shrink(p, choice, allowed)
        return shrunk if shrunk is not None else lagrange.fit(p, 0.0, allowed)

    @staticmethod
    def _pick(trial: Any, name: str, options: list[str], indices: list[int]) -> int:
        """The index of the trial's choice: Optuna sees the scheme names `options` (as stored studies hold them)."""
        return indices[0] if len(options) == 1 else indices[options.index(trial.suggest_categorical(name, options))]

    def _cap(self, acts: np.ndarray) -> np.ndarray:
        p = self.problem
        allowed = lagrange.cap_dynamic(p, 0.0, p.valid, acts)
        values = lagrange.group_values(p, 0.0, allowed)  # [G, A]
        lost = ~np.array([allowed[list(p.groups[g]), a].any() for g, a in enumerate(acts)])
        return np.where(lost, values.argmin(axis=1), acts)

    def _nearest(self, i: int, a: int, w: int) -> int:
        """w if layer i may take it with act a, else the largest allowed weight scheme not above it."""
        p = self.problem
        ok = np.flatnonzero(p.valid[i, a])
        if w in ok:
            return w
        below = ok[p.bits[i, a, ok] <= p.bits[i, a, w]]
        return int(below[p.bits[i, a, below].argmax()] if len(below) else ok[p.bits[i, a, ok].argmin()])
