"""What the quantized kernels serve, torch-free: one row per kernel, read by the dispatch and the search space.

A row says which weight schemes a kernel takes and with which activation width: 8 (int8 codes, from any
registered 8-bit activation strategy: the strategy's handler quantizes, the kernel multiplies) or 16 (float
activations). `quant.kernels.dispatch.KERNELS` pairs each row with its Triton kernel and torch reference, in this
order (the first row that takes a scheme runs it); `search.space` offers only what some row serves. A new kernel
is a row here plus its implementations in dispatch (docs/ARCHITECTURE.md, "Extending QuantPlan").
"""

from __future__ import annotations

from dataclasses import dataclass

from quantplan.quant.schemes import PER_CHANNEL, WeightScheme

PACKED_BITS = (2, 4, 8)  # weight widths with a packed format (their fields tile a 32-bit word); docs/FORMAT.md


@dataclass(frozen=True)
class Served:
    """One kernel's reach: weight widths, whether it needs per-channel groups, which widths may be asymmetric."""

    kernel: str
    act_bits: int  # 8: int8 activation codes; 16: float activations
    weight_bits: tuple[int, ...]
    asymmetric_bits: tuple[int, ...] = ()  # widths whose asymmetric (zero-point) variants it takes
    per_channel_only: bool = False
    refused: str = "the {kernel} kernel does not take {scheme}"  # the reason, for what it does not take

    def refusal(self, scheme: WeightScheme) -> str | None:
        """Why this kernel does not compute `scheme`, or None when it does."""
        if scheme.bits not in PACKED_BITS:
            return (
                f"{scheme}: {scheme.bits}-bit weights have no packed format or kernel; quantized kernels take "
                f"{', '.join(f'w{b}' for b in PACKED_BITS)} weights (keep other layers unquantized or fake-quantized)"
            )
        takes = (
            scheme.bits in self.weight_bits
            and (scheme.group == PER_CHANNEL or not self.per_channel_only)
            and (not scheme.asymmetric or scheme.bits in self.asymmetric_bits)
        )
        return None if takes else self.refused.format(kernel=self.kernel, scheme=scheme)


SERVED: tuple[Served, ...] = (
    Served("w8a8", 8, (8,), per_channel_only=True,
           refused="the W8A8 kernel takes symmetric per-channel 8-bit weights (w8), not {scheme}; grouped and "
                   "sub-byte weights go to the W4A8 kernel"),
    Served("w4a8", 8, (2, 4, 8), asymmetric_bits=(2, 4),
           refused="{scheme} with int8 activations has no kernel: code - zero spans [-255, 255], beyond int8; "
                   "use symmetric w8 or 16-bit activations"),
    Served("w4a16", 16, (2, 4, 8), asymmetric_bits=(2, 4, 8)),
)


def served(kernel: str) -> Served:
    return next(s for s in SERVED if s.kernel == kernel)


def serving(scheme: WeightScheme, act_bits: int) -> Served | None:
    """The row that runs `scheme` with `act_bits`-bit activations (the first that takes it), or None."""
    return next((s for s in SERVED if s.act_bits == act_bits and s.refusal(scheme) is None), None)


def served_act_bits(scheme: WeightScheme) -> tuple[int, ...]:
    """The activation widths some kernel runs `scheme` with; w16 (an unquantized nn.Linear): float only."""
    if not scheme.quantized:
        return (16,)
    return tuple(sorted({s.act_bits for s in SERVED if s.refusal(scheme) is None}))
