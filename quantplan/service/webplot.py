"""The Pareto plot of a leaderboard as geometry for a server-rendered SVG (no plotting library, no JavaScript).

`pareto_plot(views, x=..., y=..., log=...)` maps stored plans (`views.plan_view` dicts) to points in pixels: one
point per plan that has the y value (and a positive one on a log axis), a marker shape per kind (searched plans,
uniform recipes, the FPTQ rule), filled when the plan is on its job's Pareto front; one line per job through its
Pareto plans in x order; the unquantized model as a horizontal line; ticks on both axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

X_AXES = {"avg_bits": "average bits per weight", "bytes": "bytes of the quantized weights"}
Y_AXES = {"perplexity": "perplexity", "kl": "KL divergence to the unquantized model"}
WIDTH, HEIGHT = 720, 450
LEFT, RIGHT, TOP, BOTTOM = 84, 20, 16, 82  # margins around the plot area, in pixels


@dataclass(frozen=True)
class Point:
    plan_id: int
    x: float
    y: float
    px: float
    py: float
    kind: str  # searched | uniform | fptq
    pareto: bool
    job_id: int | None
    title: str


@dataclass(frozen=True)
class Plot:
    x: str
    y: str
    log: bool
    points: tuple[Point, ...]
    fronts: tuple[tuple[int | None, str], ...]  # (job id, SVG polyline points "px,py px,py ...")
    xticks: tuple[tuple[float, str], ...]
    yticks: tuple[tuple[float, str], ...]
    fp: tuple[float, str] | None  # (py, label) of the unquantized model's line
    hidden: int  # plans without a value to plot (not measured, or not positive on a log axis)
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM

    @property
    def x_label(self) -> str:
        return X_AXES[self.x]

    @property
    def y_label(self) -> str:
        return Y_AXES[self.y] + (" (log scale)" if self.log else "")


def plan_kind(recipe: str | None) -> str:
    """searched (trials, the knapsack optimum and its variants, refinements), fptq, or uniform (a fixed scheme)."""
    if recipe is None or recipe == "refined" or recipe.startswith("knapsack"):
        return "searched"
    return "fptq" if recipe == "fptq" else "uniform"


def pareto_plot(views: Sequence[Mapping[str, Any]], *, x: str = "avg_bits", y: str = "perplexity", log: bool = False,
                base_perplexity: float | None = None) -> Plot:
    shown = [v for v in views if v.get(y) is not None and (not log or v[y] > 0)]
    fp_value = base_perplexity if y == "perplexity" else 0.0
    fp_shown = fp_value is not None and (not log or fp_value > 0)
    xs = [float(v[x]) for v in shown]
    ys = [float(v[y]) for v in shown] + ([fp_value] if fp_shown and shown else [])
    to_px = _scale(xs, LEFT, WIDTH - RIGHT, log=False)
    to_py = _scale(ys, HEIGHT - BOTTOM, TOP, log=log)
    points = tuple(Point(v["id"], float(v[x]), float(v[y]), to_px(v[x]), to_py(v[y]), plan_kind(v.get("recipe")),
                         bool(v["is_pareto"]), v.get("job_id"), _title(v, x, y)) for v in shown)
    fronts: dict[int | None, list[Point]] = {}
    for p in sorted(points, key=lambda p: (p.x, p.y, p.plan_id)):
        if p.pareto:
            fronts.setdefault(p.job_id, []).append(p)
    lines = tuple((job, " ".join(f"{p.px:.1f},{p.py:.1f}" for p in ps)) for job, ps in fronts.items())
    fp = (to_py(fp_value), f"unquantized model ({y} {_num(fp_value)})") if fp_shown and shown else None
    return Plot(x, y, log, points, lines, _ticks(xs, to_px, False), _ticks(ys, to_py, log), fp,
                len(views) - len(shown))


def _title(v: Mapping[str, Any], x: str, y: str) -> str:
    name = v.get("label") or f"plan {v['id']}"
    return (f"plan {v['id']}: {name}; {x} {_num(v[x])}, {y} {_num(v[y])}"
            f"{', on the Pareto front' if v['is_pareto'] else ''}; click to open")


def _scale(values: Sequence[float], start: float, end: float, *, log: bool) -> Any:
    """value -> pixel between start and end over the values' range padded by 5% (log10 of it on a log axis)."""
    f = math.log10 if log else float
    lo, hi = (min(map(f, values)), max(map(f, values))) if values else (0.0, 1.0)
    pad = (hi - lo) * 0.05 or (abs(hi) * 0.05 or 0.5)
    lo, hi = lo - pad, hi + pad
    return lambda v: start + (f(float(v)) - lo) / (hi - lo) * (end - start)


def _ticks(values: Sequence[float], to_px: Any, log: bool, n: int = 5) -> tuple[tuple[float, str], ...]:
    if not values:
        return ()
    lo, hi = min(values), max(values)
    if log and hi / lo >= 10:
        steps = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        marks = [10.0 ** k for k in steps if lo / 1.5 <= 10.0 ** k <= hi * 1.5]
    else:
        span = hi - lo or abs(hi) or 1.0
        step = 10 ** math.floor(math.log10(span / n))
        step *= next(m for m in (1, 2, 5, 10) if span / (step * m) <= n)
        marks = [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
        decimals = max(0, -math.floor(math.log10(step)))
        return tuple((to_px(m), f"{m:,.{decimals}f}" if abs(m) >= 1e-3 or m == 0 else f"{m:.1e}") for m in marks)
    return tuple((to_px(m), _num(m)) for m in marks)


def _num(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5:
        return f"{v:,.0f}"
    return f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.2e}"
