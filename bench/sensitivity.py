"""Benchmark the sensitivity pass: cost over a plain forward+backward, 2-worker speedup, peak memory.

    python bench/sensitivity.py [--model DIR] [--data SPEC] [--samples 128] [--act-samples N] [--threads 1]

Without --model it converts stories260K from ../shared/data. Prints ratios measured in this one run: the pass
(`sensitivity_pass`: the Fisher forward/backward records the statistics, activation costs on the last
--act-samples sequences) over a plain forward+backward of the same tokens in the batches of --batch-size
sequences the pass runs (the headline), and over one with one micro-batch per backward (one gradient per
micro-batch, as the estimator needs). For comparison it times estimator v3's two passes as well (a statistics
forward over every token, then the Fisher pass with activation costs on every token).
In-process times are CPU seconds of this process (torch runs
--threads threads; with one, time spent waiting for a core shared with other jobs is left out), each the best of
--repeat alternating rounds; the Ray times are wall-clock.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from quantplan.quant.apply import quantizable_modules
from quantplan.quant.modules import linear_weight
from quantplan.workers.data import calibration_set
from quantplan.workers.models import load_model
from quantplan.workers.sensitivity import (
    act_set_start,
    batch_sequences,
    collect_act_stats,
    fisher_sums,
    layer_act_params,
    model_width,
    sensitivity_pass,
    weight_costs,
)
from quantplan.workers.tasks import compute_sensitivity, init_ray

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "stories260K"


def stories260k() -> str:
    from quantplan.workers.llama2c import convert_llama2c

    out = Path(tempfile.mkdtemp()) / "stories260K"
    return str(convert_llama2c(SHARED / "stories260K.bin", SHARED / "tok512.bin", out))


def random_llama(hidden: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=4, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128)
    return LlamaForCausalLM(config).eval()


def plain_forward_backward(model: torch.nn.Module, tokens: torch.Tensor, micro_batch: int) -> None:
    for batch in tokens.split(micro_batch):
        model.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()


def timed(fn, *args, clock=time.perf_counter, **kwargs) -> tuple[float, object]:
    start = clock()
    result = fn(*args, **kwargs)
    return clock() - start, result


def cpu_timed(fn, *args, **kwargs) -> tuple[float, object]:
    return timed(fn, *args, clock=time.process_time, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--data", default=f"text:{SHARED / 'sampled_seed1.txt'}")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--batch-size", type=int, help="sequences per forward in the pass and the batched baseline "
                   "(default: the pass's own, `batch_sequences` for the model's width)")
    p.add_argument("--act-samples", type=int, help="sequences of the activation-cost set (default: one batch)")
    p.add_argument("--repeat", type=int, default=3, help="timing rounds (best of)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (driver and each worker)")
    p.add_argument("--random-hidden", type=int, help="use a randomly initialised Llama of this width (4 layers) "
                   "with the stories260K tokenizer, to see how the overhead shrinks with layer size")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tok = load_model(args.model or stories260k())
    if args.random_hidden:
        model = random_llama(args.random_hidden, len(tok))
    tokens = calibration_set(args.data, tok, samples=args.samples, seq_len=args.seq_len).tokens
    args.batch_size = args.batch_size or batch_sequences(tokens.shape[1], model_width(model))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    plain_forward_backward(copy.deepcopy(model), tokens[:2], args.micro_batch)  # warm-up
    best: dict[str, float] = {}
    for _ in range(args.repeat):  # alternate the passes and keep each one's best time (the machine is shared)
        rounds = {
            "plain": cpu_timed(plain_forward_backward, copy.deepcopy(model), tokens, args.micro_batch)[0],
            "batched": cpu_timed(plain_forward_backward, copy.deepcopy(model), tokens, args.batch_size)[0],
            "batched8": cpu_timed(plain_forward_backward, copy.deepcopy(model), tokens, 8)[0],
        }
        rounds["pass"], (_, sums) = cpu_timed(sensitivity_pass, copy.deepcopy(model), tokens,
                                              micro_batch=args.micro_batch, act_samples=args.act_samples,
                                              batch_size=args.batch_size)
        rounds["stats"], stats = cpu_timed(collect_act_stats, model, tokens)
        params = layer_act_params(model, stats)
        rounds["fisher"], _ = cpu_timed(fisher_sums, copy.deepcopy(model), tokens, params,
                                        micro_batch=args.micro_batch, batch_size=args.batch_size)
        best = {k: min(v, best.get(k, float("inf"))) for k, v in rounds.items()}
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    layers = quantizable_modules(model)
    t_weights, _ = cpu_timed(lambda: [weight_costs(linear_weight(m).detach(), sums.fisher[n] / sums.batches)
                                      for n, m in layers.items()])
    init_ray(None)
    meta = {"key": "bench", "model_info": {}, "calibration": {}, "estimator": {}}
    compute_sensitivity(model, tokens[:4], workers=2, threads=args.threads, **meta)  # start the worker processes
    act = {"act_samples": args.act_samples, "micro_batch": args.micro_batch}
    t_one, _ = timed(compute_sensitivity, model, tokens, workers=1, threads=args.threads, **act, **meta)
    t_two, _ = timed(compute_sensitivity, model, tokens, workers=2, threads=args.threads, **act, **meta)

    n_tok = tokens.numel()
    print(f"model params: {sum(p.numel() for p in model.parameters()):,}; calibration {tuple(tokens.shape)} "
          f"({n_tok:,} tokens), micro-batch {args.micro_batch}, torch threads {torch.get_num_threads()}")
    t_pass, t_v3 = best["pass"], best["stats"] + best["fisher"]
    act_set = tokens.shape[0] - act_set_start(tokens, args.micro_batch, args.act_samples)
    print(f"activation costs on the last {act_set} of {tokens.shape[0]} sequences")
    print(f"plain fwd+bwd, batches of {args.batch_size}:        {best['batched']:8.2f} s")
    print(f"plain fwd+bwd, micro-batch {args.micro_batch}:        {best['plain']:8.2f} s")
    print(f"sensitivity pass (one forward/token): {t_pass:8.2f} s")
    print(f"v3: statistics forward, all tokens:   {best['stats']:8.2f} s")
    print(f"v3: Fisher pass, act costs all tokens:{best['fisher']:8.2f} s  (v3 total {t_v3:.2f} s, "
          f"{t_v3 / best['batched']:.2f}x)")
    print(f"sensitivity pass / plain, batches of {args.batch_size}: {t_pass / best['batched']:5.2f}x  (target <= 1.5)")
    print(f"sensitivity pass / plain, micro-batch {args.micro_batch}: {t_pass / best['plain']:5.2f}x")
    fastest = min(best["batched"], best["batched8"])
    print(f"plain fwd+bwd, batches of 8:          {best['batched8']:8.2f} s  (pass / the faster batched plain: "
          f"{t_pass / fastest:.2f}x)")
    print(f"weight costs, in process:             {t_weights:8.2f} s  ({len(layers)} layers; not in the ratio)")
    print(f"whole table, in process:              {t_pass + t_weights:8.2f} s  (pass + weight costs)")
    print(f"whole table on Ray, 1 worker (wall):  {t_one:8.2f} s")
    print(f"whole table on Ray, 2 workers (wall): {t_two:8.2f} s  (speedup {t_one / t_two:.2f}x)")
    print(f"peak RSS (driver, in-process pass):   {rss1 / 1024:8.1f} MiB "
          f"(+{(rss1 - rss0) / 1024:.1f} MiB over loading)")


if __name__ == "__main__":
    main()
