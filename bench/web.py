"""Web UI benchmark: the server time of a model's leaderboard page (query, Pareto plot, table) with many stored plans.

Stores `--plans` plans (default 1,000) of one model, in jobs of 100, each a 32-block Llama plan (224 layers) with
perplexity, KL and their simulated values, in a fresh SQLite database; then requests the leaderboard page in
process (FastAPI's TestClient, no network) and reports the server time the page reports in its `Server-Timing`
header (database query, plan views, SVG plot and table rendered) and the whole request's time, median and 90th
percentile over `--repeats` requests, for the default view, Pareto plans only, and KL on a log axis by bytes.
The issue's target: under 500 ms with 1,000 plans.

    python bench/web.py                      # 1,000 plans, 20 requests per view
    python bench/web.py --plans 5000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from quantplan.service.api import create_app
from quantplan.storage import NewPlan, Repository, load_settings

MODEL = "bench/llama-7b-like"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
SCHEMES = ("w4g128:a8-dynamic", "w4g128:a8-lae", "w4g64a:a8-dynamic", "w8:a8-static", "w4:a8-dynamic")
VIEWS = {"default": "", "pareto only": "&pareto_only=1", "KL, log, by bytes": "&y=kl&log=1&x=bytes"}


def store_plans(repo: Repository, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    model = repo.upsert_model(MODEL, "f" * 64, architecture="llama")
    for first in range(0, n, 100):
        job = repo.create_job({"model": MODEL, "data": "wikitext2", "budget_bits": 4.25})
        plans = []
        for k in range(min(100, n - first)):
            layers = {f"model.layers.{b}.{p}": rng.choice(SCHEMES) for b in range(32) for p in PROJECTIONS}
            bits = 4.0 + rng.random() * 1.5
            ppl = 6.0 + 2.0 / bits + rng.random() * 0.05
            kl = 0.5 / bits ** 2 + rng.random() * 0.002
            plan = {"format": "quantplan.plan", "version": 1, "model": {"name": MODEL}, "default": "w16:a16",
                    "layers": layers, "meta": {"job": job.id, "label": f"trial {k}", "recipe": None}}
            metrics = {("perplexity", "wikitext2"): ppl, ("kl", "wikitext2"): kl,
                       ("perplexity_simulated", "wikitext2"): ppl, ("kl_simulated", "wikitext2"): kl,
                       ("base_perplexity", "wikitext2"): 6.0}
            plans.append(NewPlan(plan, bits, int(bits * 6.5e9 / 8), 8, kl * 0.9, k % 7 == 0, metrics))
        repo.add_plans(model.id, plans, job_id=job.id)


def measure(client: TestClient, query: str, repeats: int) -> dict[str, Any]:
    server, wall = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        r = client.get(f"/leaderboard?model={MODEL}{query}")
        wall.append((time.perf_counter() - start) * 1000)
        assert r.status_code == 200, r.text[:500]
        server.append(float(re.fullmatch(r"render;dur=([\d.]+)", r.headers["server-timing"])[1]))
    points = r.text.count('class="point"')
    return {"plans_drawn": points, "server_ms_median": statistics.median(server),
            "server_ms_p90": statistics.quantiles(server, n=10)[-1], "request_ms_median": statistics.median(wall),
            "html_bytes": len(r.content)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plans", type=int, default=1000, help="plans to store (default 1,000)")
    parser.add_argument("--repeats", type=int, default=20, help="requests per view (default 20)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(database_url=f"sqlite:///{tmp}/bench.db", artifacts=f"{tmp}/artifacts")
        repo = Repository(settings=settings)
        start = time.perf_counter()
        store_plans(repo, args.plans)
        print(f"stored {args.plans:,} plans in {time.perf_counter() - start:.1f} s; load average "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        with TestClient(create_app(settings, repo=repo)) as client:
            start = time.perf_counter()
            first = client.get(f"/leaderboard?model={MODEL}")  # cold: templates compiled, each plan's formats judged
            cold = (time.perf_counter() - start) * 1000
            print(f"first request (cold): {cold:.0f} ms, server {first.headers['server-timing']}")
            results = {name: measure(client, query, args.repeats) for name, query in VIEWS.items()}
        repo.close()
    print(f"{'view':<20} {'plans drawn':>11} {'server ms (median)':>19} {'p90':>7} {'request ms':>11} {'HTML KB':>8}")
    for name, r in results.items():
        print(f"{name:<20} {r['plans_drawn']:>11} {r['server_ms_median']:>19.1f} {r['server_ms_p90']:>7.1f} "
              f"{r['request_ms_median']:>11.1f} {r['html_bytes'] / 1024:>8.0f}")
    if args.json:
        args.json.write_text(json.dumps({"plans": args.plans, "views": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
