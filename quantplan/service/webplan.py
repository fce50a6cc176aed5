"""What the plan page shows beside the numbers: the per-layer heatmap, the cost by scheme, the export formats.

The heatmap has a row per decoder block and a column per projection (q, k, v, o, gate, up, down; `qkv` for fused
attention inputs); a cell's colour is its weight bits on a scale whose lightness falls with the bits (so it reads
in greyscale too) and its text repeats the bits plus a letter for the activation strategy.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from quantplan.errors import SchemeError
from quantplan.quant.schemes import PER_CHANNEL, SCALE_BITS, LayerScheme

COLUMNS = ("qkv", "q", "k", "v", "o", "gate", "up", "down")
_BLOCK = re.compile(r"^(?:.*\.)?(?:layers|h|layer|blocks)\.(?P<block>\d+)\.(?P<rest>.+)$")
_PROJECTIONS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o", "gate_proj": "gate",
                "up_proj": "up", "down_proj": "down", "fc1": "up", "fc2": "down", "c_fc": "up", "dense_h_to_4h": "up",
                "dense_4h_to_h": "down", "query_key_value": "qkv", "c_attn": "qkv", "attention.dense": "o",
                "attn.c_proj": "o", "mlp.c_proj": "down"}
# weight bits -> (background, text): lightness rises with the bits (ColorBrewer Blues), readable in greyscale
BIT_COLOURS = {2: ("#08306b", "#ffffff"), 3: ("#2171b5", "#ffffff"), 4: ("#6baed6", "#000000"),
               8: ("#c6dbef", "#000000"), 16: ("#f7fbff", "#000000")}
ACT_MARKS = {"a16": "", "a8-static": "S", "a8-dynamic": "D", "a8-lae": "L", "a8-smooth": "Q"}


@dataclass(frozen=True)
class Cell:
    layer: str
    scheme: str
    bits: int
    act: str
    mark: str
    colour: str
    text_colour: str
    clip: float | None

    @property
    def text(self) -> str:
        return f"{self.bits}{self.mark}"


@dataclass(frozen=True)
class Heatmap:
    columns: tuple[str, ...]
    rows: tuple[tuple[int, tuple[Cell | None, ...]], ...]  # (block, a cell or None per column)
    others: tuple[tuple[str, str], ...]  # (layer or pattern, scheme) outside the grid
    acts: tuple[tuple[str, str], ...]  # (mark, act scheme) of the strategies the plan uses
    bits: tuple[tuple[int, str, str], ...]  # (bits, colour, text colour) the plan uses

    @property
    def cells(self) -> int:
        return sum(c is not None for _, row in self.rows for c in row)


def act_mark(act: str) -> str:
    return ACT_MARKS.get(act, act.split("-", 1)[-1][:2].upper())


def heatmap(plan: Mapping[str, Any]) -> Heatmap:
    grid: dict[int, dict[str, Cell]] = {}
    others: list[tuple[str, str]] = []
    for name, entry in (plan.get("layers") or {}).items():
        text = entry.get("scheme") if isinstance(entry, Mapping) else entry
        place = _place(name)
        try:
            scheme = LayerScheme.parse(str(text))
        except SchemeError:
            scheme = None
        if place is None or scheme is None:
            others.append((name, str(text)))
            continue
        bits, act = scheme.weight.bits, str(scheme.act)
        colour, ink = BIT_COLOURS.get(bits, ("#808080", "#000000"))
        clip = entry.get("clip") if isinstance(entry, Mapping) else None
        grid.setdefault(place[0], {})[place[1]] = Cell(name, str(scheme), bits, act, act_mark(act), colour, ink, clip)
    used = [c for c in COLUMNS if any(c in row for row in grid.values())]
    rows = tuple((b, tuple(grid[b].get(c) for c in used)) for b in sorted(grid))
    cells = [c for row in grid.values() for c in row.values()]
    acts = tuple(sorted({(c.mark or "-", c.act) for c in cells}, key=lambda a: a[1]))
    bits = tuple(sorted({(c.bits, c.colour, c.text_colour) for c in cells}))
    return Heatmap(tuple(used), rows, tuple(others), acts, bits)


def _place(name: str) -> tuple[int, str] | None:
    m = _BLOCK.match(name)
    if m is None:
        return None
    rest = m["rest"]
    for suffix, column in sorted(_PROJECTIONS.items(), key=lambda kv: -len(kv[0])):
        if rest == suffix or rest.endswith("." + suffix):
            return int(m["block"]), column
    return None


def cost_by_scheme(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per scheme: layers, weight bits, group, stored bits per weight (grouped schemes: codes + scale + zero)."""
    counts: dict[str, int] = {}
    for entry in (plan.get("layers") or {}).values():
        text = str(entry.get("scheme") if isinstance(entry, Mapping) else entry)
        counts[text] = counts.get(text, 0) + 1
    total = sum(counts.values()) or 1
    rows = []
    for text, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        try:
            w = LayerScheme.parse(text).weight
        except SchemeError:
            rows.append({"scheme": text, "layers": n, "share": n / total})
            continue
        grouped = w.quantized and w.group != PER_CHANNEL
        rows.append({"scheme": text, "layers": n, "share": n / total, "bits": w.bits,
                     "group": w.group if grouped else ("row" if w.quantized else "-"),
                     "bits_per_weight": w.bits + (SCALE_BITS + w.zero_bits) / w.group if grouped
                     else (None if w.quantized else 16.0)})
    return rows


@cache
def export_formats() -> tuple[tuple[str, str], ...]:
    """(name, description) of every registered export format (importing the registry loads torch: done once)."""
    from quantplan.quant.artifact import EXPORT_FORMATS

    with contextlib.suppress(ImportError):  # registers compressed-tensors (its package is needed only to write it)
        import quantplan.quant.export_ct  # noqa: F401

    return tuple((f.name, f.description) for f in EXPORT_FORMATS.values())
