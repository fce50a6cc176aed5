"""W4A16 kernel (weights dequantized in-kernel, float activations) and its torch reference against float64."""

from __future__ import annotations

import pytest
import torch

from quantplan.quant.kernels.w4a16 import CONFIGS, KEYS, _w4a16_kernel, prepare, prune, w4a16_ref, w4a16_triton
from tests.quant.kernels.reference import FP16_TOL, TOL, make_weight, poisoned, ref_a16, rel_err, seeded

N, K = 72, 200


def run(backend: str, x, pw, bias=None, out_dtype=torch.float32, **kw) -> torch.Tensor:
    if backend == "torch":
        return w4a16_ref(x, pw, bias, out_dtype)
    return w4a16_triton(x, pw, bias, out_dtype, out=poisoned((x.shape[0], pw.out_features), out_dtype), **kw)


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("group", ["g32", "g64", "g128", ""])
@pytest.mark.parametrize("asym", [False, True])
def test_matches_float64(backend: str, m: int, group: str, asym: bool) -> None:
    scheme = f"w4{group}{'a' if asym else ''}"
    gen = seeded("w4a16", m, scheme)
    qw, pw = make_weight(N, K, scheme, gen)
    bias = torch.randn(N, generator=gen) if m % 2 else None
    x = torch.randn(m, K, generator=gen) * 2
    assert rel_err(run(backend, x, pw, bias), ref_a16(x, qw, bias)) <= TOL


@pytest.mark.parametrize("scheme", ["w4g128", "w4g32a", "w8g64a", "w8", "w2g64"])
def test_fp16_activations(backend: str, scheme: str) -> None:
    gen = seeded("w4a16-fp16", scheme)
    qw, pw = make_weight(N, K, scheme, gen)
    x = torch.randn(17, K, generator=gen).half()
    bias = torch.randn(N, generator=gen).half()
    ref = ref_a16(x, qw, bias)
    assert rel_err(run(backend, x, pw, bias), ref) <= TOL  # fp16 products are exact in the fp32 accumulator
    y16 = run(backend, x, pw, bias, torch.float16)
    assert ((y16.double() - ref).abs() <= FP16_TOL * ref.abs() + TOL * ref.abs().max()).all()


def test_cached_codes_and_every_pruned_config() -> None:
    pytest.importorskip("triton")
    gen = seeded("w4a16-configs")
    qw, pw = make_weight(N, K, "w4g128a", gen)
    x = torch.randn(64, K, generator=gen)
    ref = ref_a16(x, qw, None)
    assert rel_err(w4a16_ref(x, pw, prepared=prepare(pw)), ref) <= TOL
    configs = prune(CONFIGS, {"M": 64, "N": N, "K": K, "GROUP_SIZE": 128})
    assert len(configs) >= 4 and all(128 % c.block_k == 0 for c in configs)
    for config in configs:
        assert rel_err(run("triton", x, pw, config=config), ref) <= TOL, config
    assert set(KEYS) <= set(_w4a16_kernel.arg_names)
