"""Search space, budget and problem compilation: served combinations, groups, skip, and clear errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from quantplan.errors import QuantPlanError, SchemeError
from quantplan.quant.costs import LayerSensitivity, TableError, TableInfo
from quantplan.quant.plan import weight_cost
from quantplan.quant.schemes import ActScheme, WeightScheme
from quantplan.search.budget import Budget, BudgetError
from quantplan.search.problem import compile_problem
from quantplan.search.space import SearchError, SearchSpace, layer_type
from quantplan.search.synthetic import llama_block, synthetic_table

STORIES_BLOCK = llama_block(64, 172, 32)  # stories260K: K = 64 except down_proj (K = 172)


@pytest.fixture(scope="module")
def table() -> TableInfo:
    return synthetic_table(2, STORIES_BLOCK, seed=1)


def _pairs(problem, i: int) -> set[tuple[str, str]]:
    return {(str(problem.weights[w]), str(problem.acts[a])) for a, w in zip(*np.nonzero(problem.valid[i]),
                                                                            strict=True)}


def test_only_served_combinations(table: TableInfo) -> None:
    problem = compile_problem(table, SearchSpace(act_bits=None), Budget(avg_bits=16))
    for i, layer in enumerate(problem.layers):
        for w, a in _pairs(problem, i):
            scheme = WeightScheme.parse(w)
            assert scheme.bits in (4, 8, 16), "2/3-bit weights need the opt-in"
            assert scheme.bits != 8 or w == "w8", "w8 is symmetric per-channel (the W8A8 kernel)"
            assert scheme.bits != 16 or a == "a16"
            assert a not in ("a8-lae", "a8-smooth") or layer.feeder is not None, "equalization must fold"
            assert scheme.group_size(layer.shape[1]) <= layer.shape[1], "the group fits K"


def test_groups_share_activation_schemes(table: TableInfo) -> None:
    problem = compile_problem(table, SearchSpace(act_bits=8), Budget(avg_bits=16))
    keys = dict(zip(problem.group_keys, problem.groups, strict=True))
    assert [problem.names[i] for i in keys["model.layers.0.input_layernorm"]] == [
        f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert len(keys["model.layers.1.mlp.down_proj"]) == 1
    for members in problem.groups:
        acts = problem.valid[list(members)].any(axis=2)
        assert (acts == acts[0]).all()
    assert not problem.valid[:, problem.acts.index(ActScheme.A16)].any()


def test_weight_only_and_low_bits(table: TableInfo) -> None:
    weight_only = compile_problem(table, SearchSpace(act_bits=16), Budget(avg_bits=16))
    assert set(np.flatnonzero(weight_only.valid.any(axis=(0, 2)))) == {weight_only.acts.index(ActScheme.A16)}
    low = compile_problem(table, SearchSpace(act_bits=8, low_bits=True, symmetry="asym"), Budget(avg_bits=3))
    bits = {w.bits for w in low.weights}
    assert {2, 3, 4, 8} <= bits
    assert all(w.asymmetric for w in low.weights if w.bits < 8)


def test_skip_keeps_layers_unquantized_and_counts_them(table: TableInfo) -> None:
    space = SearchSpace(act_bits=8, skip=r"\.k_proj$")
    problem = compile_problem(table, space, Budget(avg_bits=16))
    k = problem.names.index("model.layers.0.self_attn.k_proj")
    assert _pairs(problem, k) == {("w16", "a16")}
    q = problem.names.index("model.layers.0.self_attn.q_proj")
    assert not any(a in ("a8-lae", "a8-smooth") for _, a in _pairs(problem, q)), "the norm also feeds k_proj"
    assert problem.params == sum(layer.params for layer in table.layers)


def test_layer_types() -> None:
    assert layer_type("model.layers.3.self_attn.q_proj") == "self_attn.q_proj"
    assert layer_type("transformer.h.11.mlp.c_fc") == "mlp.c_fc"
    assert layer_type("lm_head") == "lm_head"


def test_budget_limits_are_exact() -> None:
    assert Budget(avg_bits=4.25).limit(226_560) == 962_880
    assert Budget(megabytes=0.12).limit(1) == 120_000
    assert Budget(megabytes=1.0).size(9) == 2 and Budget(avg_bits=4).size(9) == 9


@pytest.mark.parametrize("bits, mb", [(None, None), (4.0, 1.0), (-1.0, None), (float("nan"), None), (None, 0.0)])
def test_bad_budgets(bits, mb) -> None:
    with pytest.raises(BudgetError, match="budget"):
        Budget(bits, mb)


def test_infeasible_budget_states_the_smallest_feasible(table: TableInfo) -> None:
    space = SearchSpace(act_bits=8)
    with pytest.raises(BudgetError) as info:
        compile_problem(table, space, Budget(avg_bits=3.0))
    message = str(info.value)
    need = float(re.search(r"--budget-bits to at least ([\d.]+)", message)[1])
    smallest = sum(min(weight_cost(WeightScheme(4), *l.shape).bits, weight_cost(WeightScheme(4, 64), *l.shape).bits)
                   for l in table.layers) / sum(l.params for l in table.layers)
    assert need == pytest.approx(smallest, abs=1e-3) and need >= smallest
    compile_problem(table, space, Budget(avg_bits=need))  # the suggested budget works
    with pytest.raises(BudgetError, match=r"--budget-mb to at least"):
        compile_problem(table, space, Budget(megabytes=1e-3))


@pytest.mark.parametrize("weights, error, match", [
    (("w5g7",), SchemeError, "unknown weight scheme"),
    (("w4g128", "nonsense"), SchemeError, "unknown weight scheme"),
    (("w2g64",), SchemeError, "--low-bits"),
    (("w8g64",), SchemeError, "not served"),
    (("w4G128",), SchemeError, "unknown weight scheme"),
    ((), SearchError, "empty"),
])
def test_unknown_or_unserved_schemes(weights, error, match) -> None:
    with pytest.raises(error, match=match):
        SearchSpace(weights=weights)


@pytest.mark.parametrize("kwargs, match", [
    ({"act_bits": 4}, "--act-bits"),
    ({"symmetry": "skew"}, "symmetry"),
    ({"max_dynamic_share": 1.5}, "--max-dynamic-share"),
    ({"skip": "("}, "--skip"),
])
def test_bad_knobs(kwargs, match) -> None:
    with pytest.raises(SearchError, match=match):
        SearchSpace(**kwargs)


def test_empty_and_mismatched_tables(table: TableInfo) -> None:
    space, budget = SearchSpace(), Budget(avg_bits=4.5)
    with pytest.raises(TableError, match="no layers"):
        compile_problem(TableInfo("k", {}, {}, {}, ()), space, budget)
    shapes = {layer.name: layer.shape for layer in table.layers}
    wrong = dict(shapes) | {"model.layers.0.mlp.down_proj": (64, 256)}
    with pytest.raises(TableError, match="does not match the model.*other shape"):
        compile_problem(table, space, budget, wrong)
    with pytest.raises(TableError, match="not in the table: extra.proj"):
        compile_problem(table, space, budget, shapes | {"extra.proj": (8, 8)})
    with pytest.raises(QuantPlanError, match="matches every layer"):
        compile_problem(table, SearchSpace(skip="."), budget)


def test_table_with_unknown_scheme_or_missing_reference(table: TableInfo) -> None:
    first = table.layers[0]
    bad = LayerSensitivity(first.name, first.shape, first.feeder, {**first.weight_cost, "w4g100": 1.0},
                           first.clip, first.act_cost, first.act_absmax)
    with pytest.raises(TableError, match="w4g100"):
        compile_problem(TableInfo("k", {}, {}, {}, (bad, *table.layers[1:])), SearchSpace(), Budget(avg_bits=5))
    no_ref = LayerSensitivity(first.name, first.shape, first.feeder, {"w4": 1.0}, {}, {"a8-static": 1.0}, 1.0)
    with pytest.raises(TableError, match="w16/a16"):
        compile_problem(TableInfo("k", {}, {}, {}, (no_ref,)), SearchSpace(), Budget(avg_bits=5))
    only_w2 = LayerSensitivity(first.name, first.shape, None, {"w16": 0.0, "w2": 1.0}, {}, {"a16": 0.0}, 1.0)
    with pytest.raises(TableError, match="no searched scheme"):
        compile_problem(TableInfo("k", {}, {}, {}, (only_w2,)), SearchSpace(act_bits=8), Budget(avg_bits=5))
