"""Acceptance 3: an activation strategy defined in this module alone runs through fake-quant, the sensitivity pass,
the search space and the knapsack, and materialize/apply: registering it is all it takes.

The strategy, `a8-dynasym`, quantizes each token to 8 bits asymmetrically: its own range [min, max] (widened to
hold 0) in 255 steps with a zero-point, where the built-in `a8-dynamic` spends 254 steps on [-max|x|, max|x|].
For the int8 kernels its codes are shifted into int8 (`q - 128`), and the shift comes back as a per-token offset
the GEMM adds times the weight's row sums.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import quantplan.quant as quant
from quantplan.quant import artifact as art
from quantplan.quant.act_handlers import (
    ActHandler,
    ActParams,
    QuantizedActs,
    act_handler,
    register_act_handler,
    unregister_act_handler,
)
from quantplan.quant.apply import apply_plan, quantizable_modules
from quantplan.quant.costs import TableInfo
from quantplan.quant.modules import FakeQuantLinear, linear_weight
from quantplan.quant.plan import Plan
from quantplan.quant.qlinear import QuantLinear
from quantplan.quant.schemes import ActScheme, LayerScheme, WeightScheme, register_act_scheme, unregister_act_scheme
from quantplan.search.budget import Budget
from quantplan.search.knapsack import solve
from quantplan.search.problem import compile_problem
from quantplan.search.space import ACTS, SearchSpace
from quantplan.workers.sensitivity import (
    ACT_SCHEMES,
    act_quant_error,
    act_quant_params,
    build_table,
    sensitivity_pass,
    weight_costs,
)
from tests.quant.test_apply import VOCAB
from tests.quant.test_apply import _model as tiny_model

NAME = "a8-dynasym"
WEIGHTS = (WeightScheme.parse("w4g32"), WeightScheme.parse("w8"))


def _asymmetric(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes in [0, 255], scale [..., 1], zero-point [..., 1]) of each token of x, in float32."""
    x = x.float()
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    return (torch.round(x / scale) + zero).clamp(0, 255), scale, zero


class DynamicAsymmetric(ActHandler):
    """Per-token asymmetric 8-bit activations: nothing to calibrate, nothing to store."""

    offsets = True

    def fake_quantize(self, x: torch.Tensor, params: ActParams) -> torch.Tensor:
        q, scale, zero = _asymmetric(x)
        return ((q - zero) * scale).to(x.dtype)

    def quantize(
        self, x: torch.Tensor, params: ActParams, inv_pre_scale: torch.Tensor | None, backend: str | None
    ) -> QuantizedActs:
        q, scale, zero = _asymmetric(x if inv_pre_scale is None else x * inv_pre_scale)
        # x ~ (q - zero) * scale = (q - 128) * scale + (128 - zero) * scale
        return QuantizedActs((q - 128).to(torch.int8), scale.reshape(-1), ((128 - zero) * scale).reshape(-1))


@pytest.fixture
def dynasym() -> Iterator[ActScheme]:
    scheme = register_act_scheme(NAME, per_token=True, summary="int8 per token, asymmetric (a zero-point per token)")
    register_act_handler(scheme)(DynamicAsymmetric)
    yield scheme
    unregister_act_handler(scheme)
    unregister_act_scheme(scheme)
    assert NAME not in ACTS and NAME not in ActScheme, "other tests see the built-in strategies only"


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(2, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


def test_the_registered_strategy_is_a_scheme_like_the_built_in_ones(dynasym: ActScheme) -> None:
    assert ActScheme.parse(NAME) is dynasym and ActScheme(NAME) is dynasym and str(dynasym) == NAME
    assert (dynasym.bits, dynasym.per_token, dynasym.needs_calibration, dynasym.equalized) == (8, True, False, False)
    scheme = LayerScheme.parse(f"w4g32:{NAME}")
    assert scheme.act is dynasym and str(scheme) == f"w4g32:{NAME}"
    plan = Plan.uniform(f"w4g32:{NAME}")
    assert Plan.from_json(plan.to_json()) == plan and f'"w4g32:{NAME}"' in plan.to_json()
    assert list(ActScheme)[-1] is dynasym and ACT_SCHEMES[-1] is dynasym and ACTS[-1] == NAME


def test_fake_quant_simulates_the_strategy(dynasym: ActScheme, tokens: torch.Tensor) -> None:
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    report = apply_plan(model, Plan.uniform(f"w8:{NAME}"))  # no calibration: the strategy needs none
    layer = model.get_submodule(report.replaced[0])
    assert isinstance(layer, FakeQuantLinear) and isinstance(layer.handler, DynamicAsymmetric)
    assert all(s.scheme.act is dynasym for s in report.specs.values())
    x = torch.randn(5, layer.in_features) + 2.0  # an off-centre range: where a zero-point pays
    expected = torch.nn.functional.linear(act_handler(dynasym).fake_quantize(x, {}), layer.weight)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    symmetric = act_handler(ActScheme.DYNAMIC).fake_quantize(x, {})
    asym_err = (act_handler(dynasym).fake_quantize(x, {}) - x).pow(2).sum()
    assert asym_err < 0.5 * (symmetric - x).pow(2).sum(), "the zero-point halves (at least) the step on [1, 3]"
    with torch.no_grad():
        y, y_ref = model(input_ids=tokens).logits, reference(input_ids=tokens).logits
    assert 0 < (y - y_ref).abs().max() < 0.05 * y_ref.abs().max()


def _table(model: torch.nn.Module, tokens: torch.Tensor) -> TableInfo:
    stats, sums = sensitivity_pass(model, tokens)
    modules = quantizable_modules(model)
    costs = {n: weight_costs(linear_weight(m), sums.fisher[n] / sums.batches, WEIGHTS) for n, m in modules.items()}
    return build_table(model, stats, sums, costs, key="test", model={"name": "tiny"}, calibration={})


def test_sensitivity_search_and_knapsack_offer_the_strategy(dynasym: ActScheme, tokens: torch.Tensor) -> None:
    model = tiny_model("llama")
    table = _table(model, tokens)
    for layer in table.layers:
        assert layer.act_cost[NAME] > 0 and len(layer.act_cost) == 1 + len(ACT_SCHEMES)
    # the same costs as the squared error the handler makes, weighted: finer steps, smaller predicted loss
    assert sum(la.act_cost[NAME] for la in table.layers) < sum(la.act_cost["a8-dynamic"] for la in table.layers)
    x = torch.randn(3, 64) + 1.0
    params = act_quant_params(x.abs().amax(0), torch.ones(64))
    assert params[dynasym].s is None and not params[dynasym].params
    torch.testing.assert_close(act_quant_error(x, dynasym, params), x - act_handler(dynasym).fake_quantize(x, {}))

    space = SearchSpace(act_bits=8, symmetry="sym", weights=tuple(str(w) for w in WEIGHTS))
    problem = compile_problem(table, space, Budget(avg_bits=16))
    a, weights = ACTS.index(NAME), [str(w) for w in problem.weights]
    served = [weights.index(str(w)) for w in WEIGHTS]
    assert problem.valid[:, a, served].all(), "every layer may take the new strategy with every served weight"
    assert not problem.valid[:, a, weights.index("w16")].any(), "w16 runs with a16 only"
    cheap = dataclasses.replace(table, layers=tuple(  # make it the clear winner: the knapsack must pick it
        dataclasses.replace(la, act_cost={**la.act_cost, NAME: 0.0}) for la in table.layers))
    problem = compile_problem(cheap, space, Budget(avg_bits=6))
    schemes = [str(s) for s in problem.schemes(solve(problem).choice)]
    assert all(s.endswith(f":{NAME}") for s in schemes), schemes


def test_materialize_and_load_run_the_strategy_on_the_kernels(
    dynasym: ActScheme, tokens: torch.Tensor, tmp_path: Path
) -> None:
    model = tiny_model("llama")
    plan = Plan.from_layers({"re:.*down_proj": f"w8:{NAME}"}, default=Plan.uniform(f"w4g32:{NAME}").default)
    simulated = copy.deepcopy(model)
    apply_plan(simulated, plan)
    info = art.materialize(model, plan, None, tmp_path / "a")
    assert set(info.layers.values()) == {f"w4g32:{NAME}", f"w8:{NAME}"}
    quant.load_quantized(model, tmp_path / "a")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert {m.kernel.name for m in layers} == {"w4a8", "w8a8"} and all(m.scheme.act is dynasym for m in layers)
    with torch.no_grad():
        y, y_sim = model(input_ids=tokens).logits, simulated(input_ids=tokens).logits
    assert (y - y_sim).abs().max() <= 1e-3 * y_sim.abs().max()


def test_a_registered_strategy_is_part_of_the_table_key(tokens: torch.Tensor) -> None:
    """A table computed while a strategy is registered has its cost column: it must not be served from (or to) the
    cache of a table computed without it. With the built-in strategies only, the key is the one it always was."""
    from quantplan.workers.data import CalibrationSet
    from quantplan.workers.pipeline import table_identity

    model = tiny_model("llama")
    calibration = CalibrationSet("text:x.txt", "train", tokens.shape[0], tokens.shape[1], 0, tokens.long())
    key, _, estimator = table_identity(model, calibration)
    assert "acts" not in estimator
    scheme = register_act_scheme(NAME, per_token=True, summary="registered for the key test only")
    try:
        with_new, _, estimator = table_identity(model, calibration)
    finally:
        unregister_act_scheme(scheme)
    assert with_new != key and NAME in estimator["acts"]
    assert table_identity(model, calibration)[0] == key
