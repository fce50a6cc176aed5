"""Peak memory and time of the sensitivity pass on a real model, against its memory model and a plain fwd+bwd.

    python bench/sensitivity_memory.py [--model DIR] [--data SPEC] [--split validation] [--samples 64]
                                       [--seq-len 512] [--act-samples N] [--max-memory GB ...] [--threads 2]
    python bench/sensitivity_memory.py --time [--rounds 1] ...     # pass / plain time, back to back
    python bench/sensitivity_memory.py --predict                    # the memory model for Llama 1B / 8B / 70B

Without --model it uses SmolLM2-135M (`quantplan.workers.real_model.fetch_smollm2`, downloaded and converted once).
Tokens: `--samples` windows of `--seq-len` of WikiText-2 validation (`wiki.valid.raw` under /work/shared/data),
tokenized by the model's tokenizer (`calibration_set`, seed 0), as `quantplan sensitivity` draws them.

Memory (default): every budget runs in a fresh subprocess (so each peak is its own): `sensitivity_pass` in process
(one worker, as the Ray task runs it, without Ray's own processes) with the batches `batch_plan` picks for that
--max-memory (0, the default: `default_max_memory`, as the tasks run it). Peak: ru_maxrss of the subprocess;
"predicted": `pass_memory(model).peak(tokens held)`; the resident memory after the first and after the last
window (from the pass's `on_windows` counter) shows whether it grows from window to window.

--time: one fresh subprocess runs, on the same tokens and in the same batches, `sensitivity_pass` first (its peak
is read right after it, before anything else ran: the same figure as the memory mode) and then the plain forward
+ backward, --rounds times each, alternating. The plain step is the cheapest honest forward + backward over the
same tokens: the same trunk and chunked vocabulary loss as the pass (`lm_split`, `chunked_nll`: no [tokens, vocab]
logits), the weights of the quantizable layers requiring grad (their weight gradients dY^T X are the products
the pass's Fisher hooks compute per micro-batch) and every other parameter frozen (the tied embedding and head,
norms: a training step would add the head's weight gradient, about 7% more arithmetic on this model). Times are
CPU seconds of the process (torch runs --threads threads, default 2: this machine's cores) and wall seconds.

--predict: `pass_memory` of Llama-3.2-1B, Llama-3.1-8B and Llama-3.1-70B (their configs' shapes, built on the
meta device: nothing allocated) and SmolLM2-135M, with the default budget's batch (`batch_plan`) at --seq-len.
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
GB = 1e9


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _load(args: argparse.Namespace):
    """(model in float32, tokens, max_memory, batch, held): the pass's inputs and batches, as the tasks run it."""
    import torch

    from quantplan.workers.data import calibration_set
    from quantplan.workers.models import load_model
    from quantplan.workers.real_model import fetch_smollm2
    from quantplan.workers.sensitivity import act_set_start, batch_plan, default_max_memory

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model or str(fetch_smollm2()))
    model = model.float().eval()
    tokens = calibration_set(args.data, tok, samples=args.samples, seq_len=args.seq_len, split=args.split).tokens
    max_memory = int(args.budget * GB) if args.budget else default_max_memory(model)  # as the tasks run it
    batch, in_flight = batch_plan(model, tokens.shape[1], 1, max_memory)
    start = act_set_start(tokens, 1, args.act_samples)
    held = min(tokens.shape[0] - start, in_flight * batch)
    return model, tokens, max_memory, batch, held


def _run_pass(model, tokens, args: argparse.Namespace, max_memory: int) -> dict:
    """sensitivity_pass with a counter that records the resident memory and CPU time after every window."""
    from quantplan.workers.sensitivity import pass_windows, sensitivity_pass

    trace: list[tuple[int, int, float]] = []  # (windows done, RSS, CPU s)
    done = [0]

    def counted(k: int) -> None:
        done[0] += k
        trace.append((done[0], _rss_bytes(), time.process_time()))

    cpu, wall = time.process_time(), time.perf_counter()
    sensitivity_pass(model, tokens, act_samples=args.act_samples, max_memory=max_memory, on_windows=counted)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    total = pass_windows(model, tokens, act_samples=args.act_samples, max_memory=max_memory)
    assert done[0] == total, (done[0], total)
    return {"cpu_s": cpu, "wall_s": wall, "peak": _peak_bytes(), "rss_first": trace[0][1], "rss_last": trace[-1][1],
            "rss_max_after_window": max(r for _, r, _ in trace), "window_passes": total}


def _run_plain(model, tokens, batch: int) -> dict:
    """The plain forward + backward (module docstring): chunked loss, quantizable weights requiring grad."""
    from quantplan.quant.apply import quantizable_modules
    from quantplan.workers.sensitivity import chunked_nll, lm_split

    split = lm_split(model)
    assert split is not None, "the plain step needs a model whose loss is chunked (lm_split)"
    trunk, head = split
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [m.weight for m in quantizable_modules(model).values()]
    for w in weights:
        w.requires_grad_(True)
    cpu, wall = time.process_time(), time.perf_counter()
    for part in tokens.split(batch):
        hidden = trunk(input_ids=part, use_cache=False).last_hidden_state[:, :-1]
        loss = chunked_nll(hidden.flatten(0, 1), head.weight, head.bias, part[:, 1:].flatten())
        (loss / (part.numel() - part.shape[0])).backward()
        for w in weights:
            w.grad = None
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    for w in weights:
        w.requires_grad_(False)
    return {"cpu_s": cpu, "wall_s": wall}


def child(args: argparse.Namespace) -> dict:
    """One configuration in this process: load, run, report."""
    from quantplan.workers.sensitivity import pass_memory

    runtime = _rss_bytes()
    model, tokens, max_memory, batch, held = _load(args)
    loaded = _rss_bytes()
    predicted = pass_memory(model).peak(held * tokens.shape[1])
    row = {"budget_gb": args.budget, "max_memory": max_memory, "batch": batch, "held": held,
           "windows": tokens.shape[0], "runtime": runtime, "loaded": loaded, "predicted": predicted,
           "fixed": pass_memory(model).fixed}
    row["pass"] = [_run_pass(model, tokens, args, max_memory)]
    if args.child == "time":
        row["plain"] = []
        for r in range(args.rounds):
            row["plain"].append(_run_plain(model, tokens, batch))
            if r + 1 < args.rounds:
                row["pass"].append(_run_pass(model, tokens, args, max_memory))
    return row


def spawn(args: argparse.Namespace, run: str, budget: float | None) -> dict:
    cmd = [sys.executable, __file__, "--child", run, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--data", args.data, "--split", args.split, "--threads", str(args.threads), "--rounds", str(args.rounds)]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--act-samples", str(args.act_samples)] if args.act_samples else []
    cmd += ["--budget", str(budget)] if budget else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_row(budget: float, r: dict) -> str:
    p = r["pass"][0]
    error = (r["predicted"] - p["peak"]) / p["peak"]
    return (f"| {budget or 'default'} ({r['max_memory'] / GB:.2f}) | {r['windows']} | {r['batch']} | {r['held']} "
            f"| {p['cpu_s']:.0f} | {p['wall_s']:.0f} | {r['loaded'] / GB:.2f} | {p['rss_first'] / GB:.2f} "
            f"| {p['rss_last'] / GB:.2f} | **{p['peak'] / GB:.2f}** | {r['predicted'] / GB:.2f} | {error:+.0%} |")


# (hidden, MLP, blocks, heads, key-value heads, vocabulary, tied embeddings) from the models' config.json
LLAMAS = {
    "SmolLM2-135M": (576, 1536, 30, 9, 3, 49152, True),
    "Llama-3.2-1B": (2048, 8192, 16, 32, 8, 128256, True),
    "Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128256, False),
    "Llama-3.1-70B": (8192, 28672, 80, 64, 8, 128256, False),
}


def predict(seq_len: int) -> None:
    """The memory model for real Llama shapes (meta device) at the default budget of one worker."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantplan.workers.sensitivity import DEFAULT_ACT_BYTES, pass_memory

    print(f"| model | parameters | weights GB | Fisher GB | logits chunk GB | per token MB | fixed GB "
          f"| peak, {seq_len} tokens held GB | peak, 4,096 tokens held GB | tokens in {DEFAULT_ACT_BYTES >> 30} GiB |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (hidden, mlp, blocks, heads, kv, vocab, tied) in LLAMAS.items():
        config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=blocks,
                             num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                             tie_word_embeddings=tied)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        m = pass_memory(model)
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params / 1e9:.3f}B | {m.weights / GB:.2f} | {m.fisher / GB:.2f} "
              f"| {m.logits_chunk / GB:.3f} | {m.per_token / 1e6:.2f} | {m.fixed / GB:.2f} "
              f"| {m.peak(seq_len) / GB:.2f} | {m.peak(4096) / GB:.2f} "
              f"| {DEFAULT_ACT_BYTES // m.per_token} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model directory (default: SmolLM2-135M, fetched and converted once)")
    p.add_argument("--data", default=f"wikitext2:{SHARED / 'wikitext2'}")
    p.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--act-samples", type=int, help="windows of the activation-cost set (default: 4,096 tokens)")
    p.add_argument("--max-memory", type=float, nargs="*", default=[0.0],
                   help="budgets in GB to run the pass with (0: the default budget)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--time", action="store_true", help="time the pass against a plain fwd+bwd, back to back")
    p.add_argument("--rounds", type=int, default=1, help="--time: pass and plain runs each, alternating")
    p.add_argument("--predict", action="store_true", help="the memory model for Llama 1B, 8B, 70B (no run)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--child", choices=("memory", "time"), help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.predict:
        predict(args.seq_len)
        return
    print(f"model {args.model or 'SmolLM2-135M'}; {args.samples} windows of {args.seq_len} ({args.split}), act "
          f"samples {args.act_samples or 'default'}, {args.threads} torch threads; one fresh process per row",
          flush=True)
    rows = []
    if args.time:
        budget = args.max_memory[0] or None
        r = spawn(args, "time", budget)
        rows.append(r)
        print(_memory_hdr() + "\n" + _memory_row(budget or 0.0, r))
        print("| round | pass CPU s | plain CPU s | **pass / plain (CPU)** | pass wall s | plain wall s | pass / plain "
              "(wall) |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for i, (a, b) in enumerate(zip(r["pass"], r["plain"], strict=True)):
            print(f"| {i + 1} | {a['cpu_s']:.0f} | {b['cpu_s']:.0f} | **{a['cpu_s'] / b['cpu_s']:.2f}x** "
                  f"| {a['wall_s']:.0f} | {b['wall_s']:.0f} | {a['wall_s'] / b['wall_s']:.2f}x |")
        cpu = sum(a["cpu_s"] for a in r["pass"]) / sum(b["cpu_s"] for b in r["plain"])
        print(f"pass / plain over all rounds: {cpu:.3f}x CPU")
    else:
        print(_memory_hdr(), flush=True)
        for budget in args.max_memory:
            r = spawn(args, "memory", budget or None)
            rows.append(r)
            print(_memory_row(budget, r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


def _memory_hdr() -> str:
    return ("| budget GB | windows | batch | held | pass CPU s | pass wall s | RSS loaded GB | RSS after window 1 GB "
            "| RSS after the last GB | peak GB | predicted GB | error |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


if __name__ == "__main__":
    main()
