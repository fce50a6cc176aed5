"""Artifact size on disk against the plan's cost model, on stories260K and the demo model.

    python bench/artifacts.py [--skip-demo]

Materializes acceptance 1's plans (and an all-a8-lae plan) into temporary directories, calibrated on 8 windows of
128 tokens, and prints a markdown table: the cost model's bytes, the packed bytes as stored, the weights file's
header, the artifact's size on disk (plan.json + quantized.safetensors) and its ratio to the cost, and the manifest.
The demo model is the one `quantplan demo` caches (built here if missing: a few minutes).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from quantplan.quant import artifact as art
from quantplan.quant.plan import Plan
from quantplan.workers.data import calibration_set
from quantplan.workers.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STORIES = DATA / "models" / "stories260K"


def mixed_plan(group: int) -> Plan:
    """Acceptance 1's mix (as tests/quant/test_artifact.py): a8-dynamic default, LAE q/k/v, a16 o, w8 down."""
    return Plan.from_layers(
        {
            r"re:.*self_attn\.[qkv]_proj": "w4g64:a8-lae",
            r"re:.*self_attn\.o_proj": f"w4g{group}:a16",
            r"re:.*mlp\.down_proj": "w8:a8-static",
        },
        default=Plan.uniform(f"w4g{group}:a8-dynamic").default,
    )


def plans(group: int) -> dict[str, Plan]:
    labels = (f"w4g{group}:a8-dynamic", "w8:a8-static", f"w4g{group}:a16", "w4g64:a8-lae")
    return {f"mixed (g{group})": mixed_plan(group)} | {label: Plan.uniform(label) for label in labels}


def rows_for(name: str, model_dir: Path, calib_spec: str, group: int) -> None:
    model, tokenizer = load_model(str(model_dir))
    calib = calibration_set(calib_spec, tokenizer, samples=8, seq_len=128)
    for label, plan in plans(group).items():
        with tempfile.TemporaryDirectory() as tmp:
            info = art.materialize(model, plan, calib, Path(tmp) / "a")
            raw = (info.path / art.WEIGHTS_FILE).read_bytes()
            header = 8 + int.from_bytes(raw[:8], "little")
            cost, on_disk = info.cost["bytes"], info.metrics["artifact_bytes"]
            manifest = (info.path / art.MANIFEST_FILE).stat().st_size
            print(f"| {name} | {label} | {cost:,} | {info.metrics['bytes']:,} | {header} | {on_disk:,} | "
                  f"{on_disk / cost:.4f} | {manifest:,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-demo", action="store_true", help="Only stories260K.")
    args = parser.parse_args()
    print("| model | plan | cost bytes | packed bytes | header | size on disk | size / cost | manifest |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    from quantplan.workers.llama2c import convert_llama2c

    with tempfile.TemporaryDirectory() as tmp:
        hf = convert_llama2c(STORIES / "stories260K.bin", STORIES / "tok512.bin", Path(tmp) / "hf")
        rows_for("stories260K", hf, f"text:{STORIES / 'sampled_seed1.txt'}", 64)
    if not args.skip_demo:
        from quantplan.workers.demo import build_demo_model

        demo = build_demo_model(progress=False)
        rows_for("demo", demo.path, demo.calib_spec, 128)


if __name__ == "__main__":
    main()
