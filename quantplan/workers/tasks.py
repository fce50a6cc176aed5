"""Ray tasks: the sensitivity pass distributed over calibration shards (the only module that says ray.remote).

One worker runs the fused pass (`workers.sensitivity.sensitivity_pass`: one forward per token) in one task.
Several workers run data-parallel stages, each a set of tasks returning partial results that the driver
reduces: Fisher sums with statistics on the sequences before the activation-cost set, together with the act
set's statistics (forward); then Fisher sums with activation costs on the act set; then weight costs per chunk
of layers from the reduced Fisher. Shards are whole micro-batches, so any number of workers sums the same
micro-batch terms (only the float summation order differs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import reduce
from typing import Any

import ray
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from quantplan.errors import QuantPlanError
from quantplan.net import AddressError, unreachable
from quantplan.quant.apply import quantizable_modules
from quantplan.quant.modules import linear_layout
from quantplan.workers.evaluate import EvalResult, evaluate
from quantplan.workers.plan_eval import PlanEval, evaluate_plan
from quantplan.workers.sensitivity import (
    ActStats,
    FisherSums,
    WeightCost,
    act_set_start,
    batch_plan,
    build_table,
    collect_act_stats,
    default_max_memory,
    fisher_sums,
    layer_act_params,
    sensitivity_pass,
    weight_costs,
)
from quantplan.workers.table import SensitivityTable

log = logging.getLogger(__name__)

RAY_ADDRESS_ENV = "QUANTPLAN_RAY_ADDRESS"
MAX_RETRIES = 2  # a task runs at most 3 times before the computation fails with its error


class RayError(QuantPlanError):
    """Ray could not be reached, or a task failed after its retries."""


def ray_address(address: str | None = None) -> str | None:
    """--ray-address, else QUANTPLAN_RAY_ADDRESS, else None (a local Ray instance)."""
    return address or os.environ.get(RAY_ADDRESS_ENV) or None


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to the cluster at `address`, or start a local Ray sized to this machine; reuse a live one."""
    address = ray_address(address)
    if address and address not in ("auto", "local"):
        _check_reachable(address)
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if not address or address == "local":
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
    try:
        ray.init(address=None if address == "local" else address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayError(f"cannot start or join Ray at {address or 'a local instance'}: {e}") from None
    log.info("ray: %s with %s CPUs", address or "local instance", ray.cluster_resources().get("CPU"))


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an address nobody listens on (Ray itself would retry for a minute)."""
    try:
        why = unreachable(address, timeout)
    except AddressError as e:
        raise RayError(str(e)) from None
    if why is not None:
        raise RayError(
            f"cannot reach the Ray cluster at {address}: {why}; start it (`ray start --head`) or "
            "leave out --ray-address to use a local Ray instance"
        )


def _threads(workers: int) -> int:
    """CPUs per task: the cluster's CPUs shared by `workers` tasks, but never more than one node has (a task
    asking for more than the largest node could never be scheduled on a cluster of small nodes)."""
    total = int(ray.cluster_resources().get("CPU", 1))
    largest = max((int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
    return max(1, min(largest, total // workers))


# -- remote functions (each sets its torch threads to the CPUs Ray gave it) -----------------------------------
@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _pass_task(model: nn.Module, tokens: torch.Tensor, micro_batch: int, act_samples: int | None,
               max_memory: int, threads: int) -> tuple[ActStats, FisherSums]:
    torch.set_num_threads(threads)
    return sensitivity_pass(model.float(), tokens, micro_batch=micro_batch, act_samples=act_samples,
                            max_memory=max_memory)


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _stats_task(model: nn.Module, tokens: torch.Tensor, batch_size: int, threads: int) -> tuple[ActStats, FisherSums]:
    torch.set_num_threads(threads)
    return collect_act_stats(model.float(), tokens, batch_size=batch_size), FisherSums()


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _fisher_task(model: nn.Module, tokens: torch.Tensor, params: dict | None, micro_batch: int, batch_size: int,
                 threads: int) -> tuple[ActStats, FisherSums]:
    torch.set_num_threads(threads)
    stats = ActStats()  # recorded on a Fisher-only shard (no parameters); an act-set shard's are known already
    sums = fisher_sums(model.float(), tokens, params, micro_batch=micro_batch, batch_size=batch_size,
                       stats=stats if params is None else None)
    return stats, sums


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _weight_task(items: list[tuple[str, torch.Tensor, torch.Tensor]], threads: int) -> dict[str, dict]:
    torch.set_num_threads(threads)
    return {name: weight_costs(w, f) for name, w, f in items}


# -- driver ---------------------------------------------------------------------------------------------------
def compute_sensitivity(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    workers: int = 1,
    micro_batch: int = 1,
    act_samples: int | None = None,
    max_memory: int | None = None,
    address: str | None = None,
    threads: int | None = None,
    progress: bool = False,
    **meta: Any,
) -> SensitivityTable:
    """The SensitivityTable of `model` on calibration `tokens` [samples, seq_len], on `workers` Ray workers
    (activation costs on the last `act_samples` sequences: `workers.sensitivity.act_set_start`), each sizing its
    batches to `max_memory` bytes (default `default_max_memory`: see `workers.sensitivity.batch_plan`).

    Each task gets `threads` CPUs and torch threads (default: the cluster's CPUs / workers).
    `meta` (key, model_info, calibration, estimator) is stored in the table as given.
    """
    if not quantizable_modules(model):
        raise QuantPlanError("the model has no quantizable layer (nn.Linear or Conv1D besides the output head)")
    init_ray(address)
    threads = threads or _threads(workers)
    opts = {"num_cpus": threads}
    max_memory = max_memory or default_max_memory(model, workers)
    model_ref = ray.put(model.eval())
    with _progress(progress) as track:
        if workers == 1:  # one process: the fused pass, one forward per token
            stats, sums = track("sensitivity pass", [_pass_task.options(**opts).remote(
                model_ref, tokens, micro_batch, act_samples, max_memory, threads)])[0]
        else:
            batch_size = batch_plan(model, tokens.shape[1], micro_batch, max_memory)[0]
            stats, sums = _parallel_pass(model, model_ref, tokens, workers, micro_batch, act_samples, batch_size,
                                         opts, track)
        chunks = _layer_chunks(model, sums, 2 * workers)
        costs: dict[str, dict[str, WeightCost]] = {}
        for part in track("weight costs", [_weight_task.options(**opts).remote(c, threads) for c in chunks]):
            costs |= part
    model_info = meta.pop("model_info", {})
    return build_table(model, stats, sums, costs, model=model_info, **meta)


def _parallel_pass(
    model: nn.Module, model_ref: ray.ObjectRef, tokens: torch.Tensor, workers: int, micro_batch: int,
    act_samples: int | None, batch_size: int, opts: dict, track: Callable[[str, list], list],
) -> tuple[ActStats, FisherSums]:
    """The pass on several workers: tasks over shards of the sequences before the act set run the Fisher pass
    and record statistics, while tasks over shards of the act set record its statistics (a forward); then,
    with every statistic known, tasks over the act set's shards run the Fisher pass with activation costs."""
    start = act_set_start(tokens, micro_batch, act_samples)
    threads = opts["num_cpus"]
    head = _shards(tokens[:start], micro_batch, 2 * workers) if start else []
    first = track("Fisher pass and statistics", [
        *(_fisher_task.options(**opts).remote(model_ref, s, None, micro_batch, batch_size, threads) for s in head),
        *(_stats_task.options(**opts).remote(model_ref, s, batch_size, threads)
          for s in _shards(tokens[start:], micro_batch, 2 * workers))])
    stats = reduce(ActStats.merge, (s for s, _ in first))
    sums = reduce(FisherSums.merge, (f for _, f in first))
    params = layer_act_params(model, stats)
    for _, part in track("activation costs", [
            _fisher_task.options(**opts).remote(model_ref, s, params, micro_batch, batch_size, threads)
            for s in _shards(tokens[start:], micro_batch, 2 * workers)]):
        sums.merge(part)
    return stats, sums


def _shards(tokens: torch.Tensor, micro_batch: int, n: int) -> list[torch.Tensor]:
    """Split into at most n shards of whole micro-batches."""
    batches = -(-tokens.shape[0] // micro_batch)
    per = -(-batches // min(n, batches)) * micro_batch
    return list(tokens.split(per))


def _layer_chunks(model: nn.Module, sums: FisherSums, n: int) -> list[list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Layers with their weight and Fisher estimate, dealt into n chunks of similar size."""
    chunks: list[list] = [[] for _ in range(n)]
    sizes = [0] * n
    modules = quantizable_modules(model)
    for name in sorted(modules, key=lambda x: -modules[x].weight.numel()):
        i = sizes.index(min(sizes))
        w = linear_layout(modules[name], modules[name].weight).detach().float()
        chunks[i].append((name, w, sums.fisher[name] / max(sums.batches, 1)))
        sizes[i] += w.numel()
    return [c for c in chunks if c]


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, list], list]]:
    """Yields track(stage, refs) -> results, which waits for the tasks as they finish and advances a bar."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), disable=not enabled)  # stdout carries results (--json)

    def track(stage: str, refs: list) -> list:
        task = bar.add_task(stage, total=len(refs))
        order, pending, done = {r: i for i, r in enumerate(refs)}, list(refs), {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done[order[ready[0]]] = _get(ready[0], stage)
            bar.advance(task)
        return [done[i] for i in range(len(refs))]

    with bar:
        yield track


def _get(ref: ray.ObjectRef, stage: str) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        raise RayError(f"{stage} task failed after {MAX_RETRIES + 1} attempts: {_cause(e)}") from None
    except ray.exceptions.RayError as e:
        raise RayError(f"{stage} task failed after {MAX_RETRIES + 1} attempts ({type(e).__name__}): {e}") from None


def _cause(e: ray.exceptions.RayTaskError) -> str:
    cause = getattr(e, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(e).splitlines()[-1]


# -- measured evaluation of candidate plans (search re-scores its top candidates here) -----------------------


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _base_task(model: nn.Module, windows: torch.Tensor, threads: int) -> EvalResult:
    torch.set_num_threads(threads)
    return evaluate(model.float(), windows)


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _eval_task(model: nn.Module, plan: Any, windows: torch.Tensor, calibration: torch.Tensor | None,
               base: EvalResult, threads: int) -> PlanEval:
    torch.set_num_threads(threads)
    return evaluate_plan(model.float(), plan, windows, calibration, base_result=base)


def evaluate_plans(
    model: nn.Module,
    plans: Sequence[Any],
    windows: torch.Tensor,
    calib_tokens: torch.Tensor | None,
    *,
    workers: int = 1,
    address: str | None = None,
    progress: bool = False,
    base: EvalResult | None = None,
) -> list[PlanEval]:
    """Perplexity and KL(base || quantized) of `model` under each `quant.plan.Plan` on held-out `windows`,
    one Ray task per plan on `workers` workers; results in the order of `plans`. `base` is the unquantized
    model's result on the same windows when the caller has it (from `evaluate_base`); else it is measured."""
    if not plans:
        return []
    init_ray(address)
    threads = _threads(workers)
    opts = {"num_cpus": threads}
    model_ref, windows_ref, calib_ref = ray.put(model.eval()), ray.put(windows), ray.put(calib_tokens)
    with _progress(progress) as track:
        if base is None:
            base = track("unquantized model", [_base_task.options(**opts).remote(model_ref, windows_ref, threads)])[0]
        return track("plan evaluation", [
            _eval_task.options(**opts).remote(model_ref, plan, windows_ref, calib_ref, base, threads) for plan in plans
        ])


def evaluate_base(model: nn.Module, windows: torch.Tensor, *, workers: int = 1, address: str | None = None,
                  progress: bool = False) -> EvalResult:
    """The unquantized model's result on `windows` (a Ray task), to pass as `evaluate_plans(base=...)`."""
    init_ray(address)
    threads = _threads(workers)
    with _progress(progress) as track:
        task = _base_task.options(num_cpus=threads).remote(ray.put(model.eval()), ray.put(windows), threads)
        return track("unquantized model", [task])[0]
