"""`quantplan materialize` and `quantplan apply`: packed artifacts from plans, and artifacts onto base models."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from quantplan.service.console import print_json, stderr, stdout
from quantplan.service.console import table as table_view

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hugging Face id or local model directory (the base).")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="wikitext2 | wikitext2:<dir> | text:<file>[,<file>...]")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 | float16 | bfloat16 | auto")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:<index>")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing artifact directory.")]
BackendOpt = Annotated[str, typer.Option("--backend", help="auto (Triton on CUDA, torch on CPU) | triton | torch")]
FormatOpt = Annotated[str, typer.Option("--format", help="quantplan (the packed artifact, for `quantplan apply`) | "
                                        "compressed-tensors (a Hugging Face checkpoint that vLLM serves)")]
BaseModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="With --format compressed-tensors: the base "
                                                  "model (default: the one the artifact names).")]

ARTIFACT_COLUMNS = ("artifact", "plan", "layers", "avg_bits", "bytes", "perplexity", "kl")
ARTIFACT_FORMATS = {"avg_bits": ".3f", "bytes": ",d", "perplexity": ".3f", "kl": ".4f"}


def materialize_command(
    model: ModelOpt,
    plan: Annotated[Path, typer.Option("--plan", help="Plan JSON to materialize.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact directory to create.")],
    calib_data: Annotated[
        str | None, typer.Option("--calib-data", help="Calibration data spec (default: --data, train split).")
    ] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", min=1, help="Calibration windows.")] = 32,
    calib_seq_len: Annotated[
        int | None, typer.Option("--calib-seq-len", min=2, help="Calibration window length (default: min(L, 512)).")
    ] = None,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", min=2, help="Evaluation window length (default: model max, <=2048).")
    ] = None,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help="Evaluate at most N windows.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    seed: Annotated[int, typer.Option("--seed", help="Calibration sampling seed.")] = 0,
    overwrite: OverwriteOpt = False,
    format: FormatOpt = "quantplan",  # noqa: A002 - the option's name
    json_out: JsonOpt = False,
) -> None:
    """Calibrate, quantize and pack a plan into an artifact directory; measure it on --data (test split).
    With --format compressed-tensors: a Hugging Face checkpoint for vLLM instead (not measured)."""
    from quantplan.quant.artifact import export, export_format
    from quantplan.quant.plan import Plan
    from quantplan.workers.evaluate import evaluate
    from quantplan.workers.pipeline import LoadSpec, load, materialize

    the_plan = Plan.load(plan)
    check = export_format(format).check or _check_materializable
    spec = LoadSpec(model=model, data=data, dtype=dtype, device=device, seq_len=seq_len, max_seq_len=2048,
                    calib_data=calib_data, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                    calib_max_seq_len=512, seed=seed, windows=format == "quantplan", eval_samples=samples)
    loaded = load(spec, plan=the_plan, check=lambda net: check(net, the_plan))  # before data work
    if format != "quantplan":
        path = export(loaded.net, the_plan, loaded.calibration, out, format=format, overwrite=overwrite,
                      batch_size=batch_size, tokenizer=loaded.tokenizer, progress=True)
        print_written({"out": str(path), "format": format, "model": model}, json_out)
        return
    assert loaded.windows is not None
    base = evaluate(loaded.net, loaded.windows, batch_size=batch_size, progress=True)
    info, _ = materialize(loaded, the_plan, out, base_result=base, overwrite=overwrite, batch_size=batch_size,
                          progress=True)
    result = _summary(info) | {"model": model}
    if json_out:
        print_json(result)
        return
    row = {**result, **result["metrics"]}
    stdout.print(table_view(f"materialized {model} (base perplexity {base.perplexity:.3f})", ARTIFACT_COLUMNS,
                            [row], ARTIFACT_FORMATS))


def apply_command(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (from `quantplan materialize`).")],
    model: ModelOpt,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Also write a self-contained directory: base model, tokenizer, artifact."),
    ] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    backend: BackendOpt = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export at --out.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Load the base model, verify the artifact against it, and swap in the quantized layers (optionally --out)."""
    from quantplan.quant.artifact import export_pretrained, load_quantized, read_manifest
    from quantplan.quant.kernels.runtime import resolve_backend
    from quantplan.quant.qlinear import QuantLinear
    from quantplan.workers.models import load_model

    read_manifest(artifact)  # a missing or unreadable artifact fails before the model loads
    net, tokenizer = load_model(model, dtype=dtype, device=device)
    used = resolve_backend(next(net.parameters()).device, backend)  # an unusable backend fails before any work
    if out is not None:  # from the base weights, before the swap changes them
        export_pretrained(net, artifact, out, tokenizer=tokenizer, overwrite=overwrite)
    info = load_quantized(net, artifact, backend=backend)
    kernels = Counter(m.kernel.name for m in net.modules() if isinstance(m, QuantLinear))
    result = _summary(info) | {"model": model, "backend": used, "kernels": dict(kernels),
                               "out": None if out is None else str(out)}
    if json_out:
        print_json(result)
        return
    stderr.print(f"verified {info.path}: {len(info.layers)} layers swapped in ({used} backend)")
    row = {**result, **result["metrics"]}
    title = f"{model} + {info.path} (perplexity and kl as measured at materialization)"
    stdout.print(table_view(title, ARTIFACT_COLUMNS, [row], ARTIFACT_FORMATS))
    if out is not None:
        stderr.print(f"wrote {out}: load it with `quantplan apply {out} --model {out}`")


def _check_materializable(net: Any, plan: Any) -> Any:
    from quantplan.quant.artifact import check_materializable

    return check_materializable(net, plan)


def print_written(result: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(result)
    else:
        stderr.print(f"wrote {result['out']} ({result['format']}); serve it with: vllm serve {result['out']}",
                     highlight=False, soft_wrap=True)


def write_in_format(fetch: Callable[[Path], Any], out: Path, format: str, *,  # noqa: A002
                    model: str | None = None, overwrite: bool = False) -> Path:
    """`fetch(dir)` writes a packed artifact into `dir`; for another format the artifact goes to a temporary
    directory and is converted into `out` from its base model (`model`, default the one its manifest names)."""
    from quantplan.quant.artifact import ARTIFACT_FORMAT_NAME, export_format, read_manifest
    from quantplan.quant.atomic import check_destination
    from quantplan.quant.export_ct import FORMAT_NAME, export_artifact
    from quantplan.workers.models import load_model

    export_format(format)  # an unknown format fails before any work
    if format == ARTIFACT_FORMAT_NAME:
        fetch(out)
        return out
    assert format == FORMAT_NAME, "one conversion so far"
    out = Path(out)
    check_destination(out, overwrite)
    with tempfile.TemporaryDirectory(prefix="quantplan-convert-") as work:
        artifact = Path(work) / "artifact"
        fetch(artifact)
        base = read_manifest(artifact).manifest["base_model"]
        net, tokenizer = load_model(model or base["name"], dtype=base.get("dtype") or "float32")
        return export_artifact(net, artifact, out, tokenizer=tokenizer, overwrite=overwrite)


def _summary(info: Any) -> dict[str, Any]:
    """The JSON fields both commands print: where, for which base, what it holds, cost and measured metrics."""
    from quantplan.workers.plan_eval import plan_label

    manifest = info.manifest
    return {
        "artifact": str(info.path),
        "plan": plan_label(info.plan()),
        "fingerprint": info.fingerprint,
        "layers": len(info.layers),
        "norms": len(manifest["norms"]),
        "files": manifest["files"],
        "cost": dict(info.cost),
        "metrics": dict(info.metrics),
    }
