"""`quantplan generate`: load a model (and an artifact onto it) and generate from a prompt, streaming the tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantplan.errors import QuantPlanError
from quantplan.service.console import print_json, stderr, stdout


class GenerateError(QuantPlanError):
    """A prompt or generation setting that cannot be used."""


def generate_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Hugging Face id or local model directory (the base).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The text to continue.")],
    artifact: Annotated[Path | None, typer.Option("--artifact", "-a", help="An artifact to apply to the model "
                                                  "first (from `quantplan materialize` or `download`).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate.")] = 64,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | float16 | bfloat16 | auto")] = "float32",
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:<index>")] = "cpu",
    cpu_kernels: Annotated[str, typer.Option("--cpu-kernels", help="fast (bf16 products: torch's int4 GEMM for "
                                             "decoding, a bf16 GEMM for the prompt) | exact (the integer and fp32 "
                                             "paths evaluations measure)")] = "fast",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads (default: torch's)")]
    = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the text and the timings as one JSON document "
                                           "instead of streaming.")] = False,
) -> None:
    """Greedy generation with a KV cache on the float model, or on the model with --artifact applied: streams the
    text, then prints prefill and decode speed."""
    import torch

    from quantplan.quant.artifact import load_quantized, read_manifest
    from quantplan.quant.kernels.cpu import CPU_KERNEL_MODES
    from quantplan.quant.qlinear import set_cpu_kernels
    from quantplan.workers.generate import generate, model_bytes
    from quantplan.workers.models import load_model

    if cpu_kernels not in CPU_KERNEL_MODES:  # before the model loads
        raise GenerateError(f"unknown --cpu-kernels {cpu_kernels!r}: use one of {', '.join(CPU_KERNEL_MODES)}")
    if threads is not None:
        torch.set_num_threads(threads)
    if artifact is not None:
        read_manifest(artifact)  # a missing or unreadable artifact fails before the model loads
    net, tokenizer = load_model(model, dtype=dtype, device=device)
    if artifact is not None:
        load_quantized(net, artifact)
        set_cpu_kernels(net, cpu_kernels)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise GenerateError("the prompt has no tokens: pass some text with --prompt")
    shown: list[int] = []
    printed = [""]  # the text printed so far

    def stream(token: torch.Tensor) -> None:
        shown.append(int(token[0]))
        if not json_out:  # print what decodes so far, past what was already printed
            text = tokenizer.decode(shown, skip_special_tokens=True)
            stdout.print(text[len(printed[0]):], end="", soft_wrap=True, highlight=False, markup=False)
            printed[0] = text

    result = generate(net, ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id, on_token=stream)
    text = tokenizer.decode(shown, skip_special_tokens=True)
    timings = result.timings() | {"model_bytes": model_bytes(net)}
    if json_out:
        print_json({"model": model, "artifact": None if artifact is None else str(artifact), "prompt": prompt,
                    "text": text, **timings})
        return
    stdout.print()
    stderr.print(f"prefill {timings['prompt_tokens']} tokens in {result.prefill_s:.3f} s "
                 f"({result.prefill_tokens_per_s:.1f} tokens/s); decode {timings['new_tokens']} tokens at "
                 f"{result.decode_tokens_per_s:.1f} tokens/s; model {timings['model_bytes'] / 1e6:.1f} MB")
