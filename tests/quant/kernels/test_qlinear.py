"""QuantLinear from packed weights against the FakeQuantLinear simulation (acceptance 2), on both backends."""

from __future__ import annotations

import pytest
import torch

from quantplan.quant.kernels.runtime import KernelInputError, UnsupportedSchemeError
from quantplan.quant.modules import FakeQuantLinear
from quantplan.quant.plan import LayerSpec
from quantplan.quant.qlinear import QuantLinear
from quantplan.quant.quantizers import static_scale_from_absmax
from quantplan.quant.schemes import LayerScheme
from tests.quant.kernels.reference import TOL, rel_err, seeded

N, K = 40, 200

CASES = [
    "w4g128:a8-dynamic", "w4g64a:a8-static", "w4g32:a8-lae", "w4a:a8-smooth", "w4:a8-dynamic", "w8:a8-dynamic",
    "w8:a8-static", "w8g64:a8-dynamic", "w2g32a:a8-dynamic", "w4g128a:a16", "w4:a16", "w8g32a:a16",
]


def layer_inputs(scheme: str, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """Weight, bias, input, and the calibrated pieces the scheme needs (pre-scale for equalized, static scale)."""
    spec = LayerSpec(LayerScheme.parse(scheme), clip=0.9)
    w = torch.randn(N, K, generator=gen) * (0.5 + torch.rand(N, 1, generator=gen))
    x = torch.randn(2, 5, K, generator=gen) * (0.2 + 4 * torch.rand(K, generator=gen))
    pre = 0.5 + torch.rand(K, generator=gen) if spec.scheme.act.equalized else None
    act_scale = None
    if spec.scheme.act.needs_calibration:
        act_scale = static_scale_from_absmax((x if pre is None else x / pre).abs().max() * 0.8)  # some clipping
    return {"weight": w.to(dtype), "bias": torch.randn(N, generator=gen).to(dtype), "x": x.to(dtype),
            "spec": spec, "act_scale": act_scale, "pre_scale": pre}


def both(case: dict, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    kw = {"act_scale": case["act_scale"], "pre_scale": case["pre_scale"]}
    fake = FakeQuantLinear(case["weight"], case["bias"], case["spec"], **kw)
    real = QuantLinear.from_float(case["weight"], case["bias"], case["spec"], backend=backend, **kw)
    with torch.no_grad():
        return real(case["x"]), fake(case["x"])


@pytest.mark.parametrize("scheme", CASES)
def test_matches_fake_quant_simulation(backend: str, scheme: str) -> None:
    y, y_sim = both(layer_inputs(scheme, torch.float32, seeded("sim", scheme)), backend)
    assert y.shape == y_sim.shape == (2, 5, N) and y.dtype == torch.float32
    assert rel_err(y, y_sim) <= TOL


@pytest.mark.parametrize("scheme", CASES)
def test_torch_path_matches_triton_path(scheme: str) -> None:
    pytest.importorskip("triton")
    case = layer_inputs(scheme, torch.float32, seeded("paths", scheme))
    kw = {"act_scale": case["act_scale"], "pre_scale": case["pre_scale"]}
    triton = QuantLinear.from_float(case["weight"], case["bias"], case["spec"], backend="triton", **kw)
    torch_path = QuantLinear.from_float(case["weight"], case["bias"], case["spec"], backend="torch", **kw)
    with torch.no_grad():
        assert rel_err(triton(case["x"]), torch_path(case["x"])) <= TOL


@pytest.mark.parametrize("scheme", ["w4g128:a8-dynamic", "w8:a8-lae", "w4g64a:a16"])
def test_matches_fp16_simulation_to_fp16_rounding(backend: str, scheme: str) -> None:
    """In fp16 the simulation rounds dequantized activations and weights to fp16; the kernels stay exact."""
    y, y_sim = both(layer_inputs(scheme, torch.float16, seeded("sim16", scheme)), backend)
    assert y.dtype == torch.float16 and rel_err(y, y_sim) <= 2e-3


def test_state_dict_round_trip_refreshes_the_cpu_cache() -> None:
    a = layer_inputs("w4g32a:a8-dynamic", torch.float32, seeded("sd-a"))
    b = layer_inputs("w4g32a:a8-dynamic", torch.float32, seeded("sd-b"))
    qa = QuantLinear.from_float(a["weight"], a["bias"], a["spec"])
    qb = QuantLinear.from_float(b["weight"], b["bias"], b["spec"])
    with torch.no_grad():
        want = qa(a["x"])
        qb(a["x"])  # fills qb's unpacked-weight cache with b's codes
        qb.load_state_dict(qa.state_dict())
        assert torch.equal(qb(a["x"]), want)
    assert set(qa.state_dict()) == {"codes", "scales", "zeros", "bias"}


def test_build_errors_are_raised_early() -> None:
    case = layer_inputs("w4g64:a8-static", torch.float32, seeded("errors"))
    with pytest.raises(KernelInputError, match="calibrated activation scale"):
        QuantLinear.from_float(case["weight"], None, case["spec"])
    with pytest.raises(UnsupportedSchemeError, match="no packed format"):
        QuantLinear.from_float(case["weight"], None, LayerSpec(LayerScheme.parse("w3g64:a8-dynamic")))
    q = QuantLinear.from_float(case["weight"], None, case["spec"], act_scale=torch.tensor(0.1))
    assert "kernel=w4a8" in repr(q) and q.act_scale.shape == (1,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", ["w4g128:a8-dynamic", "w4g64a:a8-static", "w8:a8-dynamic", "w4g128:a16"])
def test_compiled_kernels_match_the_cpu_path(scheme: str) -> None:
    gen = seeded("gpu", scheme)
    spec = LayerSpec(LayerScheme.parse(scheme))
    w, x = torch.randn(1000, 1536, generator=gen), torch.randn(37, 1536, generator=gen)
    scale = static_scale_from_absmax(x.abs().max())
    cpu = QuantLinear.from_float(w, None, spec, act_scale=scale)
    gpu = QuantLinear.from_float(w, None, spec, act_scale=scale).cuda()
    with torch.no_grad():
        assert rel_err(gpu(x.cuda()).cpu(), cpu(x)) <= TOL
        assert rel_err(gpu(x.cuda().half()).float().cpu(), cpu(x.half()).float()) <= 2e-3


def test_simulation_in_evaluation_equals_the_autograd_form() -> None:
    """FakeQuantLinear quantizes activations in place when nothing needs gradients: bit-equal to the other form."""
    for scheme in ("w4g32:a8-dynamic", "w4g64a:a8-static", "w4g32:a8-lae", "w4g128a:a16", "w8:a8-smooth"):
        case = layer_inputs(scheme, torch.float32, seeded("inplace", scheme))
        fake = FakeQuantLinear(case["weight"], case["bias"], case["spec"], act_scale=case["act_scale"],
                               pre_scale=case["pre_scale"])
        x = case["x"].clone()
        with torch.no_grad():
            y = fake(x)
        assert torch.equal(x, case["x"])  # the caller's input is left alone
        with torch.enable_grad():
            assert torch.equal(fake(case["x"]).detach(), y), scheme


def test_large_w4a8_calls_keep_the_dequantized_weight() -> None:
    """The exact W4A8 path keeps its dequantized fp32 weight once a call is large enough for its float GEMM (8 x g
    rows): the same numbers as w4a8_dequant computing it per call; smaller calls keep nothing more."""
    from quantplan.quant.kernels.dispatch import quantize_activations
    from quantplan.quant.kernels.w4a8 import w4a8_dequant

    case = layer_inputs("w4g32:a8-dynamic", torch.float32, seeded("dense"))
    layer = QuantLinear.from_float(case["weight"], case["bias"], case["spec"], backend="torch")
    x = torch.randn(300, K, generator=seeded("dense-x"))
    with torch.no_grad():
        layer(x[:10])
        assert "dense" not in layer._prepared
        y = layer(x)
        kept = layer._prepared["dense"][1]
        assert torch.equal(layer(x), y) and layer._prepared["dense"][1] is kept
        x_q, x_scale = quantize_activations(x, case["spec"].scheme.act)
        assert torch.equal(y, w4a8_dequant(x_q, x_scale, layer.packed, layer.bias))
