"""Quantizers against a float64 reference, error trends, idempotence, SQNR thresholds, equalization."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantplan.quant.quantizers import (
    dequantize_weight,
    fake_quantize_act,
    fake_quantize_weight,
    lae_scales,
    quantize_weight,
    search_clip,
    smooth_scales,
    sqnr_db,
    weight_error,
)
from quantplan.quant.schemes import ActScheme, WeightScheme

SCHEMES = ["w2g32", "w3g64", "w4g128", "w4g32a", "w4", "w8", "w8g64a", "w3a"]


def reference_fake_quant(w: np.ndarray, bits: int, group: int, asym: bool, clip: float = 1.0) -> np.ndarray:
    """Independent float64 loop implementation of group-wise RTN (fp16 scales, zero padding)."""
    n, k = w.shape
    g = k if group == -1 else group
    out = np.zeros_like(w)
    for r in range(n):
        for start in range(0, k, g):
            x = w[r, start : start + g]
            if asym:
                qmax = 2**bits - 1
                lo, hi = min(x.min(), 0.0) * clip, max(x.max(), 0.0) * clip
                exact = max((hi - lo) / qmax, 2.0**-24)
                s16 = np.float16(np.float32(exact))
                if s16 > exact * (1 + 1e-6):  # asymmetric scales round down to fp16
                    s16 = np.nextafter(s16, np.float16(0))
                s = float(s16)
                z = np.clip(np.round(-lo / s), 0, qmax)
                out[r, start : start + g] = (np.clip(np.round(x / s) + z, 0, qmax) - z) * s
            else:
                qmax = 2 ** (bits - 1) - 1
                s = float(np.float16(np.float32(max(np.abs(x).max() * clip / qmax, 2.0**-24))))
                out[r, start : start + g] = np.clip(np.round(x / s), -qmax - 1, qmax) * s
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("k", [128, 172])
def test_matches_float64_reference(scheme: str, k: int) -> None:
    ws = WeightScheme.parse(scheme)
    w = torch.randn(12, k, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    for clip in (1.0, 0.85):
        got = fake_quantize_weight(w, ws, clip).numpy()
        ref = reference_fake_quant(w.numpy(), ws.bits, ws.group, ws.asymmetric, clip)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    # float32 input agrees except where float32 rounding flips a value sitting on a rounding boundary
    got32 = fake_quantize_weight(w.float(), ws).double().numpy()
    diff = np.abs(got32 - reference_fake_quant(w.numpy(), ws.bits, ws.group, ws.asymmetric))
    assert (diff > 1e-5).mean() < 2e-3


def test_codes_stay_in_range_and_dequantize() -> None:
    w = torch.randn(16, 172)
    for scheme in SCHEMES:
        ws = WeightScheme.parse(scheme)
        qw = quantize_weight(w, ws)
        lo, hi = (0, ws.qmax) if ws.asymmetric else (-ws.qmax - 1, ws.qmax)
        assert qw.codes.min() >= lo and qw.codes.max() <= hi
        assert qw.codes.shape[1] % qw.group_size == 0 and qw.scales.dtype == torch.float16
        assert torch.equal(dequantize_weight(qw), fake_quantize_weight(w, ws))


def test_error_falls_with_bits_and_smaller_groups() -> None:
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * torch.rand(1, 512) * 3
    by_bits = [sqnr_db(w, fake_quantize_weight(w, WeightScheme(b, 128))) for b in (2, 3, 4, 8)]
    assert by_bits == sorted(by_bits)
    by_group = [
        sqnr_db(w, fake_quantize_weight(w, WeightScheme.parse(s))) for s in ("w4", "w4g128", "w4g64", "w4g32")
    ]
    assert by_group == sorted(by_group)


@pytest.mark.parametrize(
    ("scheme", "min_db"),
    [("w8", 38.0), ("w4g128", 18.0), ("w4g32", 20.0), ("w4g128a", 19.0), ("w3g64", 11.0), ("w2g32a", 7.0)],
)
def test_sqnr_thresholds_gaussian(scheme: str, min_db: float) -> None:
    # RTN on Gaussian weights: roughly 6 dB per bit minus the cost of the max-based range.
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    assert sqnr_db(w, fake_quantize_weight(w, WeightScheme.parse(scheme))) > min_db


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantizing_twice_changes_nothing(scheme: str) -> None:
    ws = WeightScheme.parse(scheme)
    once = fake_quantize_weight(torch.randn(8, 172, dtype=torch.float64), ws)
    assert torch.equal(fake_quantize_weight(once, ws), once)


def test_padding_does_not_change_full_groups() -> None:
    w = torch.randn(4, 172)
    q = fake_quantize_weight(w, WeightScheme.parse("w4g64"))
    assert torch.equal(q[:, :128], fake_quantize_weight(w[:, :128], WeightScheme.parse("w4g64")))


def test_clip_search_beats_no_clip_on_heavy_tails() -> None:
    w = torch.distributions.StudentT(2.0).sample((64, 256))
    ws = WeightScheme.parse("w3g128")
    r = search_clip(w, ws)
    assert r < 1.0 and weight_error(w, ws, r) < weight_error(w, ws, 1.0)
    importance = torch.zeros_like(w)
    importance[:, :8] = 1.0  # Fisher-weighted: only the first channels matter
    assert weight_error(w, ws, search_clip(w, ws, importance), importance) <= weight_error(
        w, ws, r, importance
    )


def test_activation_quantizers() -> None:
    x = torch.randn(3, 5, 64) * torch.linspace(0.1, 20, 64)
    dyn = fake_quantize_act(x, ActScheme.DYNAMIC)
    per_token_step = x.abs().amax(-1, keepdim=True) / 127
    assert ((dyn - x).abs() <= per_token_step / 2 + 1e-6).all()
    scale = x.abs().max() / 127
    static = fake_quantize_act(x, ActScheme.STATIC, scale)
    assert ((static - x).abs() <= scale / 2 + 1e-6).all()
    assert len(torch.unique(static / scale)) <= 255
    assert torch.equal(fake_quantize_act(x, ActScheme.A16), x)
    assert sqnr_db(x, dyn) > sqnr_db(x, static)  # per-token scales track each row


def test_equalization_scales() -> None:
    m = torch.tensor([0.0, 1.0, 14.0, 1000.0])
    s = lae_scales(m)
    assert s[0] == 1.0 and s[1] == pytest.approx(1 / np.log2(3))
    assert s[3] == pytest.approx(1000 / np.log2(1002))
    equalized = m[1:] / s[1:]  # max|X_j / s_j| = log2(2 + max|X_j|): outliers compressed logarithmically
    assert torch.allclose(equalized, torch.log2(2 + m[1:]))
    w = torch.tensor([1.0, 0.5, 0.25, 2.0])
    sm = smooth_scales(m.clamp_min(1e-5), w, 0.5)
    assert torch.allclose(sm[1:], (m[1:].sqrt() / w[1:].sqrt()))
