"""Measured local refinement: coordinate descent from a plan, each step measured, never beyond the budget.

The proxy ranks whole plans well where the table was calibrated on the model's own kind of text; far from it
(a 260K-parameter story model on WikiText-2) two plans with the same predicted loss can differ by 1% in
perplexity, and the measured stage is the only judge. This module moves one coordinate at a time from a
starting plan: a group's activation scheme (its members keep their weights) or a layer's weight scheme (its
group keeps its activation; layers fused into one unit move together), only to choices of the search space,
within the budget and the a8-dynamic cap.
The caller measures (`Measure`: candidates in, scores out, lower is better, e.g. perplexity on a selection
slice kept apart from the reported tokens); this module sees numbers only.

One round measures the next `batch` untried moves from the current plan: moves that improved on an earlier
plan first, then activation moves (they change no byte, and the proxy's activation costs are the part it
predicts worst: 1e-4 nats apart where measured perplexities differ by 1%), then weight moves, each by
predicted loss (the proxy as the prior). The best of them is taken if it improves on the current plan by
more than `min_gain` (relative): a smaller gain is within the noise of a perplexity difference between close
plans, and taking it would fit the measured slice, not the model. The descent stops at a local optimum
(every move from the current plan measured, none better by that margin) or when `max_evals` measurements are
spent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from quantplan.quant.schemes import PER_CHANNEL, ActScheme, WeightScheme
from quantplan.search.problem import Candidate, Problem

log = logging.getLogger(__name__)

Measure = Callable[[Sequence[Candidate]], Sequence[float]]  # positive, lower is better, in the order given


@dataclass(frozen=True)
class Move:
    """One coordinate changed: `what` (a group's norm or a layer's name), from -> to, and the plan it gives."""

    kind: str  # "act" (a group's activation scheme) or "weight" (a layer's weight scheme)
    what: str
    before: ActScheme | WeightScheme
    after: ActScheme | WeightScheme
    choice: np.ndarray = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"{self.what}: {self.before} -> {self.after}"


@dataclass
class Refinement:
    """The descent: the accepted steps (the start first) and every measured candidate with its score."""

    steps: list[tuple[Candidate, float]]
    measured: list[tuple[Candidate, float]] = field(default_factory=list)
    moves: list[str] = field(default_factory=list)  # the accepted moves' labels, in order
    local_optimum: bool = False  # stopped because no move from the last plan improved it
    min_gain: float = 0.0  # the relative gain a step had to exceed

    @property
    def best(self) -> Candidate:
        return self.steps[-1][0]

    @property
    def evaluations(self) -> int:
        return len(self.measured)


def choice_of(problem: Problem, candidate: Candidate) -> np.ndarray:
    """The flat choice index per layer of a candidate inside the space."""
    return np.array([problem.index[s] for s in candidate.schemes], dtype=np.int64)


def neighbors(problem: Problem, choice: np.ndarray) -> list[Move]:
    """Every plan one coordinate away within the space, the budget and the a8-dynamic cap; a move that
    quantizes a layer exactly as before (w4g64 and w4 on K = 64) is left out."""
    acts, weights = np.divmod(choice, problem.shape[2])
    moves = [*_act_moves(problem, choice, acts, weights), *_weight_moves(problem, choice, acts, weights)]
    cap = problem.dynamic_cap
    return [m for m in moves if problem.total_size(m.choice) <= problem.limit
            and (cap is None or problem.dynamic_layers(m.choice) <= cap)]


def _act_moves(problem: Problem, choice: np.ndarray, acts: np.ndarray, weights: np.ndarray) -> list[Move]:
    out = []
    for key, members in zip(problem.group_keys, problem.groups, strict=True):
        idx = list(members)
        for a in range(problem.shape[1]):
            if a == acts[idx[0]] or not problem.valid[idx, a, weights[idx]].all():
                continue
            moved = choice.copy()
            moved[idx] = a * problem.shape[2] + weights[idx]
            out.append(Move("act", key, problem.acts[acts[idx[0]]], problem.acts[a], moved))
    return out


def _weight_moves(problem: Problem, choice: np.ndarray, acts: np.ndarray, weights: np.ndarray) -> list[Move]:
    out = []
    for unit in problem.units:  # a layer, or the layers fused into one (they move together)
        i, name = unit[0], problem.names[unit[0]]
        seen = {_quantizer(problem, i, int(weights[i]))}
        for w in range(problem.shape[2]):
            quantizer = _quantizer(problem, i, w)
            if quantizer in seen or not problem.valid[list(unit), acts[i], w].all():
                continue
            seen.add(quantizer)
            moved = choice.copy()
            moved[list(unit)] = acts[i] * problem.shape[2] + w
            out.append(Move("weight", name, problem.weights[weights[i]], problem.weights[w], moved))
    return out


def _quantizer(problem: Problem, i: int, w: int) -> tuple[int, int, bool, float]:
    """What the weights become: a group as wide as K is one group per row, whatever its name."""
    layer, scheme = problem.layers[i], problem.weights[w]
    group = PER_CHANNEL if scheme.group >= layer.shape[1] else scheme.group
    return scheme.bits, group, scheme.asymmetric, float(layer.clip.get(str(scheme), 1.0))  # the table's key


def refine(problem: Problem, start: Candidate, start_score: float, measure: Measure, *, max_evals: int,
           batch: int = 8, min_gain: float = 0.0) -> Refinement:
    """Coordinate descent from `start` (already scored `start_score`) with at most `max_evals` measurements,
    `batch` per round; a move is taken only if it lowers the score by more than the relative `min_gain`
    (smaller gains are measurement noise, not a better plan). See the module docstring."""
    assert start.in_space and start.under_budget, "refinement starts from a plan within the budget and space"
    result = Refinement(steps=[(start, start_score)], min_gain=min_gain)
    choice, score = choice_of(problem, start), start_score
    tried: set[bytes] = {choice.tobytes()}  # the plans measured, by their choice indices
    promising: set[str] = set()  # moves that improved on some plan: tried first again
    while result.evaluations < max_evals:
        moves = [m for m in neighbors(problem, choice) if m.choice.tobytes() not in tried]
        if not moves:
            result.local_optimum = True
            break
        moves.sort(key=lambda m: (m.label not in promising, m.kind != "act",
                                  float(problem.take(problem.cost, m.choice).sum())))
        take = moves[: min(batch, max_evals - result.evaluations)]
        first = result.evaluations + 1
        candidates = [problem.candidate(m.choice, f"refined:{first + k}", recipe="refined") for k, m in
                      enumerate(take)]
        scores = [float(s) for s in measure(candidates)]
        tried |= {m.choice.tobytes() for m in take}
        result.measured += list(zip(candidates, scores, strict=True))
        bar = score * (1 - min_gain)
        promising |= {m.label for m, s in zip(take, scores, strict=True) if s < bar}
        k = int(np.argmin(scores))
        if scores[k] < bar:
            choice, score = take[k].choice, scores[k]
            result.steps.append((candidates[k], score))
            result.moves.append(take[k].label)
            promising.discard(take[k].label)
        log.info("refine: %d/%d measured, score %.4f after %d moves", result.evaluations, max_evals, score,
                 len(result.moves))
    return result
