"""Serve a compressed-tensors export with vLLM: does it load, how fast does it generate, what is its perplexity.

    python bench/vllm_serve.py DIR [--data FILE] [--prompts 32] [--max-tokens 128] [--seq-len 512] [--windows 16]

DIR is a directory written by `quantplan export ID --format compressed-tensors` (or `materialize --format
compressed-tensors`). Runs only where vLLM and a CUDA GPU exist; elsewhere it says so and exits with status 2
(nothing here has been run on a GPU: docs/ARTIFACTS.md#compressed-tensors-vllm says what is verified where).
Prints one JSON object: the vLLM version, the load time, generation throughput (tokens/s over `--prompts` prompts
of `--max-tokens` new tokens each, greedy) and the perplexity of the text in FILE in windows of `--seq-len` tokens
(vLLM's prompt log-probabilities: the served kernels, activation quantization included).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

NOT_HERE = 2  # exit status where vLLM or a GPU is missing


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="compressed-tensors export (a Hugging Face model directory)")
    parser.add_argument("--data", type=Path, help="text file for the perplexity (default: none measured)")
    parser.add_argument("--prompts", type=int, default=32, help="prompts generated at once for the throughput")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt")
    parser.add_argument("--seq-len", type=int, default=512, help="perplexity window length in tokens")
    parser.add_argument("--windows", type=int, default=16, help="at most this many perplexity windows")
    return parser.parse_args()


def require_vllm():
    """vLLM's LLM and SamplingParams, or an explanation and exit status 2."""
    try:
        import torch
        from vllm import LLM, SamplingParams
    except ImportError as e:
        sys.exit(_not_here(f"vLLM is not installed here ({e}); install it where a CUDA GPU exists: pip install vllm"))
    if not torch.cuda.is_available():
        sys.exit(_not_here("no CUDA GPU is visible; vLLM serves compressed-tensors checkpoints on GPUs"))
    return LLM, SamplingParams


def _not_here(message: str) -> int:
    print(f"bench/vllm_serve.py: {message}", file=sys.stderr)
    return NOT_HERE


def throughput(llm, sampling_params, prompts: int, max_tokens: int) -> dict[str, float]:
    params = sampling_params(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    batch = [f"Once upon a time, story number {i} began" for i in range(prompts)]
    start = time.perf_counter()
    outputs = llm.generate(batch, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"generated_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def perplexity(llm, sampling_params, text: str, seq_len: int, windows: int) -> dict[str, float]:
    """exp(mean NLL) over non-overlapping windows; the first token of each window is not predicted."""
    ids = llm.get_tokenizer()(text)["input_ids"]
    chunks = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:windows]
    if not chunks:
        raise SystemExit(f"the text holds fewer than {seq_len} tokens: pass a longer --data or a smaller --seq-len")
    params = sampling_params(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = llm.generate([{"prompt_token_ids": c} for c in chunks], params)
    nll, count = 0.0, 0
    for chunk, out in zip(chunks, outputs, strict=True):
        for token, logprobs in zip(chunk[1:], out.prompt_logprobs[1:], strict=True):
            nll -= logprobs[token].logprob
            count += 1
    return {"perplexity": math.exp(nll / count), "tokens": count, "windows": len(chunks)}


def main() -> None:
    args = parse_args()
    if not (args.dir / "config.json").is_file():
        sys.exit(f"bench/vllm_serve.py: {args.dir} holds no config.json: pass a compressed-tensors export")
    llm_class, sampling_params = require_vllm()
    import vllm

    start = time.perf_counter()
    llm = llm_class(model=str(args.dir), dtype="auto", enforce_eager=False)
    result = {"dir": str(args.dir), "vllm": vllm.__version__, "load_seconds": time.perf_counter() - start}
    result |= throughput(llm, sampling_params, args.prompts, args.max_tokens)
    if args.data is not None:
        result |= perplexity(llm, sampling_params, args.data.read_text(encoding="utf-8"), args.seq_len, args.windows)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
