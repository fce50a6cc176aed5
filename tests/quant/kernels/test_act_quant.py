"""Activation quantization kernel and its torch reference: bit-exact codes and scales, float64 properties."""

from __future__ import annotations

import pytest
import torch

from quantplan.quant.kernels.act_quant import CONFIGS, prune, quantize_act_ref, quantize_act_triton
from quantplan.quant.kernels.runtime import KernelInputError
from quantplan.quant.quantizers import act_scale_per_token, quantize_act_int8
from tests.quant.kernels.reference import poisoned, seeded


def run(backend: str, x: torch.Tensor, scale: torch.Tensor | None, inv: torch.Tensor | None, **kw: object):
    if backend == "torch":
        return quantize_act_ref(x, scale, inv)
    m, k = x.shape
    out_scale = poisoned((m,), torch.float32) if scale is None else None
    return quantize_act_triton(x, scale, inv, out=poisoned((m, k), torch.int8), out_scale=out_scale, **kw)


def simulated(x: torch.Tensor, scale: torch.Tensor | None, inv: torch.Tensor | None):
    """What FakeQuantLinear does to its input (quant.quantizers), the contract both paths must meet bit for bit."""
    if inv is not None:
        x = x * inv
    s = act_scale_per_token(x) if scale is None else scale.float()
    return quantize_act_int8(x, s), s.reshape(-1)


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("pre_scale", [False, True])
def test_codes_and_scales_match_simulation(backend: str, m: int, dynamic: bool, pre_scale: bool) -> None:
    gen = seeded("act", m, dynamic, pre_scale)
    k = 300  # two K tiles of the first config, the second one partial
    x = torch.randn(m, k, generator=gen) * torch.rand(1, k, generator=gen) * 8
    inv = (0.25 + torch.rand(k, generator=gen)) if pre_scale else None
    scale = None if dynamic else torch.tensor(0.03)  # some values clamp at +-127
    q, s = run(backend, x, scale, inv)
    q_sim, s_sim = simulated(x, scale, inv)
    assert torch.equal(q, q_sim) and torch.equal(s, s_sim)
    # float64 properties: |x/s - q| <= 1/2 wherever no clamping happened, and the dynamic scale is absmax / 127
    v = (x.double() * (1 if inv is None else inv.double())) / s.double().reshape(-1, 1)
    inside = v.abs() <= 127
    assert ((v - q.double()).abs()[inside] <= 0.5 + 1e-6).all() and (q.abs() <= 127).all()
    if dynamic:
        absmax = (x.double() * (1 if inv is None else inv.double())).abs().amax(1) / 127
        torch.testing.assert_close(s.double(), absmax, rtol=2e-7, atol=0)


def test_fp16_input(backend: str) -> None:
    gen = seeded("fp16")
    x = (torch.randn(17, 96, generator=gen) * 4).half()
    inv = (0.5 + torch.rand(96, generator=gen)).half()
    for scale in (None, torch.tensor(0.02)):
        q, s = run(backend, x, scale, inv)
        q_sim, s_sim = simulated(x, scale, inv)
        assert torch.equal(q, q_sim) and torch.equal(s, s_sim)


def test_rounds_half_to_even_like_torch(backend: str) -> None:
    ties = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 0.49999997, -0.49999997, 1.4999999, 200.0, -200.0]
    x = torch.tensor([ties + [0.0] * (16 - len(ties))])
    q, _ = run(backend, x, torch.tensor(1.0), None)
    assert q[0, : len(ties)].tolist() == [0, 2, 2, 0, -2, -2, 126, -126, 0, 0, 1, 127, -127]


def test_zero_rows_and_empty_batch(backend: str) -> None:
    x = torch.zeros(3, 40)
    x[1, 5] = -2.0
    q, s = run(backend, x, None, None)
    assert s[0] == s[2] == torch.tensor(1e-8) and (q[0] == 0).all() and q[1, 5] == -127
    q, s = run(backend, torch.zeros(0, 40), None, None)
    assert q.shape == (0, 40) and s.shape == (0,)


def test_non_contiguous_input(backend: str) -> None:
    x = torch.randn(64, 24, generator=seeded("nc")).t()  # [24, 64] with strides (1, 24)
    q, s = run(backend, x, None, None)
    q_sim, s_sim = simulated(x, None, None)
    assert torch.equal(q, q_sim) and torch.equal(s, s_sim)


def test_bad_inputs(backend: str) -> None:
    quantize = quantize_act_triton if backend == "triton" else quantize_act_ref
    x = torch.randn(4, 32)
    with pytest.raises(KernelInputError, match="dtype"):
        quantize(x.to(torch.int32))
    with pytest.raises(KernelInputError, match="2-D"):
        quantize(x[0])
    with pytest.raises(KernelInputError, match="pre-scale has 31 channels"):
        quantize(x, None, torch.ones(31))
    with pytest.raises(KernelInputError, match="one number"):
        quantize(x, torch.ones(4))


def test_pruner_keeps_a_config_and_tiles_stay_gpu_valid() -> None:
    for m in (1, 3, 17, 64, 4096):
        for k in (16, 300, 4096, 11008):
            kept = prune(CONFIGS, {"M": m, "K": k})
            assert kept and all(c.block_m >= 16 and c.block_k >= 16 for c in kept)
