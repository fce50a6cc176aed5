"""Packed weight format (version 1): integer codes in 32-bit words along K, fp16 group scales, packed zero-points.

Layout (docs/FORMAT.md is the contract; `FORMAT_VERSION` changes whenever a byte moves):

    codes   int32 [N, K_pad / E]         E = 32 / bits codes per word; code k of row n sits in word k // E,
                                         bits [(k % E) * bits, (k % E + 1) * bits) (little-endian fields);
                                         symmetric codes are two's complement fields, asymmetric unsigned
    scales  float16 [G, N]               one scale per group of g consecutive weights along K (G = K_pad / g)
    zeros   int32 [G, ceil(N / E)]       asymmetric only: unsigned zero-points packed along N like the codes

K_pad is K rounded up to whole groups (per-channel: up to whole words); padded codes dequantize to 0. For 8-bit
weights the code words are byte-for-byte an int8 (or uint8) `[N, K_pad]` matrix, so `codes.view(torch.int8)`
feeds an int8 GEMM directly. Storage matches `quant.plan.weight_cost` up to the rounding of N to whole zero words
and of a per-channel K to whole code words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quantplan.errors import QuantPlanError
from quantplan.quant.kernels.served import PACKED_BITS as PACKABLE_BITS  # widths that tile a 32-bit word
from quantplan.quant.quantizers import QuantizedWeight
from quantplan.quant.schemes import WeightScheme

FORMAT_NAME = "quantplan.packed-weight"
FORMAT_VERSION = 1
WORD_BITS = 32


class PackingError(QuantPlanError, ValueError):
    """Codes, scales or zero-points that do not form a valid packed weight (or a scheme that cannot be packed)."""


def codes_per_word(bits: int) -> int:
    return WORD_BITS // bits


def check_packable(scheme: WeightScheme) -> None:
    """Raise PackingError unless `scheme` has a packed format."""
    if scheme.bits not in PACKABLE_BITS:
        raise PackingError(
            f"{scheme} has no packed format: {scheme.bits}-bit codes do not tile a 32-bit word; "
            f"use one of w{', w'.join(map(str, PACKABLE_BITS))} (or w16 to keep the layer unquantized)"
        )


@dataclass(frozen=True)
class PackedWeight:
    """A quantized [N, K] weight in the packed format; `codes`, `scales`, `zeros` are the stored tensors."""

    codes: torch.Tensor  # int32 [N, K_pad / E]
    scales: torch.Tensor  # float16 [G, N]
    zeros: torch.Tensor | None  # int32 [G, ceil(N / E)] when asymmetric
    in_features: int  # real K
    scheme: WeightScheme

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def bits(self) -> int:
        return self.scheme.bits

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def k_pad(self) -> int:
        return self.codes.shape[1] * codes_per_word(self.bits)

    @property
    def groups(self) -> int:
        return self.scales.shape[0]

    @property
    def group_size(self) -> int:
        """Weights per group along K; per-channel: the real K."""
        return self.scheme.group_size(self.in_features)

    @property
    def per_channel(self) -> bool:
        return self.groups == 1 and self.scheme.group == -1

    @property
    def nbytes(self) -> int:
        tensors = [self.codes, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> PackedWeight:
        zeros = None if self.zeros is None else self.zeros.to(device)
        return PackedWeight(self.codes.to(device), self.scales.to(device), zeros, self.in_features, self.scheme)

    def metadata(self) -> dict[str, str]:
        """String metadata (safetensors-compatible) that `from_tensors` needs besides the tensors."""
        return {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "scheme": str(self.scheme),
                "in_features": str(self.in_features)}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scales": self.scales}
        return out if self.zeros is None else {**out, "zeros": self.zeros}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> PackedWeight:
        check_format(metadata.get("format"), metadata.get("version"))
        scheme = WeightScheme.parse(str(metadata["scheme"]))
        return cls(tensors["codes"], tensors["scales"], tensors.get("zeros"), int(metadata["in_features"]), scheme)


def check_format(name: Any, version: Any) -> None:
    """Raise PackingError unless (`name`, `version`) is the packed weight format this module reads."""
    if name != FORMAT_NAME or str(version) != str(FORMAT_VERSION):
        raise PackingError(
            f"unsupported packed weight {name!r} version {version!r}; "
            f"this QuantPlan reads {FORMAT_NAME!r} version {FORMAT_VERSION}: re-pack the model"
        )


def packed_shapes(scheme: WeightScheme, out_features: int, in_features: int) -> dict[str, tuple[int, int]]:
    """The shapes of the stored tensors of an [N, K] weight: codes, scales, and zeros when asymmetric.

    What `pack_weight` produces for a weight `quantize_weight` accepts (a group no larger than K), so a reader
    can cut a layer's tensors out of a concatenation knowing only the scheme and the layer's shape.
    """
    check_packable(scheme)
    e = codes_per_word(scheme.bits)
    if scheme.group == -1:
        groups, k_pad = 1, -(-in_features // e) * e
    else:
        groups = -(-in_features // scheme.group)
        k_pad = groups * scheme.group
    shapes = {"codes": (out_features, k_pad // e), "scales": (groups, out_features)}
    if scheme.asymmetric:
        shapes["zeros"] = (groups, -(-out_features // e))
    return shapes


def _fail_unless(ok: bool, what: str) -> None:
    if not ok:
        raise PackingError(f"invalid packed weight: {what}")


def _validate(pw: PackedWeight) -> None:
    check_packable(pw.scheme)
    e = codes_per_word(pw.bits)
    _fail_unless(pw.codes.dtype == torch.int32 and pw.codes.ndim == 2, f"codes must be int32 [N, K_pad/{e}], got "
                 f"{pw.codes.dtype} {tuple(pw.codes.shape)}")
    n, k, k_pad = pw.codes.shape[0], pw.in_features, pw.k_pad
    _fail_unless(0 < k <= k_pad, f"in_features K={k} must be in (0, K_pad={k_pad}]")
    g = pw.group_size
    groups = 1 if pw.scheme.group == -1 else -(-k // g)
    _fail_unless(pw.scheme.group == -1 or k_pad == groups * g,
                 f"padded K={k_pad} is not {groups} whole groups of {g}: K_pad must be a multiple of the group")
    _fail_unless(pw.scheme.group != -1 or k_pad - k < e, f"per-channel K_pad={k_pad} pads K={k} by a word or more")
    _fail_unless(pw.scales.dtype == torch.float16 and tuple(pw.scales.shape) == (groups, n),
                 f"scales must be float16 [{groups}, {n}], got {pw.scales.dtype} {tuple(pw.scales.shape)}")
    if not pw.scheme.asymmetric:
        _fail_unless(pw.zeros is None, f"{pw.scheme} is symmetric but zero-points were given")
        return
    want = (groups, -(-n // e))
    _fail_unless(pw.zeros is not None and pw.zeros.dtype == torch.int32 and tuple(pw.zeros.shape) == want,
                 f"{pw.scheme} needs int32 zeros of shape {want}")


# -- bit fields -------------------------------------------------------------------------------------------
def pack_fields(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer `values` [R, C] (C a multiple of 32/bits) into int32 words along the last dim."""
    e = codes_per_word(bits)
    r, c = values.shape
    assert c % e == 0, "caller pads to whole words"
    fields = (values.to(torch.int64) & ((1 << bits) - 1)).reshape(r, c // e, e)
    shifts = torch.arange(e, device=values.device, dtype=torch.int64) * bits
    words = (fields << shifts).sum(-1)  # fields are disjoint, so the sum is a bitwise or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_fields(words: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """int32 words [R, W] -> int16 fields [R, W * 32/bits]; `signed` sign-extends two's complement fields."""
    e = codes_per_word(bits)
    shifts = torch.arange(e, device=words.device, dtype=torch.int32) * bits
    fields = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    if signed:
        fields = fields - ((fields >> (bits - 1)) << bits)
    return fields.reshape(words.shape[0], -1).to(torch.int16)


def _pad_last(t: torch.Tensor, multiple: int, value: torch.Tensor | int = 0) -> torch.Tensor:
    pad = -t.shape[-1] % multiple
    if pad == 0:
        return t
    fill = torch.as_tensor(value, dtype=t.dtype, device=t.device).expand(*t.shape[:-1], pad)
    return torch.cat([t, fill], dim=-1)


# -- pack / unpack ----------------------------------------------------------------------------------------
def pack_weight(qw: QuantizedWeight) -> PackedWeight:
    """QuantizedWeight (codes [N, K_pad] int16, scales/zeros [N, G]) -> PackedWeight."""
    scheme = qw.scheme
    check_packable(scheme)
    e = codes_per_word(scheme.bits)
    codes = qw.codes
    if scheme.asymmetric:
        codes = _pad_last(codes, e, qw.zeros[:, :1])  # per-channel word padding dequantizes to 0
    words = pack_fields(_pad_last(codes, e), scheme.bits)
    zeros = None
    if qw.zeros is not None:
        zeros = pack_fields(_pad_last(qw.zeros.t().contiguous(), e), scheme.bits)
    return PackedWeight(words, qw.scales.t().contiguous(), zeros, qw.in_features, scheme)


def unpack_codes(pw: PackedWeight) -> torch.Tensor:
    """Codes as stored, int16 [N, K_pad]: signed for symmetric schemes, unsigned for asymmetric."""
    return unpack_fields(pw.codes, pw.bits, signed=not pw.scheme.asymmetric)


def unpack_zeros(pw: PackedWeight) -> torch.Tensor | None:
    """Zero-points int16 [N, G], or None when symmetric."""
    if pw.zeros is None:
        return None
    return unpack_fields(pw.zeros, pw.bits, signed=False)[:, : pw.out_features].t().contiguous()


def unpack_weight(pw: PackedWeight) -> QuantizedWeight:
    """PackedWeight -> the QuantizedWeight it was packed from (exact round trip)."""
    k_stored = pw.in_features if pw.scheme.group == -1 else pw.k_pad
    codes = unpack_codes(pw)[:, :k_stored].contiguous()
    return QuantizedWeight(codes, pw.scales.t().contiguous(), unpack_zeros(pw), pw.in_features, pw.scheme)


def centered_codes(pw: PackedWeight) -> torch.Tensor:
    """(code - zero-point) as [N, K_pad], int8 when it fits (all but asymmetric 8-bit), else int16; padding is 0."""
    q = unpack_codes(pw)
    z = unpack_zeros(pw)
    if z is not None:
        g = pw.k_pad if pw.per_channel else pw.group_size
        q = q - z.repeat_interleave(g, dim=1)[:, : pw.k_pad]
    return q if pw.scheme.asymmetric and pw.bits >= 8 else q.to(torch.int8)


def centered_int8(pw: PackedWeight) -> torch.Tensor:
    """int8 [N, K_pad] of (code - zero-point): the integer weight an int8 GEMM multiplies (padding is 0)."""
    if pw.scheme.asymmetric and pw.bits >= 8:
        raise PackingError(f"{pw.scheme}: code - zero spans [-255, 255] and does not fit int8")
    return centered_codes(pw)
