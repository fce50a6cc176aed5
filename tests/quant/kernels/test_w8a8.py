"""W8A8 kernel (per-channel int8 weights) and its torch reference (torch._int_mm) against float64."""

from __future__ import annotations

import pytest
import torch

from quantplan.quant.kernels.act_quant import quantize_act_ref
from quantplan.quant.kernels.runtime import UnsupportedSchemeError
from quantplan.quant.kernels.w8a8 import CONFIGS, KEYS, _w8a8_kernel, prune, w8a8_ref, w8a8_triton
from tests.quant.kernels.reference import FP16_TOL, TOL, make_weight, poisoned, ref_a8, rel_err, seeded

N, K = 72, 203  # K pads to 204 (whole 32-bit words); neither is a multiple of a K tile


def run(backend: str, x_q, x_scale, pw, bias=None, out_dtype=torch.float32, **kw) -> torch.Tensor:
    if backend == "torch":
        return w8a8_ref(x_q, x_scale, pw, bias, out_dtype)
    return w8a8_triton(x_q, x_scale, pw, bias, out_dtype, out=poisoned((x_q.shape[0], N), out_dtype), **kw)


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("per_token", [True, False])
def test_matches_float64(backend: str, m: int, per_token: bool) -> None:
    gen = seeded("w8a8", m, per_token)
    qw, pw = make_weight(N, K, "w8", gen)
    x = torch.randn(m, K, generator=gen) * 3
    x_q, x_scale = quantize_act_ref(x, None if per_token else torch.tensor(0.04))
    for bias in (None, torch.randn(N, generator=gen)):
        assert rel_err(run(backend, x_q, x_scale, pw, bias), ref_a8(x_q, x_scale, qw, bias)) <= TOL


def test_fp16_output(backend: str) -> None:
    gen = seeded("w8a8-fp16")
    qw, pw = make_weight(N, K, "w8", gen)
    x_q, x_scale = quantize_act_ref(torch.randn(17, K, generator=gen))
    ref = ref_a8(x_q, x_scale, qw, None)
    y = run(backend, x_q, x_scale, pw, out_dtype=torch.float16)
    assert ((y.double() - ref).abs() <= FP16_TOL * ref.abs() + TOL * ref.abs().max()).all()


def test_every_pruned_config() -> None:
    pytest.importorskip("triton")
    gen = seeded("w8a8-configs")
    qw, pw = make_weight(N, K, "w8", gen)
    x_q, x_scale = quantize_act_ref(torch.randn(64, K, generator=gen))
    ref = ref_a8(x_q, x_scale, qw, None)
    configs = prune(CONFIGS, {"M": 64, "N": N, "K": K})
    assert len(configs) >= 4 and all(c.block_k >= 32 for c in CONFIGS)
    for config in configs:
        assert rel_err(run("triton", x_q, x_scale, pw, config=config), ref) <= TOL, config
    assert set(KEYS) <= set(_w8a8_kernel.arg_names)


@pytest.mark.parametrize("scheme", ["w8g64", "w8a", "w4"])
def test_only_symmetric_per_channel_8bit(backend: str, scheme: str) -> None:
    gen = seeded("w8a8-refuse", scheme)
    _, pw = make_weight(N, K, scheme, gen)
    x_q, x_scale = quantize_act_ref(torch.randn(3, K, generator=gen))
    with pytest.raises(UnsupportedSchemeError, match="W8A8 kernel takes"):
        run(backend, x_q, x_scale, pw)
