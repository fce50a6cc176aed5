"""`quantplan convert-gguf`: a GGUF checkpoint in, a float Hugging Face model directory out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantplan.service.console import print_json, stderr


def convert_gguf_command(
    gguf_file: Annotated[Path, typer.Argument(help="GGUF checkpoint, e.g. SmolLM2-135M-Instruct.Q4_1.gguf")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output Hugging Face model directory.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Convert a Llama-family GGUF checkpoint (F32, F16, Q8_0, Q4_1, ... tensors) to a float32 Hugging Face
    directory with its tokenizer; quantized tensors are dequantized exactly."""
    import json

    from quantplan.workers.gguf import convert_gguf

    path = convert_gguf(gguf_file, out, overwrite=overwrite)
    config = json.loads((path / "config.json").read_text())
    report = {
        "out": str(path),
        "architecture": config["model_type"],
        "layers": config["num_hidden_layers"],
        "vocab_size": config["vocab_size"],
    }
    if json_out:
        print_json(report)
    else:
        stderr.print(f"converted {gguf_file} -> {path} ({report['architecture']}, {report['layers']} layers, "
                     f"vocabulary {report['vocab_size']:,})", highlight=False)
