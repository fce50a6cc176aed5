"""Benchmark the sensitivity pass: cost over a plain forward+backward, 2-worker speedup, peak memory.

    python bench/sensitivity.py [--model DIR] [--data SPEC] [--samples 32] [--seq-len 128] [--threads 1]

Without --model it converts stories260K from ../shared/data. Prints ratios measured in this one run: the pass
(statistics forward + Fisher forward/backward) over a plain forward+backward of the same tokens, both with one
micro-batch per backward (as the estimator needs) and with the batches of --batch-size sequences the pass runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant.apply import quantizable_modules  # noqa: E402
from quant.modules import linear_weight  # noqa: E402
from workers.data import calibration_set  # noqa: E402
from workers.models import load_model  # noqa: E402
from workers.sensitivity import collect_act_stats, fisher_sums, layer_act_params, weight_costs  # noqa: E402
from workers.tasks import compute_sensitivity, init_ray  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "stories260K"


def stories260k() -> str:
    from workers.llama2c import convert_llama2c

    out = Path(tempfile.mkdtemp()) / "stories260K"
    return str(convert_llama2c(SHARED / "stories260K.bin", SHARED / "tok512.bin", out))


def random_llama(hidden: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=4, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128)
    return LlamaForCausalLM(config).eval()


def plain_forward_backward(model: torch.nn.Module, tokens: torch.Tensor, micro_batch: int) -> float:
    start = time.perf_counter()
    for batch in tokens.split(micro_batch):
        model.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    return time.perf_counter() - start


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--data", default=f"text:{SHARED / 'sampled_seed1.txt'}")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward in the pass (fisher_sums)")
    p.add_argument("--repeat", type=int, default=2, help="timing rounds (best of)")
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
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    plain_forward_backward(copy.deepcopy(model), tokens[:2], args.micro_batch)  # warm-up
    t_plain = t_batched = t_stats = t_fisher = float("inf")
    for _ in range(args.repeat):  # alternate the passes and keep each one's best time (the machine is shared)
        t_plain = min(t_plain, plain_forward_backward(copy.deepcopy(model), tokens, args.micro_batch))
        t_batched = min(t_batched, plain_forward_backward(copy.deepcopy(model), tokens, args.batch_size))
        t, stats = timed(collect_act_stats, model, tokens)
        t_stats = min(t_stats, t)
        params = layer_act_params(model, stats)
        t, sums = timed(fisher_sums, copy.deepcopy(model), tokens, params, micro_batch=args.micro_batch,
                        batch_size=args.batch_size)
        t_fisher = min(t_fisher, t)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    layers = quantizable_modules(model)
    t_weights, _ = timed(lambda: [weight_costs(linear_weight(m).detach(), sums.fisher[n] / sums.batches)
                                  for n, m in layers.items()])

    init_ray(None)
    meta = {"key": "bench", "model_info": {}, "calibration": {}, "estimator": {}}
    compute_sensitivity(model, tokens[:4], workers=2, threads=args.threads, **meta)  # start the worker processes
    t_one, _ = timed(compute_sensitivity, model, tokens, workers=1, threads=args.threads, **meta)
    t_two, _ = timed(compute_sensitivity, model, tokens, workers=2, threads=args.threads, **meta)

    n_tok = tokens.numel()
    print(f"model params: {sum(p.numel() for p in model.parameters()):,}; calibration {tuple(tokens.shape)} "
          f"({n_tok:,} tokens), micro-batch {args.micro_batch}, torch threads {torch.get_num_threads()}")
    t_pass = t_stats + t_fisher
    print(f"plain fwd+bwd, micro-batch {args.micro_batch}:       {t_plain:8.2f} s")
    print(f"plain fwd+bwd, batches of {args.batch_size}:       {t_batched:8.2f} s")
    print(f"statistics pass (forward):           {t_stats:8.2f} s")
    print(f"Fisher pass (forward+backward+hooks): {t_fisher:8.2f} s")
    print(f"sensitivity pass / plain fwd+bwd:    {t_pass / t_plain:8.2f}x  (target <= 1.5; Fisher pass alone "
          f"{t_fisher / t_plain:.2f}x; vs plain in batches of {args.batch_size}: {t_pass / t_batched:.2f}x)")
    print(f"weight costs, in process:            {t_weights:8.2f} s  ({len(layers)} layers, not in the ratio)")
    print(f"full table on Ray, 1 worker:         {t_one:8.2f} s")
    print(f"full table on Ray, 2 workers:        {t_two:8.2f} s  (speedup {t_one / t_two:.2f}x)")
    print(f"peak RSS (driver, in-process pass):  {rss1 / 1024:8.1f} MiB (+{(rss1 - rss0) / 1024:.1f} MiB over loading)")


if __name__ == "__main__":
    main()
