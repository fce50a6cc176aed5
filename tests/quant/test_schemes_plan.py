"""Scheme notation and Plan JSON: parsing, canonical form, resolution, exact cost model."""

from __future__ import annotations

import json

import pytest

from quantplan.errors import PlanError, QuantPlanError, SchemeError
from quantplan.quant.plan import Plan, weight_cost
from quantplan.quant.schemes import ActScheme, LayerScheme, WeightScheme


@pytest.mark.parametrize("text", ["w4g128", "w3g64", "w4", "w8", "w16", "w4g128a", "w2g32", "w8a", "w4g32a"])
def test_weight_scheme_round_trips(text: str) -> None:
    assert str(WeightScheme.parse(text)) == text


def test_weight_scheme_fields() -> None:
    s = WeightScheme.parse("w4g128a")
    assert (s.bits, s.group, s.asymmetric, s.qmax) == (4, 128, True, 15)
    assert WeightScheme.parse("w4").qmax == 7 and WeightScheme.parse("w4").group == -1


@pytest.mark.parametrize("bad", ["w5g128", "w4g100", "w16g128", "w16a", "x4", "w4g", "", "4g128", "w4g128b"])
def test_bad_weight_scheme_is_rejected(bad: str) -> None:
    with pytest.raises(SchemeError):
        WeightScheme.parse(bad)


def test_layer_scheme() -> None:
    s = LayerScheme.parse("w4g128:a8-dynamic")
    assert s.act is ActScheme.DYNAMIC and str(s) == "w4g128:a8-dynamic"
    assert str(LayerScheme.parse("w4g64")) == "w4g64:a16"
    for act in ActScheme:
        assert LayerScheme.parse(f"w8:{act.value}").act is act
    with pytest.raises(SchemeError, match="a8-lae"):
        LayerScheme.parse("w4g128:a4-static")


def _plan_dict() -> dict:
    return {
        "format": "quantplan.plan",
        "version": 1,
        "model": {"name": "tiny", "revision": None, "fingerprint": "abc"},
        "default": "w4g128:a8-dynamic",
        "layers": {
            "model.layers.0.mlp.down_proj": "w8:a8-static",
            "re:.*\\.self_attn\\.[qkv]_proj": {"scheme": "w4g64:a8-lae", "clip": 0.9},
            "re:.*\\.mlp\\.(gate|up)_proj": {"scheme": "w4g32a:a8-smooth", "alpha": 0.7},
            "re:.*down_proj": "w16:a16",
        },
        "meta": {"source": "test"},
    }


def test_plan_json_round_trip(tmp_path) -> None:
    plan = Plan.from_dict(_plan_dict())
    assert Plan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json()) == _plan_dict()
    path = plan.save(tmp_path / "plan.json")
    assert Plan.load(path) == plan
    assert not [p for p in tmp_path.iterdir() if p.name != "plan.json"]  # no temporary left behind


def test_plan_resolution_order() -> None:
    plan = Plan.from_dict(_plan_dict())
    assert str(plan.resolve("model.layers.0.mlp.down_proj").scheme) == "w8:a8-static"  # exact beats pattern
    assert str(plan.resolve("model.layers.1.mlp.down_proj").scheme) == "w16:a16"
    spec = plan.resolve("model.layers.3.self_attn.k_proj")
    assert str(spec.scheme) == "w4g64:a8-lae" and spec.clip == 0.9
    assert plan.resolve("model.layers.3.mlp.up_proj").alpha == 0.7
    assert str(plan.resolve("model.layers.3.self_attn.o_proj").scheme) == "w4g128:a8-dynamic"  # default
    assert plan.resolve("xmodel.layers.3.self_attn.q_proj_extra").scheme == plan.default.scheme  # fullmatch


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(extra=1), "unknown key"),
        (lambda d: d.update(version=2), "unsupported plan version"),
        (lambda d: d.update(format="other"), "not a QuantPlan plan"),
        (lambda d: d["layers"].update({"a": "w4g100"}), "group size 100"),
        (lambda d: d["layers"].update({"a": {"scheme": "w4", "clp": 1}}), "unknown key"),
        (lambda d: d["layers"].update({"a": {"scheme": "w4", "clip": 1.5}}), "clip ratio"),
        (lambda d: d["layers"].update({"re:(": "w4"}), "invalid regular expression"),
        (lambda d: d["model"].update(sha="x"), "unknown key"),
        (lambda d: d.update(default="w4:a9"), "unknown activation scheme"),
    ],
)
def test_malformed_plan_is_rejected(mutate, message: str) -> None:
    data = _plan_dict()
    mutate(data)
    with pytest.raises(QuantPlanError, match=message):
        Plan.from_dict(data)


def test_plan_load_errors(tmp_path) -> None:
    with pytest.raises(PlanError, match="cannot read plan file"):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(bad)


def test_cost_matches_hand_count() -> None:
    # w4g128 on [256, 512]: 4 bits per weight + one 16-bit scale per 128 weights = 4.125 bits.
    c = weight_cost(WeightScheme.parse("w4g128"), 256, 512)
    assert c.bits == 256 * 512 * 4 + 256 * 4 * 16 and c.avg_bits == 4.125
    assert c.bytes == 256 * 512 // 2 + 256 * 4 * 2
    # Asymmetric adds a 4-bit zero-point per group: 4 + 20/128.
    assert weight_cost(WeightScheme.parse("w4g128a"), 8, 128).avg_bits == 4 + 20 / 128
    # K = 172 with g64 pads to 192 (3 groups): codes 8*192*3 bits + scales 8*3*16 bits.
    c = weight_cost(WeightScheme.parse("w3g64"), 8, 172)
    assert c.bits == 8 * 192 * 3 + 8 * 3 * 16 and c.bytes == (8 * 192 * 3 + 8 * 3 * 16 + 7) // 8
    # Per-channel: one scale per row; w16: 16 bits flat.
    assert weight_cost(WeightScheme.parse("w8"), 10, 172).bits == 10 * 172 * 8 + 10 * 16
    assert weight_cost(WeightScheme.parse("w16"), 10, 172).bits == 10 * 172 * 16


def test_plan_cost_over_layers() -> None:
    plan = Plan.from_dict(_plan_dict())
    shapes = {"model.layers.0.mlp.down_proj": (64, 128), "model.layers.0.self_attn.q_proj": (64, 128)}
    cost = plan.cost(shapes)
    w8 = 64 * 128 * 8 + 64 * 16
    w4g64 = 64 * 128 * 4 + 64 * 2 * 16
    assert cost.params == 2 * 64 * 128
    assert cost.bytes == (w8 + w4g64) // 8
    assert cost.avg_bits == pytest.approx((w8 + w4g64) / (2 * 64 * 128))


def test_group_larger_than_k_is_an_error() -> None:
    with pytest.raises(PlanError, match="larger than in_features K=64"):
        Plan.uniform("w4g128").cost({"layer": (32, 64)})


def test_act_schemes_survive_ray_pickling() -> None:
    """Ray ships arguments with cloudpickle: every registered activation scheme comes back as the same object, in
    a payload that refers to the class (a by-value copy of the registry's lookup would fail to unpickle)."""
    import pickle

    from ray import cloudpickle

    for act in ActScheme:
        payload = cloudpickle.dumps(act)
        assert pickle.loads(payload) is act
        assert len(payload) < 200, f"{act} pickled by value ({len(payload)} bytes)"
    layer = LayerScheme.parse("w4g128:a8-lae")
    assert pickle.loads(cloudpickle.dumps(layer)).act is ActScheme.LAE
