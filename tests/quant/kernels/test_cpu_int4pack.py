"""The fast CPU kernel (bf16): torch's int4 GEMM for decoding-size calls, against the float64 reference and the
simulation on odd shapes; built once per layer; the exact paths stay the default and serve everything else."""

from __future__ import annotations

import pytest
import torch

from quantplan.quant.kernels.cpu import (
    INT4PACK_ROWS,
    INT4PACK_RTOL,
    int4pack_mm,
    int4pack_serves,
    prepare_int4pack,
)
from quantplan.quant.kernels.dispatch import quantize_activations
from quantplan.quant.kernels.runtime import KernelError
from quantplan.quant.modules import FakeQuantLinear
from quantplan.quant.plan import LayerSpec
from quantplan.quant.qlinear import QuantLinear, set_cpu_kernels
from quantplan.quant.quantizers import static_scale_from_absmax
from quantplan.quant.schemes import ActScheme, LayerScheme
from tests.quant.kernels.reference import TOL, make_weight, ref_a8, ref_a16, rel_err, seeded

N = 48  # int4pack packs N in multiples of 16


@pytest.mark.parametrize("scheme", ["w4g32", "w4g64a", "w4g128", "w4g128a"])
@pytest.mark.parametrize("k", [200, 256, 333])  # K_pad = K rounded up to the group: padding handled
@pytest.mark.parametrize("m", [1, 3, 16])
def test_int4pack_matches_float64_reference(scheme: str, k: int, m: int) -> None:
    gen = seeded("int4pack", scheme, k, m)
    qw, pw = make_weight(N, k, scheme, gen)
    assert int4pack_serves(pw)
    packed = prepare_int4pack(pw)
    x = torch.randn(m, k, generator=gen) * 3
    assert rel_err(int4pack_mm(x, packed), ref_a16(x, qw, None)) <= INT4PACK_RTOL
    x_q, x_scale = quantize_activations(x, ActScheme.parse("a8-dynamic"))
    y = int4pack_mm(x_q.float(), packed) * x_scale.reshape(-1, 1)
    err = rel_err(y, ref_a8(x_q, x_scale, qw, None))
    assert 0 < err <= INT4PACK_RTOL  # bf16 scales: close, not exact


def test_what_int4pack_serves() -> None:
    gen = seeded("serves")
    assert not int4pack_serves(make_weight(40, 256, "w4g32", gen)[1])  # N not a multiple of 16
    assert not int4pack_serves(make_weight(48, 256, "w4", gen)[1])  # per-channel
    assert not int4pack_serves(make_weight(48, 256, "w8g32", gen)[1])  # 8-bit
    with pytest.raises(ValueError, match="not int4pack-able"):
        prepare_int4pack(make_weight(48, 256, "w2g32", gen)[1])


@pytest.mark.parametrize("scheme", ["w4g32:a8-dynamic", "w4g64a:a8-static", "w4g32:a8-lae", "w4g128:a16",
                                    "w4g64a:a16", "w4:a8-dynamic", "w2g32a:a8-dynamic", "w8g32a:a16"])
@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_fast_cpu_kernels_match_the_simulation_within_bf16(monkeypatch, scheme: str, m: int) -> None:
    """cpu_kernels="fast": the int4pack GEMM for calls of at most INT4PACK_ROWS rows on weights it packs (within
    bf16 rounding of the simulation, not bit-equal to the exact path), the exact path otherwise (bit-equal); the
    int4pack layout is built once per layer, whatever the number of calls."""
    gen = seeded("fast-cpu", scheme, m)
    spec = LayerSpec(LayerScheme.parse(scheme), clip=0.9)
    k = 333
    w = torch.randn(N, k, generator=gen) * (0.5 + torch.rand(N, 1, generator=gen))
    x = torch.randn(m, k, generator=gen) * (0.2 + 4 * torch.rand(k, generator=gen))
    pre = 0.5 + torch.rand(k, generator=gen) if spec.scheme.act.equalized else None
    act_scale = static_scale_from_absmax((x if pre is None else x / pre).abs().max()) \
        if spec.scheme.act.needs_calibration else None
    bias = torch.randn(N, generator=gen)
    kw = {"act_scale": act_scale, "pre_scale": pre, "backend": "torch"}
    fake = FakeQuantLinear(w, bias, spec, act_scale=act_scale, pre_scale=pre)
    exact = QuantLinear.from_float(w, bias, spec, **kw)
    fast = QuantLinear.from_float(w, bias, spec, **kw)
    set_cpu_kernels(fast, "fast")
    packs = spec.scheme.weight.bits == 4 and spec.scheme.weight.group > 0
    assert exact.cpu_kernels == "exact" and fast.cpu_kernels == ("fast" if packs else "exact")
    built = []
    monkeypatch.setattr("quantplan.quant.qlinear.prepare_int4pack", lambda pw: built.append(pw) or prepare_int4pack(pw))
    with torch.no_grad():
        want = fake(x)
        for _ in range(3):
            y = fast(x)
        y_exact = exact(x)
    assert y.shape == (m, N) and y.dtype == torch.float32
    assert rel_err(y_exact, want) <= TOL
    if packs and m <= INT4PACK_ROWS:
        assert len(built) == 1 and rel_err(y, want) <= INT4PACK_RTOL and not torch.equal(y, y_exact)
    else:
        assert not built and torch.equal(y, y_exact)


def test_cpu_kernel_modes() -> None:
    spec = LayerSpec(LayerScheme.parse("w8:a8-dynamic"))
    layer = QuantLinear.from_float(torch.randn(N, 64), None, spec)
    model = torch.nn.Sequential(layer)
    assert set_cpu_kernels(model, "fast") == 1 and layer.cpu_kernels == "exact"  # W8A8 is exact and fast already
    with pytest.raises(KernelError, match="unknown CPU kernel mode 'quick'"):
        set_cpu_kernels(model, "quick")
