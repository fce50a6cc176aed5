"""The terminal table of plans (`quantplan leaderboard`, `run`, `submit --wait`), fitted to the terminal's width.

Numbers are never cut: a numeric column is as wide as its widest value and does not wrap. Headers shrink to short
names when the long ones do not fit, the label wraps into the width that is left, and when even that is too
narrow the least useful columns are left out (the table's caption says which; `--columns` picks them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from quantplan.errors import QuantPlanError
from quantplan.service.console import fmt_value
from quantplan.service.views import PLAN_COLUMNS, PLAN_FORMATS


@dataclass(frozen=True)
class Column:
    key: str
    long: str
    short: str
    priority: int  # the lowest is left out first when the terminal is too narrow


COLUMNS = {c.key: c for c in (
    Column("id", "id", "id", 9), Column("job", "job", "job", 2), Column("label", "label", "label", 8),
    Column("avg_bits", "avg_bits", "bits", 8), Column("bytes", "bytes", "bytes", 5), Column("act", "act", "act", 6),
    Column("pred_loss", "pred_loss", "pred", 1), Column("ppl", "ppl", "ppl", 9), Column("kl", "kl", "kl", 7),
    Column("pareto", "pareto", "P", 4), Column("artifact", "artifact", "art", 3),
)}
assert tuple(COLUMNS) == PLAN_COLUMNS
LABEL_MIN = 8  # the label column wraps, but never narrower than this
BORDERS = 3  # a rich column costs its content plus two spaces of padding and one border


def parse_columns(text: str | None) -> tuple[str, ...] | None:
    """`--columns id,ppl,kl` -> the keys in that order (None: every column that fits)."""
    if text is None:
        return None
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in keys if k not in COLUMNS]
    if unknown or not keys:
        raise QuantPlanError(f"unknown column {', '.join(unknown) or '(none given)'} in --columns; use a comma-"
                             f"separated list of {', '.join(COLUMNS)}")
    return keys


def plan_table(title: str, rows: Sequence[Mapping[str, Any]], width: int,
               columns: Sequence[str] | None = None) -> Table:
    """The rows (`views.plan_row` dicts) as a table at most `width` characters wide (when the numbers allow)."""
    keys = list(columns or COLUMNS)
    cells = {k: [fmt_value(r.get(k), PLAN_FORMATS.get(k, "")) for r in rows] for k in keys}
    left_out: list[str] = []
    while True:
        short = _needed(keys, cells, short=False) > width
        if _needed(keys, cells, short=short) <= width or columns is not None or len(keys) <= 2:
            break
        drop = min((k for k in keys if k not in ("id", "label")), key=lambda k: COLUMNS[k].priority, default=None)
        if drop is None:
            break
        keys.remove(drop)
        left_out.append(drop)
    table = Table(title=title, title_justify="left", caption_justify="left",
                  caption=f"left out for the terminal's width: {', '.join(left_out)} (--columns chooses)"
                  if left_out else None)
    for k in keys:
        header = COLUMNS[k].short if short else COLUMNS[k].long
        if k == "label":
            table.add_column(header, overflow="fold", min_width=min(LABEL_MIN, _widest(header, cells[k])), ratio=1)
        else:
            table.add_column(header, justify="right", no_wrap=True, min_width=_widest(header, cells[k]))
    for i in range(len(rows)):
        table.add_row(*(cells[k][i] for k in keys))
    return table


def _needed(keys: Sequence[str], cells: Mapping[str, list[str]], *, short: bool) -> int:
    total = 1
    for k in keys:
        header = COLUMNS[k].short if short else COLUMNS[k].long
        widest = _widest(header, cells[k])
        total += (min(LABEL_MIN, widest) if k == "label" else widest) + BORDERS
    return total


def _widest(header: str, values: Sequence[str]) -> int:
    return max([len(header), *(len(v) for v in values)])
