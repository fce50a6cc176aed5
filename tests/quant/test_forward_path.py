"""Acceptance 5: a forward does no validation, re-packing or kernel choice; all of it happens once, at build."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

import quantplan.quant as quant
from quantplan.quant import packing, qlinear
from quantplan.quant.act_handlers import ActHandler
from quantplan.quant.kernels import dispatch
from quantplan.quant.plan import LayerSpec, Plan
from quantplan.quant.qlinear import QuantLinear
from quantplan.quant.schemes import LayerScheme
from tests.quant.test_apply import VOCAB
from tests.quant.test_apply import _model as tiny_model

FORWARDS = 5
WATCHED = (  # (owner, attribute): what building a layer calls and a forward must not
    (packing, "_validate"),  # PackedWeight.__post_init__
    (packing, "pack_weight"),
    (qlinear, "pack_weight"),
    (packing, "unpack_fields"),  # unpacking the codes (the torch path's prepared layout)
    (dispatch, "select_kernel"),  # quantized_linear's, when no kernel is given
    (qlinear, "select_kernel"),  # QuantLinear's, at build
    (ActHandler, "check_params"),
)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    counts: Counter[str] = Counter()
    for owner, name in WATCHED:
        original = getattr(owner, name)

        def counted(*args, _original=original, _name=name, **kwargs):  # noqa: ANN002, ANN003, ANN202
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    return counts


@pytest.mark.parametrize("scheme", ["w4g32:a8-dynamic", "w8:a8-static", "w4g64a:a16", "w4g32:a8-lae"])
def test_quant_linear_forwards_reuse_what_the_build_made(calls: Counter[str], scheme: str) -> None:
    spec = LayerSpec(LayerScheme.parse(scheme))
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    pre = torch.rand(64) + 0.5 if spec.scheme.act.equalized else None
    layer = QuantLinear.from_float(weight, None, spec, act_scale=torch.tensor(0.05), pre_scale=pre)
    assert calls["pack_weight"] == 1 and calls["select_kernel"] == 1 and calls["_validate"] == 1
    x = torch.randn(3, 64)
    first = layer(x)  # prepares the torch path's weight layout, once
    calls.clear()
    for _ in range(FORWARDS):
        torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
    assert sum(calls.values()) == 0, dict(calls)


def test_a_moved_layer_rewraps_its_buffers_once(calls: Counter[str]) -> None:
    layer = QuantLinear.from_float(torch.randn(32, 64), None, LayerSpec(LayerScheme.parse("w4g32:a8-dynamic")))
    x = torch.randn(2, 64)
    y = layer(x)
    calls.clear()
    layer.to("cpu")  # Module._apply replaces the buffers: the packed weight is re-wrapped, once
    assert calls["_validate"] == 1 and layer.packed.codes is layer.codes
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    calls.clear()
    layer(x)
    assert sum(calls.values()) == 0, dict(calls)


def test_an_applied_model_forwards_without_rebuilding(calls: Counter[str], tmp_path: Path) -> None:
    model = tiny_model("llama")
    tokens = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    plan = Plan.from_layers({"re:.*self_attn\\.[qkv]_proj": "w4g32:a8-lae", "re:.*down_proj": "w8:a8-static"},
                            default=Plan.uniform("w4g32:a8-dynamic").default)
    quant.materialize(model, plan, tokens, tmp_path / "a")
    calls.clear()
    quant.load_quantized(model, tmp_path / "a")
    layers = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert layers == 14 and calls["select_kernel"] == layers and calls["_validate"] == layers, dict(calls)
    with torch.no_grad():
        first = model(input_ids=tokens).logits
        calls.clear()
        for _ in range(FORWARDS):
            torch.testing.assert_close(model(input_ids=tokens).logits, first, rtol=0, atol=0)
    assert sum(calls.values()) == 0, dict(calls)
