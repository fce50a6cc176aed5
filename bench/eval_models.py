"""Perplexity of stories260K and the demo model, FP32 and under uniform schemes (the foundation's numbers).

    python bench/eval_models.py [--skip-demo]

Converts stories260K from ../shared/data; evaluates on its two TinyStories stories (the README protocol), on
sampled_seed1.txt (windows of 128) and on WikiText-2 test (windows of 512); then the cached demo model.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from quantplan.quant.plan import Plan
from quantplan.workers.data import calibration_set, eval_windows
from quantplan.workers.evaluate import evaluate
from quantplan.workers.models import load_model
from quantplan.workers.pipeline import evaluate_plan

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STORIES = DATA / "models" / "stories260K"
STORIES_SCHEMES = ("w8:a16", "w4g32:a16", "w4:a16", "w8:a8-static", "w4g32:a8-static", "w4g32:a8-dynamic",
                   "w4g32:a8-lae", "w4g32:a8-smooth")
DEMO_SCHEMES = ("w4g128:a16", "w8:a8-static", "w4g128:a8-static", "w4g128:a8-dynamic", "w4g128:a8-lae",
                "w4g128:a8-smooth")


def rows_for(model_dir: str, data: str, calib: str, seq_len: int, schemes: tuple[str, ...]) -> None:
    model, tok = load_model(model_dir)
    windows = eval_windows(data, tok, seq_len=seq_len)
    base = evaluate(model, windows)
    print(f"\n{Path(model_dir).name} on {data.split('/')[-1]} (seq_len {seq_len}, {base.tokens:,} tokens)")
    print("| plan | avg bits | perplexity | KL |\n| --- | ---: | ---: | ---: |")
    print(f"| fp32 | 32 | {base.perplexity:.3f} | 0 |")
    if not schemes:
        return
    tokens = calibration_set(calib, tok, samples=32, seq_len=128).tokens
    for scheme in schemes:
        r = evaluate_plan(model, Plan.uniform(scheme), windows, tokens, base_result=base)
        print(f"| {scheme} | {r.avg_bits:.3f} | {r.perplexity:.3f} | {r.kl:.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-demo", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from quantplan.workers.llama2c import convert_llama2c

    hf = str(convert_llama2c(STORIES / "stories260K.bin", STORIES / "tok512.bin", Path(tempfile.mkdtemp()) / "s"))
    sampled = f"text:{STORIES / 'sampled_seed1.txt'}"
    rows_for(hf, f"text:{STORIES / 'tinystories_train0.txt'},{STORIES / 'tinystories_validation0.txt'}", sampled,
             512, ())
    rows_for(hf, sampled, sampled, 128, STORIES_SCHEMES)
    rows_for(hf, f"wikitext2:{DATA / 'wikitext2'}", sampled, 512, ("w8:a8-static", "w4g32:a16", "w4g32:a8-dynamic"))
    if not args.skip_demo:
        from quantplan.workers.demo import build_demo_model

        demo = build_demo_model(progress=False)
        rows_for(str(demo.path), demo.data_spec, demo.calib_spec, 128, DEMO_SCHEMES)


if __name__ == "__main__":
    main()
