"""Schemes are objects inside search: names are parsed once, when the problem is compiled, and written only to
plan JSON, the study's user attributes and Optuna's categorical choices (which stay the names stored studies hold)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest

from quantplan.quant.schemes import ActScheme, LayerScheme, WeightScheme
from quantplan.search import knapsack, recipes, variants
from quantplan.search.budget import Budget
from quantplan.search.problem import compile_problem
from quantplan.search.refine import refine
from quantplan.search.space import SearchSpace
from quantplan.search.study import StudySettings, decode, encode, run_search
from quantplan.search.synthetic import llama_block, synthetic_table
from quantplan.search.trials import SPACES

STORIES_BLOCK = llama_block(64, 172, 32)


def _count_parses(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count every call of the three scheme parsers from now on (each still parses)."""
    calls: Counter = Counter()
    for cls in (LayerScheme, WeightScheme, ActScheme):
        parse = cls.parse  # bound to the class

        def counting(_cls, text, _parse=parse, _name=cls.__name__):
            calls[_name] += 1
            return _parse(text)

        monkeypatch.setattr(cls, "parse", classmethod(counting))
    return calls


def _problem():
    table = synthetic_table(3, STORIES_BLOCK, seed=4)
    return compile_problem(table, SearchSpace(act_bits=8, max_dynamic_share=0.5), Budget(avg_bits=4.5))


def test_search_parses_no_scheme_after_compiling(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _count_parses(monkeypatch)
    problem = _problem()
    assert sum(calls.values()) > 0, "compiling reads the table's scheme names: the counter must see it"
    calls.clear()

    best = problem.candidate(knapsack.solve(problem).choice, "knapsack", recipe="knapsack")
    refs = recipes.baselines(problem)
    found = variants.variants(problem)
    descent = refine(problem, best, best.predicted_loss, lambda cs: [c.predicted_loss for c in cs], max_evals=6,
                     batch=3)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for kind in SPACES:
        trial_space = SPACES[kind](problem)
        for _ in range(5):
            trial = study.ask()
            problem.candidate(trial_space.suggest(trial), "t")
            study.tell(trial, 0.0)
    url = f"sqlite:///{tmp_path / 'q.db'}"
    for kind in SPACES:
        run_search(problem, StudySettings(trials=15, space=kind, storage=url, name=kind))
        resumed = run_search(problem, StudySettings(trials=20, space=kind, storage=url, name=kind))  # decodes
        assert resumed.new_trials == 5 and resumed.pareto
    assert calls == Counter(), f"scheme names parsed after compile_problem: {dict(calls)}"
    assert refs and found and descent.evaluations == 6  # the paths above ran


def test_candidates_carry_objects_and_write_names() -> None:
    problem = _problem()
    best = problem.candidate(knapsack.solve(problem).choice, "knapsack", recipe="knapsack", trial=3)
    assert all(isinstance(s, LayerScheme) for s in best.schemes)
    assert all(s is problem.choices[k] for s, k in zip(best.schemes, knapsack.solve(problem).choice, strict=True))
    attrs = encode(best)
    names = attrs["plan"]["schemes"]
    assert names == sorted({str(s) for s in best.schemes}) and all(isinstance(n, str) for n in names)
    assert [names[int(i)] for i in attrs["plan"]["layout"].split(",")] == [str(s) for s in best.schemes]
    json.dumps(attrs)  # what Optuna stores must be JSON
    trial = optuna.trial.create_trial(values=[best.predicted_loss, best.bytes], user_attrs=attrs)
    again = decode(problem, trial)
    assert again.schemes == best.schemes and again.predicted_loss == pytest.approx(best.predicted_loss)
    assert again.in_space and again.act_bits == 8
    layers = problem.plan(best).to_dict()["layers"]
    assert {spec["scheme"] if isinstance(spec, dict) else spec for spec in layers.values()} <= set(names)


def test_a_stored_name_outside_the_space_still_decodes() -> None:
    """A plan stored by another space (a baseline's w4g128 under --weights w4,w8) is parsed at the boundary."""
    problem = compile_problem(synthetic_table(2, STORIES_BLOCK), SearchSpace(act_bits=8, weights=("w4", "w8")),
                              Budget(avg_bits=16))
    down = np.array([n.endswith("down_proj") for n in problem.names])
    baseline = recipes.baseline(problem, "w4g128:a8-static")
    assert WeightScheme(4, 128) not in problem.weights and not baseline.in_space
    again = decode(problem, optuna.trial.create_trial(values=[0.0, 0.0], user_attrs=encode(baseline)))
    assert again.schemes == baseline.schemes and not again.in_space
    assert {str(s) for s, d in zip(again.schemes, down, strict=True) if d} == {"w4g128:a8-static"}


def test_optuna_choices_stay_scheme_names() -> None:
    """Stored studies hold these parameters: a resumed study needs the same distributions."""
    problem = _problem()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    SPACES["per-layer"](problem).suggest(trial)
    dist = trial.distributions
    assert dist["a:model.layers.0.input_layernorm"].choices == ("a8-static", "a8-dynamic", "a8-lae", "a8-smooth")
    assert dist["a:model.layers.0.mlp.down_proj"].choices == ("a8-static", "a8-dynamic")
    assert dist["w:model.layers.0.self_attn.q_proj"].choices == ("w4g32", "w4g32a", "w4g64", "w4g64a", "w4", "w4a",
                                                                 "w8")
    assert all(type(c) is str for d in dist.values() for c in d.choices)
    trial = study.ask()
    SPACES["structured"](problem).suggest(trial)
    assert trial.distributions["a:input_layernorm"].choices == ("auto", "a8-static", "a8-dynamic", "a8-lae",
                                                                "a8-smooth")
    assert trial.distributions["w:mlp.down_proj"].choices == ("auto", "w4", "w8")
    assert all(type(c) is str for d in trial.distributions.values() if hasattr(d, "choices") for c in d.choices)
