"""Packed weight format: exact round trips, the documented bit layout, size against the cost model, validation."""

from __future__ import annotations

import pytest
import torch

from quantplan.quant.packing import (
    FORMAT_VERSION,
    PackedWeight,
    PackingError,
    centered_codes,
    centered_int8,
    pack_weight,
    unpack_codes,
    unpack_weight,
    unpack_zeros,
)
from quantplan.quant.plan import weight_cost
from quantplan.quant.quantizers import QuantizedWeight, dequantize_weight, quantize_weight
from quantplan.quant.schemes import WeightScheme
from tests.quant.kernels.reference import seeded

SCHEMES = ["w2g32", "w2g64a", "w2", "w4g32", "w4g64a", "w4g128", "w4", "w4a", "w8g128", "w8g32a", "w8", "w8a"]


def _equal(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    zeros_equal = a.zeros is None and b.zeros is None or torch.equal(a.zeros, b.zeros)
    return torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and zeros_equal and (
        a.in_features, a.scheme) == (b.in_features, b.scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("k", [128, 203])
def test_round_trip_is_exact(scheme: str, k: int) -> None:
    ws = WeightScheme.parse(scheme)
    qw = quantize_weight(torch.randn(37, k, generator=seeded("rt", scheme, k)), ws)
    pw = pack_weight(qw)
    assert _equal(unpack_weight(pw), qw)
    assert pw.codes.dtype == torch.int32 and pw.scales.shape == (qw.scales.shape[1], 37)
    assert pw.k_pad % (32 // ws.bits) == 0 and pw.k_pad >= k
    centered = centered_codes(pw).double()[:, :k]  # (q - z) * s reproduces the dequantized weight
    g = pw.k_pad if pw.per_channel else pw.group_size
    w = (centered * pw.scales.double().t().repeat_interleave(g, dim=1)[:, :k])
    torch.testing.assert_close(w, dequantize_weight(qw, torch.float64), rtol=0, atol=0)


def test_bit_layout_of_4bit_codes() -> None:
    """Code k of a row sits in word k // 8 at bits 4 (k % 8), as a two's complement field when symmetric."""
    codes = torch.tensor([[1, -1, 0, 7, -8, 2, 3, -2]], dtype=torch.int16)
    qw = QuantizedWeight(codes, torch.ones(1, 1, dtype=torch.float16), None, 8, WeightScheme.parse("w4"))
    pw = pack_weight(qw)
    assert pw.codes.tolist() == [[0xE32870F1 - 2**32]]
    assert unpack_codes(pw).tolist() == codes.tolist()


def test_8bit_codes_are_an_int8_matrix_and_zeros_pack_along_n() -> None:
    qw = quantize_weight(torch.randn(10, 64, generator=seeded("w8")), WeightScheme.parse("w8"))
    assert torch.equal(pack_weight(qw).codes.view(torch.int8), qw.codes.to(torch.int8))
    qa = quantize_weight(torch.randn(10, 128, generator=seeded("z")), WeightScheme.parse("w4g64a"))
    pa = pack_weight(qa)
    assert pa.zeros.shape == (2, 2)  # [G, ceil(N / 8)]
    assert torch.equal(unpack_zeros(pa), qa.zeros)
    assert pa.zeros[0, 0].item() & 0xF == qa.zeros[0, 0].item()  # zero of row 0, group 0: the lowest nibble


@pytest.mark.parametrize("scheme", ["w4g128", "w4g128a", "w4g32", "w2g64a", "w8", "w4a", "w8g64"])
def test_size_matches_cost_model(scheme: str) -> None:
    ws = WeightScheme.parse(scheme)
    n, k = 256, 1000
    pw = pack_weight(quantize_weight(torch.randn(n, k, generator=seeded("size", scheme)), ws))
    cost = weight_cost(ws, n, k).bytes
    assert abs(pw.nbytes - cost) <= 0.02 * cost
    if ws.group != -1:
        assert pw.nbytes == cost  # N is a whole number of zero words here: the format is the cost model


def test_tensors_and_metadata_round_trip() -> None:
    pw = pack_weight(quantize_weight(torch.randn(16, 96, generator=seeded("meta")), WeightScheme.parse("w4g32a")))
    meta = pw.metadata()
    assert meta["version"] == str(FORMAT_VERSION) and meta["scheme"] == "w4g32a"
    again = PackedWeight.from_tensors(pw.tensors(), meta)
    assert all(torch.equal(a, b) for a, b in zip(again.tensors().values(), pw.tensors().values(), strict=True))
    with pytest.raises(PackingError, match="version"):
        PackedWeight.from_tensors(pw.tensors(), {**meta, "version": "0"})


def _valid() -> PackedWeight:
    return pack_weight(quantize_weight(torch.randn(16, 200, generator=seeded("v")), WeightScheme.parse("w4g64a")))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"codes": torch.zeros(16, 25, dtype=torch.int32)}, "multiple of the group"),  # K_pad 200, not 4 x 64
        ({"codes": torch.zeros(16, 32, dtype=torch.int16)}, "int32"),
        ({"scales": torch.ones(4, 16)}, "float16"),
        ({"scales": torch.ones(16, 4, dtype=torch.float16)}, r"float16 \[4, 16\]"),
        ({"zeros": None}, "needs int32 zeros"),
        ({"zeros": torch.zeros(4, 3, dtype=torch.int32)}, "needs int32 zeros"),
        ({"in_features": 300}, "in_features"),
        ({"scheme": WeightScheme.parse("w4g64")}, "symmetric but zero-points"),
        ({"scheme": WeightScheme.parse("w3g64a")}, "no packed format"),
    ],
)
def test_invalid_packed_weights_are_rejected(change: dict, message: str) -> None:
    pw = _valid()
    fields = {"codes": pw.codes, "scales": pw.scales, "zeros": pw.zeros, "in_features": 200, "scheme": pw.scheme}
    with pytest.raises(PackingError, match=message):
        PackedWeight(**{**fields, **change})


def test_w3_cannot_be_packed_and_w8a_is_not_int8() -> None:
    with pytest.raises(PackingError, match="w3g64"):
        pack_weight(quantize_weight(torch.randn(4, 64), WeightScheme.parse("w3g64")))
    pw = pack_weight(quantize_weight(torch.randn(4, 64), WeightScheme.parse("w8a")))
    assert centered_codes(pw).dtype == torch.int16
    with pytest.raises(PackingError, match="does not fit int8"):
        centered_int8(pw)
