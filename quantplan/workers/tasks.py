"""Ray tasks: the sensitivity pass distributed over calibration shards (the only module that says ray.remote).

One worker runs the fused pass (`workers.sensitivity.sensitivity_pass`: one forward per token) in one task.
Several workers run data-parallel stages, each a set of tasks returning partial results that the driver
reduces: Fisher sums with statistics on the sequences before the activation-cost set, together with the act
set's statistics (forward); then Fisher sums with activation costs on the act set; then weight costs per chunk
of layers from the reduced Fisher. Shards are whole micro-batches, so any number of workers sums the same
micro-batch terms (only the float summation order differs).

Progress (`quantplan.progress`): when someone listens, the tasks count their units (windows, layers) into a
tally actor and the driver, waiting on the tasks, reads it every `POLL_S` seconds into the step it reports,
re-reporting an unchanged count at least every `KEEPALIVE_S` seconds (a batch of long windows can take longer).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch
from torch import nn

from quantplan.errors import QuantPlanError
from quantplan.net import AddressError, unreachable
from quantplan.progress import Progress, ProgressEvent, Step, reporting
from quantplan.quant.apply import CalibrationStats, collect_input_stats, needs_calibration, quantizable_modules
from quantplan.quant.modules import linear_layout
from quantplan.workers.evaluate import EvalResult, evaluate, evaluate_many, increments, merge_results
from quantplan.workers.plan_eval import PlanEval, evaluate_plans_together, merge_plan_evals
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
    pass_windows,
    sensitivity_pass,
    weight_costs,
)
from quantplan.workers.table import SensitivityTable

log = logging.getLogger(__name__)

RAY_ADDRESS_ENV = "QUANTPLAN_RAY_ADDRESS"
MAX_RETRIES = 2  # a task runs at most 3 times before the computation fails with its error
POLL_S = 0.5  # how often the driver reads the tasks' tally while they run
KEEPALIVE_S = 2.0  # an unchanged count is reported again after this long (fresh elapsed time and eta)


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
@ray.remote(num_cpus=0)
class _Tally:
    """Units done by the tasks of one driver call, by step: the tasks add, the driver reads."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, step: str, k: int) -> None:
        self.counts[step] = self.counts.get(step, 0) + k

    def get(self, step: str) -> int:
        return self.counts.get(step, 0)


@dataclass(frozen=True)
class _Count:
    """count(k): k more units of `step` done, sent to the tally without waiting (a task's on_windows)."""

    tally: Any  # ray.actor.ActorHandle of _Tally
    step: str

    def __call__(self, k: int) -> None:
        self.tally.add.remote(self.step, k)


Count = _Count | None


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _pass_task(model: nn.Module, tokens: torch.Tensor, micro_batch: int, act_samples: int | None,
               max_memory: int, threads: int, count: Count = None) -> tuple[ActStats, FisherSums]:
    torch.set_num_threads(threads)
    return sensitivity_pass(model.float(), tokens, micro_batch=micro_batch, act_samples=act_samples,
                            max_memory=max_memory, on_windows=count)


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _stats_task(model: nn.Module, tokens: torch.Tensor, batch_size: int, threads: int,
                count: Count = None) -> tuple[ActStats, FisherSums]:
    torch.set_num_threads(threads)
    return collect_act_stats(model.float(), tokens, batch_size=batch_size, on_windows=count), FisherSums()


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _fisher_task(model: nn.Module, tokens: torch.Tensor, params: dict | None, micro_batch: int, batch_size: int,
                 threads: int, count: Count = None) -> tuple[ActStats, FisherSums]:
    torch.set_num_threads(threads)
    stats = ActStats()  # recorded on a Fisher-only shard (no parameters); an act-set shard's are known already
    sums = fisher_sums(model.float(), tokens, params, micro_batch=micro_batch, batch_size=batch_size,
                       stats=stats if params is None else None, on_windows=count)
    return stats, sums


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _weight_task(items: list[tuple[str, torch.Tensor, torch.Tensor]], threads: int,
                 count: Count = None) -> dict[str, dict]:
    torch.set_num_threads(threads)
    out = {}
    for name, w, f in items:
        out[name] = weight_costs(w, f)
        if count is not None:
            count(1)
    return out


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
    progress: bool | Progress = False,
    **meta: Any,
) -> SensitivityTable:
    """The SensitivityTable of `model` on calibration `tokens` [samples, seq_len], on `workers` Ray workers
    (activation costs on the last `act_samples` sequences: `workers.sensitivity.act_set_start`), each sizing its
    batches to `max_memory` bytes (default `default_max_memory`: see `workers.sensitivity.batch_plan`).

    Each task gets `threads` CPUs and torch threads (default: the cluster's CPUs / workers).
    `meta` (key, model_info, calibration, estimator) is stored in the table as given. `progress` reports the
    steps "sensitivity pass" (windows, across all workers) and "weight costs" (layers).
    """
    if not quantizable_modules(model):
        raise QuantPlanError("the model has no quantizable layer (nn.Linear or Conv1D besides the output head)")
    init_ray(address)
    threads = threads or _threads(workers)
    opts = {"num_cpus": threads}
    max_memory = max_memory or default_max_memory(model, workers)
    model_ref = ray.put(model.eval())
    with _tracking(progress) as track:
        if workers == 1:  # one process: the fused pass, one forward per token
            total = pass_windows(model, tokens, micro_batch=micro_batch, act_samples=act_samples,
                                 max_memory=max_memory)
            stats, sums = track(PASS_STEP, [_pass_task.options(**opts).remote(
                model_ref, tokens, micro_batch, act_samples, max_memory, threads, track.count(PASS_STEP))],
                total)[0]
        else:
            batch_size = batch_plan(model, tokens.shape[1], micro_batch, max_memory)[0]
            stats, sums = _parallel_pass(model, model_ref, tokens, workers, micro_batch, act_samples, batch_size,
                                         opts, track)
        chunks = _layer_chunks(model, sums, 2 * workers)
        costs: dict[str, dict[str, WeightCost]] = {}
        count = track.count("weight costs")
        track("weight costs", [_weight_task.options(**opts).remote(c, threads, count) for c in chunks],
              sum(map(len, chunks)), "layers", on_result=costs.update)
    model_info = meta.pop("model_info", {})
    return build_table(model, stats, sums, costs, model=model_info, **meta)


PASS_STEP = "sensitivity pass"


def _parallel_pass(
    model: nn.Module, model_ref: ray.ObjectRef, tokens: torch.Tensor, workers: int, micro_batch: int,
    act_samples: int | None, batch_size: int, opts: dict, track: _Track,
) -> tuple[ActStats, FisherSums]:
    """The pass on several workers: tasks over shards of the sequences before the act set run the Fisher pass
    and record statistics, while tasks over shards of the act set record its statistics (a forward); then,
    with every statistic known, tasks over the act set's shards run the Fisher pass with activation costs.
    Progress: one step over every window pass (the act set's windows count twice: statistics, then Fisher)."""
    start = act_set_start(tokens, micro_batch, act_samples)
    threads = opts["num_cpus"]
    head = _shards(tokens[:start], micro_batch, 2 * workers) if start else []
    count = track.count(PASS_STEP)
    step = track.step(PASS_STEP, start + 2 * (tokens.shape[0] - start))
    stats, sums = ActStats(), FisherSums()

    def add(part: tuple[ActStats, FisherSums]) -> None:  # reduced as they arrive: one partial set held at a time
        stats.merge(part[0])
        sums.merge(part[1])

    track(step, [
        *(_fisher_task.options(**opts).remote(model_ref, s, None, micro_batch, batch_size, threads, count)
          for s in head),
        *(_stats_task.options(**opts).remote(model_ref, s, batch_size, threads, count)
          for s in _shards(tokens[start:], micro_batch, 2 * workers))], end=False, on_result=add)
    params = layer_act_params(model, stats)
    track(step, [_fisher_task.options(**opts).remote(model_ref, s, params, micro_batch, batch_size, threads, count)
                 for s in _shards(tokens[start:], micro_batch, 2 * workers)], on_result=add)
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


class _Track:
    """track(step, refs, total, unit) -> the tasks' results in order, reporting the step while waiting: the
    tally's count of `step` when the tasks count (`count(step)` given to them), else tasks done."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tally = _Tally.remote() if progress.enabled else None

    def count(self, step: str) -> Count:
        return _Count(self.tally, step) if self.tally is not None else None

    def step(self, name: str, total: int, unit: str = "windows") -> Step:
        return self.progress.step(name, total, unit)

    def __call__(self, step: str | Step, refs: list, total: int | None = None, unit: str = "windows", *,
                 end: bool = True, on_result: Callable[[Any], None] | None = None) -> list:
        """`on_result(result)`: the results in the order of `refs` as soon as each and those before it have
        arrived, instead of all at the end: a reduction holds only the results that came early, and sums in the
        same order on every run (float sums depend on the order)."""
        counted = not (isinstance(step, str) and total is None)  # else: tasks done are the units
        if isinstance(step, str):
            step = self.step(step, len(refs), "tasks") if total is None else self.step(step, total, unit)
        order, pending, done, handed = {r: i for i, r in enumerate(refs)}, list(refs), {}, 0
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
                for ref in ready:
                    done[order[ref]] = _get(ref, step.name)
                while on_result is not None and handed in done:  # the next in order has arrived
                    on_result(done[handed])
                    done[handed], handed = None, handed + 1
                if not counted:
                    step.update(len(done))
                elif self.tally is not None:
                    step.update(ray.get(self.tally.get.remote(step.name)))
                step.tick(KEEPALIVE_S)
        except BaseException:
            for ref in pending:  # e.g. a listener stopped the work (a cancel request): stop the tasks too
                ray.cancel(ref)
            raise
        if end:
            step.finish()  # the last counts may still be on their way to the tally
        return [] if on_result is not None else [done[i] for i in range(len(refs))]

    def close(self) -> None:
        if self.tally is not None:
            ray.kill(self.tally)


@contextmanager
def _tracking(progress: bool | Progress) -> Iterator[_Track]:
    with reporting(progress) as reporter:
        track = _Track(reporter)
        try:
            yield track
        finally:
            track.close()


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


PLAN_GROUP_MAX = 8  # plans evaluated together in one task (each holds a float copy of the model)
EVAL_STEP, BASE_STEP, CALIB_STEP = "plan evaluation", "unquantized model", "calibration"


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _base_task(model: nn.Module, windows: torch.Tensor, threads: int, count: Count = None) -> EvalResult:
    torch.set_num_threads(threads)
    return evaluate(model.float(), windows, on_progress=increments(count))


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _calibration_task(model: nn.Module, tokens: torch.Tensor, threads: int, count: Count = None) -> CalibrationStats:
    torch.set_num_threads(threads)
    model = model.float()
    return collect_input_stats(model, tokens, list(quantizable_modules(model)), progress=_counting(count))


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _group_task(model: nn.Module, plans: list, windows: torch.Tensor, calibration: torch.Tensor | None,
                stats: CalibrationStats | None, threads: int, count: Count = None) -> tuple[EvalResult, list[PlanEval]]:
    torch.set_num_threads(threads)
    return evaluate_plans_together(model.float(), plans, windows, calibration, stats=stats, on_windows=count)


def _counting(count: Count) -> Progress | bool:
    """A Progress (in a task) whose steps' counts go to `count` as increments."""
    if count is None:
        return False
    last: dict[str, int] = {}

    def listen(event: ProgressEvent) -> None:
        if event.done > last.get(event.step, 0):
            count(event.done - last.get(event.step, 0))
            last[event.step] = event.done

    return Progress(listen)


def calibration_stats(model: nn.Module, tokens: torch.Tensor, *, workers: int = 1, address: str | None = None,
                      progress: bool | Progress = False) -> CalibrationStats:
    """`collect_input_stats` of every quantizable layer of `model` on calibration `tokens` (a Ray task): what
    `apply_plan(stats=...)` reads for every plan of this model (static scales and equalization)."""
    init_ray(address)
    with _tracking(progress) as track:
        return _track_calibration(track, ray.put(model.eval()), tokens, workers)


def _track_calibration(track: _Track, model_ref: Any, tokens: torch.Tensor, workers: int) -> CalibrationStats:
    """The statistics on shards of `tokens`, one task per worker, merged (max|X| per channel is a max)."""
    threads, count = _threads(workers), track.count(CALIB_STEP)
    shards = tokens.split(-(-tokens.shape[0] // min(tokens.shape[0], max(1, workers))))
    stats = CalibrationStats({}, {})

    def merge(part: CalibrationStats) -> None:
        for name, m in part.absmax.items():
            stats.absmax[name] = torch.maximum(stats.absmax[name], m) if name in stats.absmax else m.clone()
        stats.feeders.update(part.feeders)

    track(CALIB_STEP, [_calibration_task.options(num_cpus=threads).remote(model_ref, shard, threads, count)
                       for shard in shards], tokens.shape[0], on_result=merge)
    return stats


def plan_group_size(model: nn.Module, workers: int = 1) -> int:
    """Plans one task evaluates together: as many float copies of `model` as fit in half the machine's memory
    shared by the workers (with room for the model itself and the activations), at most PLAN_GROUP_MAX."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    copy_bytes = 4 * sum(p.numel() for p in model.parameters())
    return max(1, min(PLAN_GROUP_MAX, total // (2 * workers) // max(copy_bytes, 1) - 2))


def measure_plans(
    model: nn.Module,
    plans: Sequence[Any],
    windows: torch.Tensor,
    calib_tokens: torch.Tensor | None,
    *,
    workers: int = 1,
    address: str | None = None,
    progress: bool | Progress = False,
    stats: CalibrationStats | None = None,
) -> tuple[EvalResult, list[PlanEval]]:
    """The unquantized model's result and each `quant.plan.Plan`'s `PlanEval` (perplexity, KL(base || quantized))
    on held-out `windows`, on `workers` Ray workers; results in the order of `plans`.

    Plans go in groups (`plan_group_size`) and windows in shards, one task per (group, shard), each running the
    base model once per window for its whole group (`evaluate_plans_together`). The calibration statistics
    (static scales, equalization) are the unquantized model's, so they are collected once (`stats`, else a task
    here when a plan needs them) and shared by every plan. `progress` reports "calibration" (windows) and
    "plan evaluation" (windows x plans)."""
    if not plans:
        raise ValueError("no plans to measure")
    init_ray(address)
    threads = _threads(workers)
    opts = {"num_cpus": threads}
    model_ref = ray.put(model.eval())
    with _tracking(progress) as track:
        if stats is None and calib_tokens is not None and any(needs_calibration(model, p) for p in plans):
            stats = _track_calibration(track, model_ref, calib_tokens, workers)
        size = plan_group_size(model, workers)
        groups = [list(plans[i : i + size]) for i in range(0, len(plans), size)]
        shards = list(windows.split(-(-len(windows) // min(len(windows), max(1, -(-workers // len(groups)))))))
        stats_ref, calib_ref = ray.put(stats), ray.put(calib_tokens)
        count = track.count(EVAL_STEP)
        parts = track(EVAL_STEP, [
            _group_task.options(**opts).remote(model_ref, g, shard, calib_ref, stats_ref, threads, count)
            for g in groups for shard in shards], len(plans) * len(windows))
    per_group = [parts[i * len(shards) : (i + 1) * len(shards)] for i in range(len(groups))]
    base = merge_results([b for b, _ in per_group[0]])
    evals = [merge_plan_evals([evals[j] for _, evals in group], base)
             for group in per_group for j in range(len(group[0][1]))]
    return base, evals


def evaluate_plans(
    model: nn.Module,
    plans: Sequence[Any],
    windows: torch.Tensor,
    calib_tokens: torch.Tensor | None,
    *,
    workers: int = 1,
    address: str | None = None,
    progress: bool | Progress = False,
    base: EvalResult | None = None,
) -> list[PlanEval]:
    """Each plan's `PlanEval` on `windows` (`measure_plans`); `base`: the unquantized model's result on the same
    windows when the caller has it (its perplexity is each result's base_perplexity)."""
    if not plans:
        return []
    measured, evals = measure_plans(model, plans, windows, calib_tokens, workers=workers, address=address,
                                    progress=progress)
    known = base or measured
    return [replace(e, base_perplexity=known.perplexity) for e in evals]


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _models_task(reference: nn.Module | None, models: list[nn.Module], windows: torch.Tensor, threads: int,
                 count: Count = None) -> tuple[EvalResult | None, list[EvalResult]]:
    torch.set_num_threads(threads)
    per_window = None if count is None else (lambda k: count(k * len(models)))
    reference = None if reference is None else reference.float()
    return evaluate_many(reference, models, windows, on_progress=increments(per_window))


def evaluate_models(reference: nn.Module | None, models: Sequence[nn.Module], windows: torch.Tensor, *,
                    workers: int = 1, address: str | None = None, progress: bool | Progress = False,
                    step: str = "quantized model") -> tuple[EvalResult | None, list[EvalResult]]:
    """`evaluate_many(reference, models, windows)` with the windows sharded over `workers` Ray workers: the
    reference's result and each model's perplexity and KL(reference || model); without a reference (None),
    None and each model's perplexity. The models go as they are (e.g. real quantized models with their packed
    weights; not converted to float). `progress` reports `step` in windows x models."""
    init_ray(address)
    threads = _threads(workers)
    shards = list(windows.split(-(-len(windows) // min(len(windows), max(1, workers)))))
    reference_ref = None if reference is None else ray.put(reference.eval())
    models_ref = ray.put([m.eval() for m in models])
    with _tracking(progress) as track:
        count = track.count(step)
        parts = track(step, [_models_task.options(num_cpus=threads).remote(reference_ref, models_ref, shard, threads,
                                                                           count) for shard in shards],
                      len(windows) * len(models))
    base = None if reference is None else merge_results([b for b, _ in parts])
    return base, [merge_results([results[i] for _, results in parts]) for i in range(len(models))]


def evaluate_base(model: nn.Module, windows: torch.Tensor, *, workers: int = 1, address: str | None = None,
                  progress: bool | Progress = False) -> EvalResult:
    """The unquantized model's result on `windows` (a Ray task), to pass as `evaluate_plans(base=...)`."""
    init_ray(address)
    with _tracking(progress) as track:
        return _track_base(track, ray.put(model.eval()), ray.put(windows), len(windows), _threads(workers))


def _track_base(track: _Track, model_ref: Any, windows_ref: Any, windows: int, threads: int) -> EvalResult:
    task = _base_task.options(num_cpus=threads).remote(model_ref, windows_ref, threads, track.count(BASE_STEP))
    return track(BASE_STEP, [task], windows)[0]
