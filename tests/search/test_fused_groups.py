"""Fused groups (`--fused-groups`, on by default for `--target compressed-tensors`): q/k/v and gate/up take one
scheme; the knapsack stays exact (brute force on small instances), and trial choices keep the units together."""

from __future__ import annotations

import itertools
import random

import numpy as np
import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantplan.quant.costs import TableInfo
from quantplan.quant.schemes import ActScheme, LayerScheme
from quantplan.quant.targets import ct_layer_reason
from quantplan.search import knapsack, lagrange
from quantplan.search.budget import Budget, BudgetError
from quantplan.search.problem import Problem, compile_problem
from quantplan.search.space import SearchError, SearchSpace
from quantplan.search.synthetic import synthetic_layer
from quantplan.search.trials import SPACES

SMALL_WEIGHTS = ("w4", "w4g32", "w8")
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BLOCK = (("self_attn.q_proj", "input_layernorm"), ("self_attn.k_proj", "input_layernorm"),
         ("self_attn.v_proj", "input_layernorm"), ("self_attn.o_proj", None),
         ("mlp.gate_proj", "post_attention_layernorm"), ("mlp.up_proj", "post_attention_layernorm"),
         ("mlp.down_proj", None))


@st.composite
def llama_tables(draw: st.DrawFn) -> TableInfo:
    """One or two Llama-shaped blocks (4 groups each: at most 8), random widths and costs."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    layers = []
    for b in range(draw(st.integers(1, 2))):
        k_attn, k_mlp = draw(st.sampled_from((32, 64, 96))), draw(st.sampled_from((32, 64, 128)))
        widths = {"o_proj": k_attn, "down_proj": k_mlp}
        for suffix, feeder in BLOCK:
            leaf = suffix.rsplit(".", 1)[1]
            k = widths.get(leaf, k_attn if "attn" in suffix else k_attn)
            n = draw(st.sampled_from((8, 16, 24))) if leaf != "down_proj" else k_attn
            if leaf in ("gate_proj", "up_proj"):
                n = k_mlp
            layers.append(synthetic_layer(f"model.layers.{b}.{suffix}", (n, k), feeder and f"model.layers.{b}.{feeder}",
                                          rng.uniform(1, 300), rng, (4, 8)))
    return TableInfo("llama-ish", {"name": "llama-ish", "fingerprint": "x", "model_type": "llama"}, {}, {},
                     tuple(layers))


def brute_force(problem: Problem) -> float | None:
    """The least loss within the budget, enumerating per group an activation scheme and per unit a weight scheme."""
    cost, size = np.zeros(1), np.zeros(1, dtype=np.int64)
    for units in problem.group_units:
        costs, sizes = [], []
        for a in range(len(problem.acts)):
            options = [np.flatnonzero(problem.valid[list(problem.units[u]), a].all(axis=0)) for u in units]
            if any(len(o) == 0 for o in options):
                continue
            for ws in itertools.product(*options):
                members = [(i, w) for u, w in zip(units, ws, strict=True) for i in problem.units[u]]
                costs.append(sum(problem.cost[i, a, w] for i, w in members))
                sizes.append(sum(int(problem.size[i, a, w]) for i, w in members))
        cost = (cost[:, None] + np.array(costs)[None]).ravel()
        size = (size[:, None] + np.array(sizes, dtype=np.int64)[None]).ravel()
        keep = size <= problem.limit
        cost, size = cost[keep], size[keep]
    return float(cost.min()) if len(cost) else None


def assert_units_agree(problem: Problem, choice: np.ndarray) -> None:
    for unit in problem.units:
        assert len({int(choice[i]) for i in unit}) == 1, [problem.names[i] for i in unit]


@SETTINGS
@given(table=llama_tables(), bits=st.floats(4.0, 9.0), act_bits=st.sampled_from([8, 16]))
def test_fused_knapsack_equals_brute_force(table: TableInfo, bits: float, act_bits: int) -> None:
    space = SearchSpace(act_bits=act_bits, symmetry="sym", weights=SMALL_WEIGHTS, fused_groups=True)
    try:
        problem = compile_problem(table, space, Budget(avg_bits=bits))
    except BudgetError:
        return
    assert len(problem.groups) <= 8 and problem.fused
    assert sorted(len(u) for u in problem.units if len(u) > 1) == sorted([2, 3] * (len(problem.names) // 7))
    result = knapsack.solve(problem)
    reference = brute_force(problem)
    assert reference is not None and result.exact and result.size <= problem.limit
    assert result.loss == pytest.approx(reference, rel=1e-9, abs=1e-15)
    assert_units_agree(problem, result.choice)
    unfused = compile_problem(table, SearchSpace(act_bits=act_bits, symmetry="sym", weights=SMALL_WEIGHTS),
                              Budget(avg_bits=bits))
    assert knapsack.solve(unfused).loss <= result.loss * (1 + 1e-9), "the constraint can only cost"


@SETTINGS
@given(table=llama_tables(), bits=st.floats(4.0, 9.0))
def test_lagrangian_choices_keep_units_together(table: TableInfo, bits: float) -> None:
    space = SearchSpace(act_bits=8, symmetry="both", fused_groups=True)
    try:
        problem = compile_problem(table, space, Budget(avg_bits=bits))
    except BudgetError:
        return
    for lam in (0.0, 1e-3, 1.0, 1e3):
        choice = lagrange.fit(problem, lam)
        if choice is not None:
            assert_units_agree(problem, choice)
            assert problem.total_size(choice) <= problem.limit


def test_target_compressed_tensors_keeps_to_what_it_expresses() -> None:
    rng = random.Random(0)
    layers = [synthetic_layer("model.layers.0.self_attn.q_proj", (64, 96), "model.layers.0.input_layernorm", 10.0,
                              rng, (4, 8)),
              synthetic_layer("model.layers.0.self_attn.k_proj", (32, 96), "model.layers.0.input_layernorm", 10.0,
                              rng, (4, 8)),
              synthetic_layer("model.layers.0.mlp.down_proj", (96, 172), None, 10.0, rng, (4, 8))]
    table = TableInfo("t", {"name": "t", "fingerprint": "t"}, {}, {}, tuple(layers))
    problem = compile_problem(table, SearchSpace(target="compressed-tensors"), Budget(avg_bits=16))
    assert problem.space.fused and problem.fused
    for i, layer in enumerate(problem.layers):
        for k in np.flatnonzero(problem.valid[i].ravel()):
            scheme = problem.choices[k]
            assert ct_layer_reason(scheme, layer.shape[1]) is None, (layer.name, str(scheme))
    down = problem.names.index("model.layers.0.mlp.down_proj")
    allowed = {str(problem.choices[k].weight) for k in np.flatnonzero(problem.valid[down].ravel())}
    assert allowed <= {"w4", "w4a", "w8", "w16"} and "w4g64" not in allowed  # 172 = K: no group tiles it
    assert not problem.valid[:, problem.acts.index(ActScheme.DYNAMIC), problem.weights.index(
        LayerScheme.parse("w16").weight)].any(), "w16:a8-* is not expressible"
    assert SearchSpace(target="compressed-tensors", fused_groups=False).fused is False
    with pytest.raises(SearchError, match="--target"):
        SearchSpace(target="onnx")
    assert "target" not in SearchSpace().to_dict(), "stored studies keep their configuration"


@pytest.mark.parametrize("kind", sorted(SPACES))
def test_trial_choices_keep_units_together(kind: str) -> None:
    table = _fixed_table()
    problem = compile_problem(table, SearchSpace(act_bits=8, fused_groups=True), Budget(avg_bits=4.5))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial_space = SPACES[kind](problem)
    for _ in range(30):
        trial = study.ask()
        choice = trial_space.suggest(trial)
        assert_units_agree(problem, choice)
        assert problem.total_size(choice) <= problem.limit and problem.take(problem.valid, choice).all()
        study.tell(trial, float(problem.take(problem.cost, choice).sum()))


def _fixed_table() -> TableInfo:
    rng = random.Random(1)
    layers = []
    for b in range(2):
        for suffix, feeder in BLOCK:
            k = 64 if "down" not in suffix else 128
            n = 128 if suffix.endswith(("gate_proj", "up_proj")) else 64
            layers.append(synthetic_layer(f"model.layers.{b}.{suffix}", (n, k), feeder and f"model.layers.{b}.{feeder}",
                                          rng.uniform(1, 300), rng, (4, 8)))
    return TableInfo("fixed", {"name": "fixed", "fingerprint": "x"}, {}, {}, tuple(layers))
