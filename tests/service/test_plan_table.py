"""The terminal leaderboard fits the terminal: numbers whole, short headers, the label wrapped, columns chosen."""

from __future__ import annotations

import pytest
from rich.console import Console

from quantplan.errors import QuantPlanError
from quantplan.service.plan_table import parse_columns, plan_table

ROWS = [{"id": 1000 + i, "job": 17, "label": f"knapsack:low-bits-variant-{i}", "avg_bits": 4.0 + i / 7,
         "bytes": 3_512_345_678 + i, "act": 8, "pred_loss": 0.0123, "ppl": 10.123 + i, "kl": 0.0456, "pareto": "yes",
         "artifact": "yes" if i == 0 else ""} for i in range(3)]


def render(width: int, columns: str | None = None) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(plan_table("stories260K: plans 1-3 of 3", ROWS, width, parse_columns(columns)))
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [60, 80, 100, 160])
def test_the_table_fits_and_never_cuts_a_number(width: int) -> None:
    lines = render(width)
    assert max(map(len, lines)) <= width
    text = "\n".join(lines)
    assert "…" not in text
    for row in ROWS:
        assert f"{row['ppl']:.3f}" in text and str(row["id"]) in text
        if width >= 80:
            assert f"{row['bytes']:,d}" in text
    label_lines = [line for line in lines if "knapsack:" in line]
    assert len(label_lines) == 3  # each label starts on its row; what does not fit wraps below it
    if width in (80, 100):  # short headers ("bits", "pred") when the long ones do not fit, before leaving any out
        assert "avg_bits" not in text and " bits " in text
    if width == 160:
        assert "avg_bits" in text and "left out" not in text


def test_columns_are_chosen_and_unknown_ones_refused() -> None:
    lines = render(80, "id,ppl,kl")
    header = next(line for line in lines if "id" in line and "ppl" in line)
    assert header.index("id") < header.index("ppl") < header.index("kl") and "label" not in header
    with pytest.raises(QuantPlanError, match="unknown column perplexity"):
        parse_columns("id,perplexity")
