"""End-to-end generation on applied plans: prefill and decode speed, and memory, against the float model.

    python bench/decode.py [--model DIR] [--artifact NAME=DIR ...] [--schemes w4g128:a16 w8:a8-dynamic ...]
                           [--prompt-tokens 256] [--new-tokens 128] [--batch 1 8] [--threads 2] [--json]

The model is SmolLM2-135M-Instruct by default (`quantplan.workers.real_model.fetch_smollm2`). Each uniform scheme
of `--schemes` is materialized once into the user cache (dynamic activations: no calibration); `--artifact`
adds others, e.g. the searched plan kept by `python bench/real_model.py --out DIR` (`searched=DIR/plan-0`). Every
model runs in its own process, one after the other (the same cores, the same thread count): load, apply, a warm-up
generation, then per batch size a prompt of `--prompt-tokens` tokens of WikiText-2 test (one window per row)
and `--new-tokens` greedy tokens with a KV cache (`quantplan.workers.generate`). Reported: prefill tokens/s,
decode tokens/s (tokens after the first, all rows), their ratio to the float model's, the model's bytes
(parameters, buffers and the kernels' cached layouts) and the process's peak RSS during generation (VmHWM reset
after loading, so it counts the resident model, the KV cache and the activations, and torch's own ~0.3 GB).
With `--ppl-windows N` (default 8) each applied model's perplexity on the first N test windows of 512, with the
run's CPU kernels and with the exact ones (which equal the simulation to float rounding: `eval --artifact`).
Also whether llama.cpp's Python binding (the same model's Q4_1 GGUF) is importable here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SCHEMES = ("w4g128:a16", "w8:a8-dynamic", "w4g128:a8-dynamic")


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One model in this process: load, apply, generate per batch size; a JSON-able result."""
    import gc

    import torch

    from quantplan.quant.artifact import load_quantized
    from quantplan.quant.qlinear import set_cpu_kernels
    from quantplan.workers.data import load_text
    from quantplan.workers.generate import generate, model_bytes
    from quantplan.workers.models import load_model

    torch.set_num_threads(args.threads)
    net, tok = load_model(args.model)
    if args.child != "-":
        load_quantized(net, args.child)
        set_cpu_kernels(net, args.cpu_kernels)
    text = load_text(args.data, "test")
    ids = tok(text[:200_000], return_tensors="pt").input_ids[0]
    need = args.prompt_tokens * max(args.batch)
    prompts = ids[:need].reshape(max(args.batch), args.prompt_tokens)
    generate(net, prompts[:1, :32], 4)  # warm-up: first-call preparation (kernels' cached layouts), allocator
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rows = []
    for batch in args.batch:
        g = generate(net, prompts[:batch], args.new_tokens)
        rows.append({"batch": batch, **g.timings()})
    result = {"rows": rows, "model_bytes": model_bytes(net), "peak_rss": _vm("VmHWM")}
    if args.ppl_windows:  # the applied model's perplexity with its CPU kernels, and with the exact ones
        from quantplan.workers.data import eval_windows
        from quantplan.workers.evaluate import evaluate

        windows = eval_windows(args.data, tok, seq_len=512, max_windows=args.ppl_windows)
        result["perplexity"] = evaluate(net, windows).perplexity
        if args.child != "-":
            set_cpu_kernels(net, "exact")
            result["perplexity_exact"] = evaluate(net, windows).perplexity
    return result


def _materialized(model: str, scheme: str) -> Path:
    """The uniform `scheme` artifact of `model`, materialized once into the user cache."""
    from quantplan.quant.artifact import materialize
    from quantplan.quant.plan import Plan
    from quantplan.workers.models import load_model, model_fingerprint
    from quantplan.workers.pipeline import cache_dir

    net, _ = load_model(model)
    out = cache_dir("bench-decode") / model_fingerprint(net)[:16] / scheme.replace(":", "_")
    if not (out / "manifest.json").is_file():
        materialize(net, Plan.uniform(scheme), None, out)
    return out


def llama_cpp_note() -> str:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return ("llama.cpp's Python binding (llama-cpp-python) is not installed here: the index has no wheel for this "
                "platform and building it from source needs a C++ toolchain and CMake run (not done)")
    return "llama-cpp-python is importable: run its Q4_1 GGUF for a reference (not automated yet)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: SmolLM2-135M-Instruct, fetched and converted once)")
    p.add_argument("--data", default=f"wikitext2:{SHARED / 'wikitext2'}", help="prompt text (test split)")
    p.add_argument("--schemes", nargs="*", default=list(SCHEMES), help="uniform plans to materialize and run")
    p.add_argument("--artifact", nargs="*", default=[], metavar="NAME=DIR", help="more artifacts to run")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-windows", type=int, default=8, help="also the perplexity on the first N test windows of "
                   "512 with the run's CPU kernels and with the exact ones (0: skip)")
    p.add_argument("--cpu-kernels", default="fast", choices=("fast", "exact"), help="the applied models' CPU "
                   "kernels (docs/FORMAT.md)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one model ('-' = float) and print JSON
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.model is None:
        from quantplan.workers.real_model import fetch_smollm2

        args.model = str(fetch_smollm2())
    models = {"float32": "-"} | {s: str(_materialized(args.model, s)) for s in args.schemes}
    for item in args.artifact:
        name, _, path = item.partition("=")
        models[name] = path
    common = ["--model", args.model, "--data", args.data, "--prompt-tokens", str(args.prompt_tokens),
              "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--cpu-kernels", args.cpu_kernels,
              "--ppl-windows", str(args.ppl_windows), "--batch",
              *map(str, args.batch)]
    results = {}
    for name, path in models.items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, *common, "--child", path], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise SystemExit(f"{name}: {done.stderr.strip().splitlines()[-1:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    report = {"model": args.model, "threads": args.threads, "cpu_kernels": args.cpu_kernels,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "results": results,
              "llama_cpp": llama_cpp_note()}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    show(report)


def show(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    base = report["results"]["float32"]
    table = Table(title=f"{Path(report['model']).name}: prompt {report['prompt_tokens']} tokens, "
                  f"{report['new_tokens']} generated, {report['threads']} threads; ratios against float32 in this run")
    for col in ("plan", "batch", "prefill tok/s", "x float", "decode tok/s", "x float", "model MB", "x float",
                "peak RSS GB"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    for name, r in report["results"].items():
        for row, ref in zip(r["rows"], base["rows"], strict=True):
            table.add_row(name, str(row["batch"]), f"{row['prefill_tokens_per_s']:.0f}",
                          f"{row['prefill_tokens_per_s'] / ref['prefill_tokens_per_s']:.2f}",
                          f"{row['decode_tokens_per_s']:.1f}",
                          f"{row['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}",
                          f"{r['model_bytes'] / 1e6:.0f}", f"{r['model_bytes'] / base['model_bytes']:.2f}",
                          f"{r['peak_rss'] / 1e9:.2f}")
    Console(width=160).print(table)
    for name, r in report["results"].items():
        if "perplexity_exact" in r:
            print(f"{name}: perplexity {r['perplexity']:.4f} with the {report['cpu_kernels']} CPU kernels, "
                  f"{r['perplexity_exact']:.4f} with the exact ones "
                  f"({100 * (r['perplexity'] / r['perplexity_exact'] - 1):+.3f}%)")
    print(report["llama_cpp"])


if __name__ == "__main__":
    main()
