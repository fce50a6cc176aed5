"""Does the Fisher proxy predict? Spearman(predicted, measured) over every single-layer change.

    python bench/proxy.py [--skip-demo] [--samples 32] [--act-samples N ...]

For each layer x weight scheme (w2g32, w3g64, w4g32, w4g64, w4g128, w4, w8) and each layer x activation scheme,
quantize that one layer and measure on held-out tokens: the KL to the unquantized model (the expected loss
increase under the model's predictive distribution) and the raw NLL difference (dominated by sampling noise
when the change is small). Prints Spearman correlations of the predicted cost with both.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

from quantplan.quant.apply import apply_plan, quantizable_modules
from quantplan.quant.modules import linear_weight
from quantplan.quant.plan import Plan
from quantplan.quant.schemes import WeightScheme
from quantplan.workers.data import calibration_set, eval_windows
from quantplan.workers.evaluate import evaluate
from quantplan.workers.models import load_model
from quantplan.workers.sensitivity import (
    ACT_SCHEMES,
    act_set_start,
    sensitivity_pass,
    spearman,
    weight_costs,
)

STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "stories260K"
SCHEMES = tuple(WeightScheme.parse(s) for s in ("w2g32", "w3g64", "w4g32", "w4g64", "w4g128", "w4", "w8"))


def measure(model, plan, calib, held_out, base_nll) -> tuple[float, float]:
    q = copy.deepcopy(model)
    apply_plan(q, plan, calib)
    r = evaluate(q, held_out, reference=model, batch_size=16)
    return r.kl, r.nll - base_nll


def proxy_report(label: str, model_dir: str, calib_spec: str, eval_spec: str, samples: int = 32,
                 act_samples: tuple[int | None, ...] = (None,)) -> None:
    model, tok = load_model(model_dir)
    calib = calibration_set(calib_spec, tok, samples=samples, seq_len=128, seed=0).tokens
    held_out = eval_windows(eval_spec, tok, seq_len=128, max_windows=32)
    base = evaluate(model, held_out)
    passes = {a: sensitivity_pass(copy.deepcopy(model), calib, act_samples=a)[1] for a in act_samples}
    sums = passes[act_samples[0]]  # the Fisher (every token) is the same in each
    weights: tuple[list, list, list] = ([], [], [])
    acts = {a: ([], [], []) for a in act_samples}
    for name, module in quantizable_modules(model).items():
        costs = weight_costs(linear_weight(module), sums.fisher[name] / sums.batches, SCHEMES)
        for scheme, c in costs.items():
            kl, dnll = measure(model, Plan.from_layers({name: {"scheme": scheme, "clip": c.clip}}), calib, held_out,
                               base.nll)
            for lst, v in zip(weights, (c.cost, kl, dnll), strict=True):
                lst.append(v)
        for i, act in enumerate(ACT_SCHEMES):
            kl, dnll = measure(model, Plan.from_layers({name: f"w16:{act.value}"}), calib, held_out, base.nll)
            for a, s in passes.items():
                for lst, v in zip(acts[a], (float(s.act_cost[name][i]) / s.act_batches, kl, dnll), strict=True):
                    lst.append(v)
    rows = {"weights": weights} | {
        f"activations, act set {calib.shape[0] - act_set_start(calib, 1, a)} of {calib.shape[0]} windows": acts[a]
        for a in act_samples}
    for kind, (pred, kl, dnll) in rows.items():
        print(f"| {label} | {kind} | {len(pred)} | {spearman(pred, kl):.3f} | {spearman(pred, dnll):.3f} |")


def split_stories(tmp: Path) -> tuple[str, str]:
    """sampled_seed1.txt's 64 stories: the first 40 calibrate, the last 24 are held out."""
    lines = (STORIES / "sampled_seed1.txt").read_text(encoding="utf-8").splitlines()
    (tmp / "calib.txt").write_text("\n".join(lines[:40]), encoding="utf-8")
    (tmp / "heldout.txt").write_text("\n".join(lines[40:]), encoding="utf-8")
    return f"text:{tmp / 'calib.txt'}", f"text:{tmp / 'heldout.txt'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--samples", type=int, default=32, help="calibration windows of 128 tokens")
    p.add_argument("--act-samples", type=int, nargs="+", default=[None],
                   help="act set sizes to compare (windows; default one forward batch)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from quantplan.workers.llama2c import convert_llama2c

    hf = str(convert_llama2c(STORIES / "stories260K.bin", STORIES / "tok512.bin", Path(tempfile.mkdtemp()) / "s"))
    print("| model | changes | n | Spearman vs KL | Spearman vs dNLL |\n| --- | --- | ---: | ---: | ---: |")
    calib, held_out = split_stories(Path(tempfile.mkdtemp()))
    sizes = {"samples": args.samples, "act_samples": tuple(args.act_samples)}
    proxy_report("stories260K", hf, calib, held_out, **sizes)
    if not args.skip_demo:
        from quantplan.workers.demo import build_demo_model

        demo = build_demo_model(progress=False)
        proxy_report("demo", str(demo.path), demo.calib_spec, demo.data_spec, **sizes)


if __name__ == "__main__":
    main()
