"""apply_plan: calibrate what a plan needs, equalize, and swap targeted layers for fake-quant modules.

Works on any model whose quantizable layers are `nn.Linear` or GPT-2's `Conv1D` (Llama, Qwen2, OPT,
GPT-NeoX, GPT-2, ...). Which norm feeds which layers is traced from one calibration forward pass (a layer is
fed by a norm when its input *is* that norm's output tensor), so no per-architecture table is needed.

Equalization (a8-lae, a8-smooth: strategies whose handler equalizes) divides the input channels by s and
multiplies the weight columns by s. Where a norm feeds the layer and every quantizable consumer of that norm
uses the same equalization, s is shared by them and folded into the norm's weight (and bias); otherwise the
layer keeps a runtime pre-scale. What a strategy calibrates and how it simulates activations is its handler's
business (`quant.act_handlers`): nothing here tests which strategy a layer uses.

The module swapped in is built by a `ModuleFactory` with FakeQuantLinear's constructor signature: the
simulation (FakeQuantLinear, the default) and the materialized model (`quant.qlinear.QuantLinear.from_float`,
see `quant.artifact`) go through the same calibration, equalization and folding, so they cannot drift apart.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn

from quantplan.errors import PlanError
from quantplan.progress import Progress, reporting
from quantplan.quant.act_handlers import ActParams, act_handler
from quantplan.quant.modules import LINEAR_TYPES, FakeQuantLinear, linear_shape, linear_weight
from quantplan.quant.plan import LayerSpec, Plan, PlanCost, specs_cost

log = logging.getLogger(__name__)

_NORM_DENYLIST = ("Gemma",)  # norms computing x * (1 + w): dividing w by s would be wrong


class ModuleFactory(Protocol):
    """Builds the module that replaces one layer; FakeQuantLinear and QuantLinear.from_float are factories."""

    def __call__(
        self,
        weight: torch.Tensor,  # W diag(s) [N, K]: the equalization s is already multiplied in
        bias: torch.Tensor | None,
        spec: LayerSpec,
        *,
        act_scale: torch.Tensor | None = None,  # static per-tensor scale (a8-static, a8-lae, a8-smooth)
        pre_scale: torch.Tensor | None = None,  # s [K] when it could not be folded into a norm
        act_params: ActParams | None = None,  # the strategy's calibrated tensors (its handler's `calibrate`)
    ) -> nn.Module: ...


@dataclass
class ApplyReport:
    """What apply_plan did: replaced layers, folded norms (and their s), layers that kept a runtime pre-scale,
    and the resolved spec of every quantized layer (so no caller resolves the plan again)."""

    replaced: list[str] = field(default_factory=list)
    folded: dict[str, list[str]] = field(default_factory=dict)  # norm -> layers sharing its scale
    prescaled: list[str] = field(default_factory=list)
    cost: PlanCost | None = None
    norm_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # norm -> s [K] divided out of it
    specs: dict[str, LayerSpec] = field(default_factory=dict)  # quantized layer -> its spec, in module order


@dataclass
class CalibrationStats:
    """Per-input-channel max|X| of layers over the calibration tokens, and which norm feeds each layer."""

    absmax: dict[str, torch.Tensor]  # layer -> [K] float32
    feeders: dict[str, str]  # layer -> norm whose output is the layer's input (every quantizable layer)


def quantizable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv1D layers in module order, excluding the output head (tied to the embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and m is not head}


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(N, K) of every quantizable layer: the input of `Plan.cost`."""
    return {name: linear_shape(m) for name, m in quantizable_modules(model).items()}


def validate_plan(model: nn.Module, plan: Plan, resolved: Mapping[str, LayerSpec] | None = None) -> PlanCost:
    """Check that `plan` fits `model` (names, group sizes) before any work is done; returns its cost.
    `resolved`: the plan's `resolve_plan(model, plan)`, when the caller has it."""
    specs = resolve_plan(model, plan) if resolved is None else resolved
    return specs_cost(specs, layer_shapes(model))


def needs_calibration(model: nn.Module, plan: Plan, resolved: Mapping[str, LayerSpec] | None = None) -> bool:
    """True when some layer of `model` gets a static or equalized activation scheme under `plan`."""
    specs = resolve_plan(model, plan) if resolved is None else resolved
    return any(s.scheme.act.needs_calibration for s in specs.values() if s.scheme.quantized)


def resolve_plan(model: nn.Module, plan: Plan) -> dict[str, LayerSpec]:
    """The spec of every quantizable layer; a plan key that matches no layer is an error (a typo)."""
    modules = quantizable_modules(model)
    unused = [k for k in plan.unused_keys(modules) if not k.startswith("re:")]
    if unused:
        raise PlanError(
            f"plan names module(s) not among this model's quantizable layers: {', '.join(unused[:5])}; "
            f"check the names (e.g. {next(iter(modules), '?')}) or use a 're:' pattern"
        )
    return {name: plan.resolve(name) for name in modules}


def apply_plan(
    model: nn.Module,
    plan: Plan,
    calibration: torch.Tensor | Any | None = None,
    *,
    batch_size: int = 8,
    quantize_activations: bool = True,
    module_factory: ModuleFactory | None = None,
    resolved: Mapping[str, LayerSpec] | None = None,
    progress: bool | Progress = False,
    stats: CalibrationStats | None = None,
) -> ApplyReport:
    """Swap the layers the plan targets for FakeQuantLinear modules (or `module_factory`'s), in place.

    `calibration` ([samples, seq_len] token ids, or an object with `.tokens`) is needed when any targeted
    layer uses a8-static, a8-lae or a8-smooth. `quantize_activations=False` keeps the equalization but
    simulates activations in float (isolates the equalization transform; FakeQuantLinear only). `resolved` is
    `resolve_plan(model, plan)` when the caller has it; the report's `specs` hand the resolved specs on.
    `progress` reports the layers as they are swapped (step "quantize layers"). `stats`: this model's
    `collect_input_stats` on the calibration tokens for (at least) every layer that needs calibration, when the
    caller has them (several plans of one model share them); `calibration` is then not read.
    """
    if module_factory is None:
        module_factory = partial(FakeQuantLinear, quantize_activations=quantize_activations)
    elif not quantize_activations:
        raise ValueError("quantize_activations=False applies to the FakeQuantLinear simulation only")
    resolved = resolve_plan(model, plan) if resolved is None else resolved
    specs = {n: s for n, s in resolved.items() if s.scheme.quantized}
    report = ApplyReport(cost=validate_plan(model, plan, resolved), specs=specs)
    need_stats = [n for n, s in specs.items() if s.scheme.act.needs_calibration]
    with reporting(progress) as reporter:
        if need_stats and stats is not None:
            missing = [n for n in need_stats if n not in stats.absmax]
            if missing:
                raise ValueError(f"the calibration stats lack {len(missing)} layers the plan needs, e.g. {missing[0]}")
            stats = CalibrationStats({n: stats.absmax[n] for n in need_stats}, dict(stats.feeders))
        elif need_stats:
            tokens = _calibration_tokens(calibration, [specs[n] for n in need_stats])
            stats = collect_input_stats(model, tokens, need_stats, batch_size=batch_size, progress=reporter)
        else:
            stats = CalibrationStats({}, {})
        modules = dict(model.named_modules())
        scales = _equalization_scales(modules, specs, stats, report)
        step = reporter.step("quantize layers", len(specs), "layers") if reporter.enabled else None
        for name, spec in specs.items():
            _swap(model, modules, name, spec, stats.absmax.get(name), scales.get(name), report, module_factory)
            if step is not None:
                step.advance()
    log.info(
        "applied plan: %d layers quantized, %d norms folded, %d runtime pre-scales",
        len(report.replaced),
        len(report.folded),
        len(report.prescaled),
    )
    return report


def _calibration_tokens(calibration: Any, specs: list[LayerSpec]) -> torch.Tensor:
    tokens = getattr(calibration, "tokens", calibration)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.numel() == 0:
        schemes = sorted({str(s.scheme.act) for s in specs})
        raise PlanError(
            f"the plan uses {', '.join(schemes)} which need calibration data; pass calibration tokens "
            "(on the command line: --calib-data)"
        )
    return tokens


@torch.inference_mode()
def collect_input_stats(
    model: nn.Module, tokens: torch.Tensor, names: list[str], *, batch_size: int = 8,
    progress: bool | Progress = False,
) -> CalibrationStats:
    """Per-channel max|X| of each named layer's input over `tokens`; the feeding norm of every layer.

    The forwards go through the trunk that holds every layer when there is one (a transformers model's base
    model: the [tokens, vocabulary] logits are not needed); `progress` reports the windows (step
    "calibration")."""
    modules = dict(model.named_modules())
    absmax: dict[str, torch.Tensor] = {}
    trunk = model_trunk(model, list(quantizable_modules(model)))
    with trace_feeders(model, list(quantizable_modules(model))) as feeders, reporting(progress) as reporter:
        hooks = [modules[n].register_forward_pre_hook(_absmax_hook(n, absmax)) for n in names]
        step = reporter.step("calibration", tokens.shape[0], "windows") if reporter.enabled else None
        try:
            device = next(model.parameters()).device
            for batch in tokens.split(batch_size):
                trunk(input_ids=batch.to(device), use_cache=False)
                if step is not None:
                    step.advance(batch.shape[0])
        finally:
            for h in hooks:
                h.remove()
    return CalibrationStats(absmax, dict(feeders))


def model_trunk(model: nn.Module, names: list[str]) -> nn.Module:
    """The transformers base model (the decoder without its head) when it holds every layer in `names`."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module) and base is not model and all(n.startswith(prefix + ".") for n in names):
        return base
    return model


def _absmax_hook(name: str, out: dict[str, torch.Tensor]):
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach()
        m = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
        out[name] = torch.maximum(out[name], m) if name in out else m

    return hook


def _is_foldable_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    is_norm = isinstance(module, nn.LayerNorm) or name.endswith(("RMSNorm", "LayerNorm"))
    return (
        is_norm
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 1
        and not any(d in name for d in _NORM_DENYLIST)
    )


@contextmanager
def trace_feeders(model: nn.Module, names: list[str]) -> Iterator[dict[str, str]]:
    """Map layer -> norm whose output tensor is exactly the layer's input (seen on the first call)."""
    modules = dict(model.named_modules())
    norms = {n: m for n, m in modules.items() if _is_foldable_norm(m)}
    last_out: dict[str, torch.Tensor] = {}
    feeders: dict[str, str] = {}
    seen: set[str] = set()

    def norm_hook(name: str):
        def hook(_m: nn.Module, _args: Any, output: torch.Tensor) -> None:
            last_out[name] = output

        return hook

    def layer_hook(name: str):
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if name in seen:
                return
            seen.add(name)
            feeder = next((n for n, out in last_out.items() if out is args[0]), None)
            if feeder is not None:
                feeders[name] = feeder

        return hook

    hooks = [m.register_forward_hook(norm_hook(n)) for n, m in norms.items()]
    hooks += [modules[n].register_forward_pre_hook(layer_hook(n)) for n in names]
    try:
        yield feeders
    finally:
        for h in hooks:
            h.remove()
        last_out.clear()


def _equalization_scales(
    modules: Mapping[str, nn.Module],
    specs: Mapping[str, LayerSpec],
    stats: CalibrationStats,
    report: ApplyReport,
) -> dict[str, torch.Tensor]:
    """s per equalized layer; folds a shared s into a norm when all the norm's consumers agree on it."""
    consumers: dict[str, list[str]] = defaultdict(list)
    for name, norm in stats.feeders.items():
        consumers[norm].append(name)
    scales: dict[str, torch.Tensor] = {}
    for norm, layers in consumers.items():
        if not all(n in specs and specs[n].scheme.act.equalized for n in layers):
            continue  # an unquantized or non-equalized consumer would see the rescaled norm output
        first = specs[layers[0]]
        if any(_eq_key(specs[n]) != _eq_key(first) for n in layers):
            continue
        s = _scale(first, stats.absmax[layers[0]], [linear_weight(modules[n]) for n in layers])
        _fold_into_norm(modules[norm], s)
        scales.update(dict.fromkeys(layers, s))
        report.folded[norm] = list(layers)
        report.norm_scales[norm] = s
    for name, spec in specs.items():
        if spec.scheme.act.equalized and name not in scales:
            scales[name] = _scale(spec, stats.absmax[name], [linear_weight(modules[name])])
            report.prescaled.append(name)
    return scales


def _eq_key(spec: LayerSpec) -> tuple[Any, ...]:
    return spec.scheme.act, act_handler(spec.scheme.act).equalization_key(spec.alpha)


def _scale(spec: LayerSpec, x_absmax: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    w_absmax = torch.cat([w.detach().float() for w in weights]).abs().amax(0)  # [K] over all consumers
    return act_handler(spec.scheme.act).equalization(x_absmax, w_absmax, spec.alpha)


@torch.no_grad()
def _fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))


def _swap(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    name: str,
    spec: LayerSpec,
    x_absmax: torch.Tensor | None,
    s: torch.Tensor | None,
    report: ApplyReport,
    module_factory: ModuleFactory,
) -> None:
    module = modules[name]
    weight = linear_weight(module).detach()
    if s is not None:
        weight = weight * s.to(weight.dtype)  # W' = W diag(s)
    params: dict[str, torch.Tensor] = {}
    if spec.scheme.act.needs_calibration and x_absmax is not None:
        x_eq = x_absmax if s is None else x_absmax / s  # max|X'| per channel, X' = X / s
        params = act_handler(spec.scheme.act).calibrate(x_eq)
    prescaled = s is not None and name in report.prescaled
    new = module_factory(weight, module.bias, spec, act_params=params, pre_scale=s if prescaled else None)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    report.replaced.append(name)
