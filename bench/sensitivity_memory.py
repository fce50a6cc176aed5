"""Peak memory and time of the sensitivity pass on a real model, against its memory model and a plain fwd+bwd.

    python bench/sensitivity_memory.py [--model DIR] [--data SPEC] [--samples 64] [--seq-len 512]
                                       [--act-samples N] [--max-memory GB ...] [--threads 2]

Without --model it uses SmolLM2-135M (`quantplan.workers.real_model.fetch_smollm2`, downloaded and converted once).
Every configuration runs in a fresh subprocess (so each peak is its own): `sensitivity_pass` in process (one
worker, as the Ray task runs it, without Ray's own processes) with the batches `batch_plan` picks for each
--max-memory (default: `default_max_memory`), and a plain forward + backward (`model(labels=...).loss.backward()`,
full logits, weight gradients) over the same tokens in the same batches, the denominator of the ratio as in
bench/sensitivity.py. Times are CPU seconds of the subprocess (torch runs --threads threads); peaks are
ru_maxrss of the subprocess; "predicted" is `pass_memory(model).peak(tokens held)`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args: argparse.Namespace) -> dict:
    """One configuration in this process: load, run, report."""
    import torch

    from quantplan.workers.data import calibration_set
    from quantplan.workers.models import load_model
    from quantplan.workers.real_model import fetch_smollm2
    from quantplan.workers.sensitivity import (
        act_set_start,
        batch_plan,
        default_max_memory,
        pass_memory,
        sensitivity_pass,
    )

    torch.set_num_threads(args.threads)
    runtime = _peak_bytes()
    model, tok = load_model(args.model or str(fetch_smollm2()))
    model = model.float().eval()
    tokens = calibration_set(args.data, tok, samples=args.samples, seq_len=args.seq_len).tokens
    max_memory = int(args.budget * 1e9) if args.budget else default_max_memory(model)  # as the tasks run it
    batch, in_flight = batch_plan(model, tokens.shape[1], 1, max_memory)
    start = act_set_start(tokens, 1, args.act_samples)
    held = min(tokens.shape[0] - start, in_flight * batch) if args.run == "pass" else batch
    clock = time.process_time()
    if args.run == "pass":
        sensitivity_pass(model, tokens, act_samples=args.act_samples, max_memory=max_memory)
    else:
        for part in tokens.split(batch):
            model.zero_grad(set_to_none=True)
            model(input_ids=part, labels=part, use_cache=False).loss.backward()
    cpu = time.process_time() - clock
    return {"run": args.run, "budget_gb": args.budget, "batch": batch, "held": held, "cpu_s": cpu,
            "peak": _peak_bytes(), "runtime": runtime,
            "predicted": pass_memory(model).peak(held * tokens.shape[1]), "tokens": tokens.numel()}


def spawn(args: argparse.Namespace, run: str, budget: float | None) -> dict:
    cmd = [sys.executable, __file__, "--child", run, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--data", args.data, "--threads", str(args.threads)]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--act-samples", str(args.act_samples)] if args.act_samples else []
    cmd += ["--budget", str(budget)] if budget else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model directory (default: SmolLM2-135M, fetched and converted once)")
    p.add_argument("--data", default=f"wikitext2:{SHARED / 'wikitext2'}")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--act-samples", type=int, help="windows of the activation-cost set (default: 4,096 tokens)")
    p.add_argument("--max-memory", type=float, nargs="*", default=[0.0],
                   help="budgets in GB to run the pass with (0: the default budget)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=("pass", "plain"), help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.run = args.child
        print(json.dumps(child(args)))
        return
    print(f"model {args.model or 'SmolLM2-135M'}; {args.samples} windows of {args.seq_len}, act samples "
          f"{args.act_samples or 'default'}, {args.threads} torch threads; one fresh process per row")
    print(f"{'run':<6} {'budget GB':>9} {'batch':>5} {'held':>4} {'CPU s':>8} {'ratio':>6} {'peak GB':>8} "
          f"{'predicted GB':>12} {'error':>6}")
    for budget in args.max_memory:
        rows = [spawn(args, "pass", budget or None), None]
        rows[1] = spawn(args, "plain", budget or None)  # the same batches as the pass
        for r in rows:
            ratio = r["cpu_s"] / rows[1]["cpu_s"]
            error = (r["predicted"] - r["peak"]) / r["peak"]
            print(f"{r['run']:<6} {budget or 'default':>9} {r['batch']:>5} {r['held']:>4} {r['cpu_s']:8.1f} "
                  f"{ratio:6.2f} {r['peak'] / 1e9:8.2f} {r['predicted'] / 1e9:12.2f} "
                  f"{error:+6.0%}" if r["run"] == "pass" else
                  f"{r['run']:<6} {budget or 'default':>9} {r['batch']:>5} {r['held']:>4} {r['cpu_s']:8.1f} "
                  f"{ratio:6.2f} {r['peak'] / 1e9:8.2f} {'':>12} {'':>6}", flush=True)


if __name__ == "__main__":
    main()
