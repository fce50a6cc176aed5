"""The Pareto plot's geometry and the plan page's heatmap, without a browser (service/webplot.py, webplan.py)."""

from __future__ import annotations

import pytest

from quantplan.service.webplan import COLUMNS, heatmap
from quantplan.service.webplot import pareto_plot, plan_kind


def view(i: int, bits: float, ppl: float | None, kl: float | None, *, job: int = 1, pareto: bool = False,
         recipe: str | None = None) -> dict:
    return {"id": i, "job_id": job, "label": f"p{i}", "recipe": recipe, "avg_bits": bits, "bytes": int(bits * 1e6),
            "perplexity": ppl, "kl": kl, "is_pareto": pareto}


def test_points_fronts_per_job_and_the_unquantized_line() -> None:
    views = [view(1, 4.0, 12.0, 0.02, pareto=True), view(2, 5.0, 11.0, 0.01, pareto=True),
             view(3, 4.5, 12.5, 0.03), view(4, 4.1, 11.9, 0.0, job=2, pareto=True),
             view(5, 6.0, 10.9, 0.005, job=2, pareto=True, recipe="w8:a8-static"), view(6, 4.2, None, None)]
    plot = pareto_plot(views, base_perplexity=10.5)
    assert [p.plan_id for p in plot.points] == [1, 2, 3, 4, 5] and plot.hidden == 1
    fronts = dict(plot.fronts)
    assert set(fronts) == {1, 2} and len(fronts[1].split()) == 2 and len(fronts[2].split()) == 2
    by_id = {p.plan_id: p for p in plot.points}
    assert fronts[1] == f"{by_id[1].px:.1f},{by_id[1].py:.1f} {by_id[2].px:.1f},{by_id[2].py:.1f}"  # x order
    assert plot.fp is not None and plot.fp[0] > by_id[5].py  # below every plan (larger y pixel: lower value)
    assert by_id[5].kind == "uniform" and by_id[1].kind == "searched"
    assert all(plot.left <= p.px <= plot.right and plot.top <= p.py <= plot.bottom for p in plot.points)
    labels = [label for _, label in plot.yticks]
    assert len(labels) == len(set(labels)) >= 3  # distinct tick labels, however close the values


def test_a_log_axis_leaves_out_what_is_not_positive() -> None:
    views = [view(1, 4.0, 12.0, 1e-5), view(2, 5.0, 11.0, 1e-2), view(3, 8.0, 10.0, 0.0)]
    plot = pareto_plot(views, x="bytes", y="kl", log=True)
    assert [p.plan_id for p in plot.points] == [1, 2] and plot.hidden == 1 and plot.fp is None
    assert [label for _, label in plot.yticks] == ["1.00e-05", "1.00e-04", "0.001", "0.01"]
    assert plot.y_label.endswith("(log scale)") and plot.x_label.startswith("bytes")
    linear = pareto_plot(views, y="kl")
    assert linear.fp is not None and linear.fp[0] == pytest.approx(max(p.py for p in linear.points))  # KL 0


@pytest.mark.parametrize(("recipe", "kind"), [(None, "searched"), ("knapsack", "searched"),
                                              ("knapsack:w4", "searched"), ("refined", "searched"),
                                              ("fptq", "fptq"), ("w4g128:a8-static", "uniform")])
def test_plan_kinds(recipe: str | None, kind: str) -> None:
    assert plan_kind(recipe) == kind


def test_heatmap_places_every_named_layer() -> None:
    layers = {f"model.layers.{b}.{m}": "w4g128:a8-dynamic" for b in range(2)
              for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")}
    layers["model.layers.1.mlp.down_proj"] = {"scheme": "w8:a8-static", "clip": 0.9}
    layers["lm_head"] = "w8"
    layers["transformer.h.0.attn.c_attn"] = "w4g128"  # GPT-2's fused q/k/v
    hm = heatmap({"layers": layers, "default": "w16:a16"})
    assert hm.cells == 7 and hm.others == (("lm_head", "w8"),)
    assert hm.columns == tuple(c for c in COLUMNS if c in ("qkv", "q", "k", "down"))
    cell = dict(hm.rows)[1][hm.columns.index("down")]
    assert (cell.bits, cell.mark, cell.clip, cell.text) == (8, "S", 0.9, "8S")
