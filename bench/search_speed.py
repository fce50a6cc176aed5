"""Search benchmarks on a synthetic table shaped like a 32-block 7B Llama (224 layers, 6.5e9 weights).

Measures the exact knapsack (time, grid, gap to the Lagrangian dual bound) and the Optuna driver's proxy trials
per minute end to end (ask, trial mapping through the table, tell, and the write to a SQLite study), in the
structured space and in the per-layer space. Numbers depend on the machine's load: the load average is printed.
The last table is the CPU time (process time, less sensitive to other processes than wall time) of compiling
the problem, of the knapsack and of one proxy trial without the database (ask, trial mapping, candidate, its stored
attributes, tell on an in-memory study), and of reading a stored trial back.

    python bench/search_speed.py                                  # 1,000 structured trials, 100 per-layer trials
    python bench/search_speed.py --trials 2000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from quantplan.search import knapsack
from quantplan.search.budget import Budget
from quantplan.search.problem import compile_problem
from quantplan.search.space import SearchSpace
from quantplan.search.study import StudySettings, decode, encode, run_search
from quantplan.search.synthetic import LLAMA_7B, synthetic_table
from quantplan.search.trials import SPACES


def bench_knapsack(table: Any, budget: Budget, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for label, space in (("W4A8 (--act-bits 8)", SearchSpace(act_bits=8)),
                         ("weight-only (--act-bits 16)", SearchSpace(act_bits=16)),
                         ("both widths", SearchSpace(act_bits=None)),
                         ("W4A8, a8-dynamic <= 50%", SearchSpace(act_bits=8, max_dynamic_share=0.5))):
        problem = compile_problem(table, space, budget)
        runs = [knapsack.solve(problem) for _ in range(repeats)]
        r = runs[0]
        rows.append({"space": label, "seconds": statistics.median(x.seconds for x in runs), "cells": r.cells,
                     "exact": r.exact, "loss": r.loss, "gap": (r.loss - r.lower_bound) / r.loss,
                     "avg_bits": r.size / problem.params if budget.unit == "bits" else None})
    return rows


def bench_study(table: Any, budget: Budget, kind: str, trials: int, db: Path) -> dict[str, Any]:
    problem = compile_problem(table, SearchSpace(act_bits=8), budget)
    result = run_search(problem, StudySettings(trials=trials, space=kind, storage=f"sqlite:///{db}", name=kind))
    best = result.best()
    return {"space": kind, "trials": result.new_trials, "seconds": result.seconds,
            "trials_per_minute": result.trials_per_minute, "pareto": len(result.pareto),
            "best": best.label, "best_loss": best.predicted_loss, "knapsack_loss": result.knapsack.loss}


def bench_cpu(table: Any, budget: Budget, trials: int) -> dict[str, float]:
    start = time.process_time()
    problem = compile_problem(table, SearchSpace(act_bits=8), budget)
    out = {"compile_s": time.process_time() - start}
    start = time.process_time()
    knapsack.solve(problem)
    out["knapsack_s"] = time.process_time() - start
    for kind, n in (("structured", trials), ("per-layer", max(trials // 10, 1))):
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
        trial_space = SPACES[kind](problem)
        start = time.process_time()
        for number in range(n):
            trial = study.ask()
            candidate = problem.candidate(trial_space.suggest(trial), f"trial {number}", trial=number)
            for key, value in encode(candidate).items():
                trial.set_user_attr(key, value)
            study.tell(trial, [candidate.predicted_loss, candidate.bytes])
        out[f"{kind}_ms"] = (time.process_time() - start) / n * 1e3
        start = time.process_time()
        for trial in study.trials:
            decode(problem, trial)
        out[f"{kind}_decode_ms"] = (time.process_time() - start) / n * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000, help="structured-space trials")
    parser.add_argument("--per-layer-trials", type=int, default=100)
    parser.add_argument("--budget-bits", type=float, default=4.25)
    parser.add_argument("--repeats", type=int, default=3, help="knapsack runs (median time)")
    parser.add_argument("--cpu-trials", type=int, default=300, help="structured trials for the CPU-time table "
                        "(per-layer: a tenth)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    table, budget = synthetic_table(32, LLAMA_7B), Budget(avg_bits=args.budget_bits)
    start_load = os.getloadavg()[0]
    out: dict[str, Any] = {"layers": len(table.layers), "params": sum(l.params for l in table.layers),
                           "budget_bits": args.budget_bits, "cpus": os.cpu_count()}
    out["knapsack"] = bench_knapsack(table, budget, args.repeats)
    _print_knapsack(out["knapsack"])
    with tempfile.TemporaryDirectory() as tmp:
        out["study"] = [bench_study(table, budget, "structured", args.trials, Path(tmp) / "s.db"),
                        bench_study(table, budget, "per-layer", args.per_layer_trials, Path(tmp) / "p.db")]
    out["load_average"] = [start_load, os.getloadavg()[0]]
    _print_study(out["study"], out["load_average"], out["cpus"])
    out["cpu"] = bench_cpu(table, budget, args.cpu_trials)
    _print_cpu(out["cpu"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def _print_knapsack(rows: list[dict[str, Any]]) -> None:
    print("knapsack on 224 layers (7B-shaped), 4.25 avg bits")
    print(f"{'space':32} {'seconds':>8} {'cells':>7} {'exact':>6} {'gap to dual bound':>18} {'avg_bits':>9}")
    for r in rows:
        print(f"{r['space']:32} {r['seconds']:8.3f} {r['cells']:7d} {r['exact']!s:>6} {r['gap']:18.2e} "
              f"{r['avg_bits']:9.4f}")


def _print_study(rows: list[dict[str, Any]], load: list[float], cpus: int | None) -> None:
    print(f"\nOptuna driver, SQLite study (load average {load[0]:.1f} -> {load[1]:.1f} on {cpus} CPUs)")
    print(f"{'space':12} {'trials':>7} {'seconds':>8} {'trials/min':>11} {'pareto':>7} {'best':>12} "
          f"{'best loss':>10} {'knapsack':>10}")
    for r in rows:
        print(f"{r['space']:12} {r['trials']:7d} {r['seconds']:8.1f} {r['trials_per_minute']:11.0f} "
              f"{r['pareto']:7d} {r['best']:>12} {r['best_loss']:10.5f} {r['knapsack_loss']:10.5f}")


def _print_cpu(cpu: dict[str, float]) -> None:
    print("\nCPU time (process time), no database: compile the problem (W4A8), the knapsack, one proxy trial, "
          "decode a stored trial")
    print(f"compile {cpu['compile_s']:.3f} s; knapsack {cpu['knapsack_s']:.3f} s; structured "
          f"{cpu['structured_ms']:.2f} ms/trial (decode {cpu['structured_decode_ms']:.2f} ms); per-layer "
          f"{cpu['per-layer_ms']:.2f} ms/trial (decode {cpu['per-layer_decode_ms']:.2f} ms)")


if __name__ == "__main__":
    main()
