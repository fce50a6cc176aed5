"""Baselines (FPTQ's rule, uniform schemes) and the trial spaces' mapping of parameters to plans."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantplan.quant.costs import LayerSensitivity, TableInfo
from quantplan.quant.schemes import LayerScheme
from quantplan.search import recipes
from quantplan.search.budget import Budget, BudgetError
from quantplan.search.problem import compile_problem
from quantplan.search.space import SearchSpace
from quantplan.search.synthetic import llama_block, synthetic_table
from quantplan.search.trials import SPACES
from tests.search.tables import small_tables

STORIES_BLOCK = llama_block(64, 172, 32)


def _with_absmax(table: TableInfo, values: dict[str, float]) -> TableInfo:
    layers = []
    for layer in table.layers:
        v = next((x for suffix, x in values.items() if layer.name.endswith(suffix)), layer.act_absmax)
        layers.append(LayerSensitivity(layer.name, layer.shape, layer.feeder, layer.weight_cost, layer.clip,
                                       layer.act_cost, v))
    return TableInfo(table.key, table.model, {}, {}, tuple(layers))


def test_fptq_rule() -> None:
    table = _with_absmax(synthetic_table(1, STORIES_BLOCK), {
        "q_proj": 3.0, "k_proj": 40.0, "v_proj": 3.0,  # one member needs LAE: the whole group takes it
        "o_proj": 40.0,  # between v0 and v1 but no norm to fold into: a8-dynamic
        "gate_proj": 10.0, "up_proj": 10.0,  # <= v0: static
        "down_proj": 2000.0,  # > v1: dynamic
    })
    problem = compile_problem(table, SearchSpace(act_bits=8), Budget(avg_bits=16))
    schemes = dict(zip(problem.names, recipes.fptq(problem), strict=True))
    acts = {name.rsplit(".", 1)[1]: str(s.act) for name, s in schemes.items()}
    assert acts == {"q_proj": "a8-lae", "k_proj": "a8-lae", "v_proj": "a8-lae", "o_proj": "a8-dynamic",
                    "gate_proj": "a8-static", "up_proj": "a8-static", "down_proj": "a8-dynamic"}
    weights = {name.rsplit(".", 1)[1]: str(s.weight) for name, s in schemes.items()}
    assert weights["q_proj"] == "w4" and weights["down_proj"] == "w4g128", "w4g128 only where the group fits K"


def test_uniform_baselines_and_their_place_in_the_space() -> None:
    problem = compile_problem(synthetic_table(2, STORIES_BLOCK), SearchSpace(act_bits=8), Budget(avg_bits=4.25))
    found = {c.label: c for c in recipes.baselines(problem)}
    assert set(found) == {"w4g128:a8-static", "w4g128:a16", "w8:a8-static", "fptq"}
    assert not found["w4g128:a16"].in_space and found["w4g128:a8-static"].in_space
    assert found["w8:a8-static"].avg_bits == pytest.approx((8 * 64 + 16) / 64 * 0 + found["w8:a8-static"].bits
                                                           / problem.params)
    # stories260K-shaped: K = 64 layers take per-channel w4 (4.25 bits), down_proj w4g128 pads 172 to 256
    down = [i for i, n in enumerate(problem.names) if n.endswith("down_proj")]
    assert all(found["w4g128:a8-static"].schemes[i] == LayerScheme.parse("w4g128:a8-static") for i in down)
    assert not found["w4g128:a8-static"].under_budget  # 4.709 bits: the padding costs


def _random_trials(problem, kind: str, n: int, seed: int) -> list[np.ndarray]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial_space = SPACES[kind](problem)
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(trial_space.suggest(trial))
        study.tell(trial, 0.0)
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=small_tables(8), bits=st.floats(3.5, 9.0), kind=st.sampled_from(sorted(SPACES)),
       share=st.one_of(st.none(), st.floats(0, 1)), seed=st.integers(0, 100))
def test_trials_never_exceed_the_budget(table, bits, kind, share, seed) -> None:
    try:
        problem = compile_problem(table, SearchSpace(act_bits=8, max_dynamic_share=share), Budget(avg_bits=bits))
    except BudgetError:
        return
    for choice in _random_trials(problem, kind, 8, seed):
        assert problem.take(problem.valid, choice).all()
        assert problem.total_size(choice) <= problem.limit
        if share is not None:
            assert problem.dynamic_layers(choice) <= problem.dynamic_cap
        for members in problem.groups:
            assert len(set((choice[list(members)] // problem.shape[2]).tolist())) == 1, "one act per group"


def test_structured_space_is_low_dimensional_and_spans_sizes() -> None:
    problem = compile_problem(synthetic_table(32), SearchSpace(act_bits=8), Budget(avg_bits=4.25))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial_space = SPACES["structured"](problem)
    sizes = set()
    for _ in range(30):
        trial = study.ask()
        sizes.add(problem.total_size(trial_space.suggest(trial)))
        study.tell(trial, 0.0)
    assert len(study.trials[0].params) <= 16
    assert {"log_lambda", "act_rule", "v0", "v1", "w:mlp.down_proj", "a:input_layernorm"} <= set(
        study.trials[0].params)
    assert len(sizes) > 10 and max(sizes) <= problem.limit


def test_act_override_applies_to_the_group_type() -> None:
    problem = compile_problem(synthetic_table(2, STORIES_BLOCK), SearchSpace(act_bits=8), Budget(avg_bits=5))
    structured = SPACES["structured"](problem)
    params = {"log_lambda": 0.0, "act_rule": "proxy", "v0": 15.0, "v1": 150.0}
    params |= {f"w:{t}": "auto" for t in structured.weight_masks} | {f"a:{g}": "auto" for g in structured.act_masks}
    params |= {"a:input_layernorm": "a8-smooth", "a:mlp.down_proj": "a8-static"}
    choice = structured.suggest(optuna.trial.FixedTrial(params))
    acts = {n: str(problem.acts[a]) for n, a in zip(problem.names, choice // problem.shape[2], strict=True)}
    assert all(a == "a8-smooth" for n, a in acts.items() if n.split(".")[-1] in ("q_proj", "k_proj", "v_proj"))
    assert all(a == "a8-static" for n, a in acts.items() if n.endswith("down_proj"))
