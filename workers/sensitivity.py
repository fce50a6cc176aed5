"""Sensitivity maths as pure functions: activation statistics, diagonal Fisher, weight and activation costs.

Costs predict the increase of the mean next-token loss (nats per token) when one layer is quantized, in the
second-order Fisher form (ModelOpt AutoQuantize / FGMP, arXiv 2504.14152):

    weight:      dL_w(l, c) = 1/2 sum_i F_ii (w_i - Q_c(w_i))^2
    activation:  dL_x(l, a) = 1/2 sum_{t,j} T (dL/dx_tj)^2 (x_tj - Q_a(x_tj))^2      (per micro-batch, averaged)

Estimator (docs/SENSITIVITY.md): calibration tokens are cut into micro-batches b of T_b predicted tokens; L_b is
the mean loss of the micro-batch and g_b = dL_b/dW. The per-token Fisher E_t[(dl_t/dw)^2] is estimated as
F = mean_b T_b g_b^2, which is unbiased when per-token gradients are independent and zero-mean; correlated
tokens (same sequence) and a non-zero mean gradient bias it upwards, more so for larger micro-batches. For
activations dL_b/dx_t = (1/T_b) dl/dx_t, so T_b (dL_b/dx_t)^2 = (1/T_b)(dl/dx_t)^2 averages the per-token term.

Everything here is tensor-in, tensor-out; `workers/tasks.py` distributes it on Ray.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quant.apply import quantizable_modules, trace_feeders
from quant.modules import linear_layout
from quant.quantizers import (
    act_scale_per_token,
    fake_quantize_weight,
    lae_scales,
    quantize_act_int8,
    smooth_scales,
    static_scale_from_absmax,
)
from quant.schemes import ActScheme, WeightScheme
from workers.table import LayerSensitivity, SensitivityTable

WEIGHT_SCHEMES: tuple[WeightScheme, ...] = tuple(
    WeightScheme(b, g, a) for b, g, a in itertools.product((2, 3, 4, 8), (32, 64, 128, -1), (False, True))
)
ACT_SCHEMES: tuple[ActScheme, ...] = (ActScheme.STATIC, ActScheme.DYNAMIC, ActScheme.LAE, ActScheme.SMOOTH)
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
HIST_LOG10 = (-8.0, 6.0)  # |x| histogram over log10 range, 1024 equal bins (+ under/overflow), mergeable
HIST_BINS = 1024
HIST_EDGES = torch.logspace(*HIST_LOG10, HIST_BINS + 1, dtype=torch.float64)
PERCENTILES = (99.0, 99.9, 99.99)


# -- activation statistics (forward only) -----------------------------------------------------------------
@dataclass
class ActStats:
    """Per-layer input statistics: channel max|X| and a histogram of |x| (both merge by max / sum)."""

    channel_absmax: dict[str, torch.Tensor] = field(default_factory=dict)  # [K] float32
    hist: dict[str, torch.Tensor] = field(default_factory=dict)  # [HIST_BINS + 2] float64 counts
    feeders: dict[str, str] = field(default_factory=dict)  # layer -> norm whose output it reads

    def merge(self, other: ActStats) -> ActStats:
        for name, m in other.channel_absmax.items():
            mine = self.channel_absmax.get(name)
            self.channel_absmax[name] = m if mine is None else torch.maximum(mine, m)
            self.hist[name] = other.hist[name] + self.hist.get(name, 0)
        self.feeders.update(other.feeders)
        return self


def _observe(stats: ActStats, name: str, x: torch.Tensor) -> None:
    a = x.detach().abs().reshape(-1, x.shape[-1]).float()
    m = a.amax(0)
    prev = stats.channel_absmax.get(name)
    stats.channel_absmax[name] = m if prev is None else torch.maximum(prev, m)
    lo, hi = HIST_LOG10
    pos = (torch.log10(a.flatten().clamp_min(1e-30)) - lo) * (HIST_BINS / (hi - lo))
    idx = (pos.floor().clamp(-1, HIST_BINS) + 1).long()  # 0: underflow, HIST_BINS + 1: overflow
    h = torch.bincount(idx, minlength=HIST_BINS + 2).double()
    stats.hist[name] = h + stats.hist.get(name, 0)


@torch.no_grad()
def collect_act_stats(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 8) -> ActStats:
    """Forward passes over `tokens` recording every quantizable layer's input statistics."""
    names = list(quantizable_modules(model))
    modules = dict(model.named_modules())
    stats = ActStats()
    with trace_feeders(model, names) as feeders:
        hooks = [modules[n].register_forward_pre_hook(lambda _m, a, n=n: _observe(stats, n, a[0])) for n in names]
        try:
            for batch in tokens.split(batch_size):
                model(input_ids=batch, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
    stats.feeders = dict(feeders)
    return stats


def percentile_from_hist(hist: torch.Tensor, q: float) -> float:
    """The q-th percentile of |x| from a histogram (the bin's upper edge: overestimates by < 3.2%)."""
    cdf = torch.cumsum(hist, 0) / hist.sum().clamp_min(1)
    i = int(torch.searchsorted(cdf, torch.tensor(q / 100, dtype=cdf.dtype)))  # bin i covers edges[i-1..i]
    return float(HIST_EDGES[min(max(i, 0), HIST_BINS)])


# -- activation quantizers used for the cost (the same arithmetic as the fake-quant modules) ---------------
@dataclass(frozen=True)
class ActQuantParams:
    """What each activation scheme needs for one layer: static scales and equalization vectors."""

    static_scale: torch.Tensor  # scalar: max|X| / 127
    lae_s: torch.Tensor  # [K]
    lae_scale: torch.Tensor  # scalar static scale of X / lae_s
    smooth_s: torch.Tensor  # [K]
    smooth_scale: torch.Tensor  # scalar static scale of X / smooth_s


def act_quant_params(
    channel_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float = 0.5
) -> ActQuantParams:
    """Scales for every activation scheme from calibration statistics (w_absmax: per input channel, over all
    layers sharing the input, as apply_plan folds them)."""
    lae_s = lae_scales(channel_absmax)
    smooth_s = smooth_scales(channel_absmax, w_absmax, alpha)
    return ActQuantParams(
        static_scale=static_scale_from_absmax(channel_absmax.max()),
        lae_s=lae_s,
        lae_scale=static_scale_from_absmax((channel_absmax / lae_s).max()),
        smooth_s=smooth_s,
        smooth_scale=static_scale_from_absmax((channel_absmax / smooth_s).max()),
    )


def act_quant_error(x: torch.Tensor, scheme: ActScheme, p: ActQuantParams) -> torch.Tensor:
    """x - Q_a(x) in the original (un-equalized) space, float32."""
    x = x.float()
    if scheme is ActScheme.DYNAMIC:
        scale = act_scale_per_token(x)
        return x - quantize_act_int8(x, scale).float() * scale
    if scheme is ActScheme.STATIC:
        return x - quantize_act_int8(x, p.static_scale).float() * p.static_scale
    s, scale = (p.lae_s, p.lae_scale) if scheme is ActScheme.LAE else (p.smooth_s, p.smooth_scale)
    return x - quantize_act_int8(x / s, scale).float() * scale * s


# -- Fisher pass (forward + backward) --------------------------------------------------------------------
@dataclass
class FisherSums:
    """Partial sums over micro-batches; merge by addition. Divide by `batches` for the estimate."""

    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_b T_b g_b^2, [N, K] float32
    act_cost: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_b dL_x, [len(ACT_SCHEMES)] float64
    batches: int = 0
    tokens: int = 0
    loss_sum: float = 0.0  # sum_b L_b, for the report

    def merge(self, other: FisherSums) -> FisherSums:
        for name, f in other.fisher.items():
            self.fisher[name] = f + self.fisher[name] if name in self.fisher else f.clone()
            self.act_cost[name] = other.act_cost[name] + self.act_cost.get(name, 0)
        self.batches += other.batches
        self.tokens += other.tokens
        self.loss_sum += other.loss_sum
        return self


@contextmanager
def _act_cost_hooks(
    modules: Mapping[str, nn.Module], params: Mapping[str, ActQuantParams], sums: FisherSums, t_b: list[int]
) -> Iterator[None]:
    """On forward, hand each layer its own view of its input and hook that view's gradient: the gradient that
    reaches the view is dL/dx through this layer only (q, k and v read one tensor). On backward add
    T/2 sum (dL/dx)^2 (x - Q_a(x))^2 per activation scheme. Cheaper than module full-backward hooks."""

    def forward(name: str):
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
            x = args[0]
            if not x.requires_grad:
                return None
            view, saved = x.view_as(x), x.detach()
            view.register_hook(lambda g: _add_act_cost(sums, name, saved, g, params[name], t_b[0]))
            return (view, *args[1:])

        return hook

    hooks = [m.register_forward_pre_hook(forward(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _add_act_cost(sums: FisherSums, name: str, x: torch.Tensor, g: torch.Tensor, p: ActQuantParams, t_b: int) -> None:
    g2 = g.detach().float().pow(2)
    costs = torch.stack([(g2 * act_quant_error(x, a, p).pow(2)).sum() for a in ACT_SCHEMES]).double()
    sums.act_cost[name] = 0.5 * t_b * costs + sums.act_cost.get(name, 0)


def fisher_sums(
    model: nn.Module, tokens: torch.Tensor, params: Mapping[str, ActQuantParams], *, micro_batch: int = 1
) -> FisherSums:
    """Forward + backward over `tokens` in micro-batches: Fisher sums and activation costs of every layer."""
    modules = {n: m for n, m in quantizable_modules(model).items() if n in params}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
    sums, t_b = FisherSums(), [0]
    # Inputs of the first layers must carry gradients although the embedding weights do not.
    embed = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    with _act_cost_hooks(modules, params, sums, t_b):
        for batch in tokens.split(micro_batch):
            t_b[0] = batch.numel() - batch.shape[0]  # predicted tokens: every position but the first
            for m in modules.values():
                m.weight.grad = None
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            for name, m in modules.items():
                f_b = t_b[0] * linear_layout(m, m.weight.grad).float().pow(2)  # T_b g_b^2, [N, K]
                sums.fisher[name] = f_b + sums.fisher[name] if name in sums.fisher else f_b
            sums.batches += 1
            sums.tokens += t_b[0]
            sums.loss_sum += float(loss.detach())
    embed.remove()
    for m in modules.values():
        m.weight.grad = None
    return sums


# -- weight costs (from the reduced Fisher) --------------------------------------------------------------
@dataclass(frozen=True)
class WeightCost:
    """Predicted loss increase of one scheme at its best Fisher-weighted clip ratio, with block scores."""

    cost: float
    clip: float
    blocks: torch.Tensor  # [N, G] per-group predicted loss increase (float16 to stay compact)


def weight_costs(
    w: torch.Tensor, fisher: torch.Tensor, schemes: tuple[WeightScheme, ...] = WEIGHT_SCHEMES
) -> dict[str, WeightCost]:
    """1/2 sum F (W - Q_c(W))^2 for every scheme c that fits K, at the clip ratio minimizing it."""
    w, f = w.detach().float(), fisher.float()
    out: dict[str, WeightCost] = {}
    for scheme in schemes:
        if scheme.group_size(w.shape[1]) > w.shape[1]:
            continue
        clips = _clips(scheme)
        blocks = torch.cat([_clip_sweep(w[rows], f[rows], scheme, clips) for rows in _row_chunks(w, len(clips))], 1)
        totals = blocks.double().sum((1, 2))  # [C]
        best = int(torch.argmin(totals))
        out[str(scheme)] = WeightCost(float(totals[best]), clips[best], blocks[best].to(torch.float16))
    return out


def _clip_sweep(w: torch.Tensor, f: torch.Tensor, scheme: WeightScheme, clips: tuple[float, ...]) -> torch.Tensor:
    """Block costs for every clip ratio at once: [C, rows, G] (rows stacked C times, one clip per copy)."""
    c = torch.tensor(clips, dtype=w.dtype).repeat_interleave(w.shape[0])[:, None]  # [C * rows, 1]
    n = len(clips)
    return block_costs(w.repeat(n, 1), f.repeat(n, 1), scheme, c).reshape(n, w.shape[0], -1)


def _row_chunks(w: torch.Tensor, copies: int, max_elements: int = 1 << 24) -> list[slice]:
    """Row ranges small enough that `copies` stacked copies stay under max_elements."""
    step = max(1, max_elements // (copies * w.shape[1]))
    return [slice(i, i + step) for i in range(0, w.shape[0], step)]


def block_costs(
    w: torch.Tensor, f: torch.Tensor, scheme: WeightScheme, clip: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Per-group 1/2 sum F (W - Q(W))^2, [N, G] (K zero-padded to whole groups, as the quantizer does)."""
    g = scheme.group_size(w.shape[1])
    err = 0.5 * f * (w - fake_quantize_weight(w, scheme, clip)) ** 2  # [N, K]
    return F.pad(err, (0, -w.shape[1] % g)).reshape(w.shape[0], -1, g).sum(-1)


def _clips(scheme: WeightScheme) -> tuple[float, ...]:
    return (1.0,) if scheme.bits >= 8 else CLIP_GRID


def spearman(a: list[float] | torch.Tensor, b: list[float] | torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties): how well predicted costs order measured ones."""
    ra, rb = _ranks(torch.as_tensor(a, dtype=torch.float64)), _ranks(torch.as_tensor(b, dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for v in torch.unique(x):  # ties share their average rank
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


# -- assembling the table ---------------------------------------------------------------------------------
def layer_act_params(model: nn.Module, stats: ActStats, alpha: float = 0.5) -> dict[str, ActQuantParams]:
    """ActQuantParams per layer; SmoothQuant's max|W_j| spans every layer reading the same norm output,
    exactly as apply_plan folds one shared scale into that norm."""
    modules = quantizable_modules(model)
    w_absmax = {n: linear_layout(m, m.weight).detach().abs().amax(0).float() for n, m in modules.items()}
    groups: dict[str, list[str]] = {}
    for name, norm in stats.feeders.items():
        groups.setdefault(norm, []).append(name)
    shared = {n: torch.stack([w_absmax[x] for x in members]).amax(0) for members in groups.values() for n in members}
    return {n: act_quant_params(stats.channel_absmax[n], shared.get(n, w_absmax[n]), alpha) for n in modules}


def build_table(
    net: nn.Module,
    stats: ActStats,
    sums: FisherSums,
    costs: Mapping[str, Mapping[str, WeightCost]],
    **meta: Any,
) -> SensitivityTable:
    """Reduce partial sums into a SensitivityTable (`meta`: key, model, calibration, estimator)."""
    layers, tensors = [], {}
    for name, module in quantizable_modules(net).items():
        act = sums.act_cost[name] / max(sums.batches, 1)
        absmax = stats.channel_absmax[name]
        layers.append(LayerSensitivity(
            name=name,
            shape=tuple(linear_layout(module, module.weight).shape),
            feeder=stats.feeders.get(name),
            weight_cost={"w16": 0.0, **{s: c.cost for s, c in costs[name].items()}},
            clip={s: c.clip for s, c in costs[name].items()},
            act_cost={"a16": 0.0, **{a.value: float(v) for a, v in zip(ACT_SCHEMES, act, strict=True)}},
            act_absmax=float(absmax.max()),
            act_percentiles={f"p{q:g}": percentile_from_hist(stats.hist[name], q) for q in PERCENTILES},
        ))
        tensors[f"channel_absmax/{name}"] = absmax
        tensors |= {f"blocks/{name}/{s}": c.blocks for s, c in costs[name].items()}
    estimator = {**meta.pop("estimator", {}), "batches": sums.batches, "tokens": sums.tokens,
                 "loss": sums.loss_sum / max(sums.batches, 1)}
    return SensitivityTable(layers=tuple(layers), tensors=tensors, estimator=estimator, **meta)
