"""The `quantplan` command line: eval, sensitivity, demo, convert-llama2c (heavy imports inside commands)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Annotated, Any

import typer

from quantplan.errors import QuantPlanError
from quantplan.service.artifact_cmd import apply_command, materialize_command
from quantplan.service.console import print_error, print_json, setup_logging, stderr, stdout
from quantplan.service.console import table as table_view
from quantplan.service.convert_cmd import convert_gguf_command
from quantplan.service.generate_cmd import generate_command
from quantplan.service.jobs_cmd import export_command, leaderboard_command, run_command, runner_command, show_command
from quantplan.service.remote_cmd import cancel_command, download_command, serve_command, status_command, submit_command
from quantplan.service.scratch import datasets_scratch
from quantplan.service.search_cmd import search_command

app = typer.Typer(
    name="quantplan",
    help="Find, materialize and evaluate mixed-precision quantization plans for language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEMO_SCHEMES = ("w4g128:a16", "w8:a8-static", "w4g128:a8-static", "w4g128:a8-dynamic", "w4g128:a8-lae")
EVAL_COLUMNS = ("plan", "avg_bits", "bytes", "perplexity", "kl")
EVAL_FORMATS = {"avg_bits": ".3f", "bytes": ",d", "perplexity": ".3f", "kl": ".4f"}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hugging Face id or local model directory.")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="wikitext2 | wikitext2:<dir> | text:<file>[,<file>...]")]


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
) -> None:
    setup_logging(verbose, quiet)


@app.command("eval")
def eval_command(
    model: ModelOpt,
    data: DataOpt,
    plan: Annotated[
        Path | None, typer.Option("--plan", help="Plan JSON to simulate (adds kl, avg_bits, bytes).")
    ] = None,
    artifact: Annotated[
        Path | None,
        typer.Option("--artifact", help="Materialized artifact: evaluate the real quantized model (adds kl, ...)."),
    ] = None,
    calib_data: Annotated[
        str | None, typer.Option("--calib-data", help="Calibration data spec (default: --data, train split).")
    ] = None,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", min=2, help="Window length (default: model max, <=2048).")
    ] = None,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help="Evaluate at most N windows.")] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", min=1, help="Calibration windows.")] = 32,
    calib_seq_len: Annotated[
        int | None, typer.Option("--calib-seq-len", min=2, help="Calibration window length (default: min(L, 512)).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | float16 | bfloat16 | auto")] = "float32",
    seed: Annotated[int, typer.Option("--seed", help="Calibration sampling seed.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Perplexity of a model on a data set, and with --plan (simulated) or --artifact (real) the KL and size."""
    from quantplan.quant.apply import validate_plan
    from quantplan.quant.artifact import read_manifest, verify_artifact
    from quantplan.quant.plan import Plan
    from quantplan.workers.artifacts import evaluate_artifact
    from quantplan.workers.evaluate import evaluate
    from quantplan.workers.pipeline import LoadSpec, load
    from quantplan.workers.plan_eval import evaluate_plan

    if plan is not None and artifact is not None:
        raise QuantPlanError("pass either --plan (simulate) or --artifact (the materialized model), not both")
    the_plan = Plan.load(plan) if plan is not None else None
    if artifact is not None:
        read_manifest(artifact)  # a missing or unreadable artifact fails before the model loads

    def check(net: Any) -> None:  # before any data work
        if the_plan is not None:
            validate_plan(net, the_plan)
        if artifact is not None:
            verify_artifact(artifact, net)  # checksums and the base fingerprint, before the base evaluation

    spec = LoadSpec(model=model, data=data, dtype=dtype, seq_len=seq_len, max_seq_len=2048, calib_data=calib_data,
                    calib_samples=calib_samples if the_plan is not None else 0, calib_seq_len=calib_seq_len,
                    calib_max_seq_len=512, seed=seed, windows=True, eval_samples=samples)
    loaded = load(spec, plan=the_plan, check=check)
    windows = loaded.windows
    assert windows is not None
    base = evaluate(loaded.net, windows, batch_size=batch_size, progress=True)
    out: dict[str, Any] = {"model": model, "data": str(loaded.data), "seq_len": loaded.seq_len,
                           "windows": int(windows.shape[0])}
    out |= base.to_dict()
    if the_plan is not None:
        result = evaluate_plan(loaded.net, the_plan, windows, loaded.calib_tokens, base_result=base,
                               batch_size=batch_size, progress=True)
        out |= {k: v for k, v in result.to_dict().items() if k not in ("tokens",)}
    if artifact is not None:
        result = evaluate_artifact(loaded.net, artifact, windows, base_result=base, batch_size=batch_size,
                                   progress=True)
        out |= {k: v for k, v in result.to_dict().items() if k not in ("tokens",)} | {"artifact": str(artifact)}
    if json_out:
        print_json(out)
        return
    row = {"plan": out.get("plan", "unquantized"), **out}
    stdout.print(
        table_view(
            f"{model} on {out['data']} ({out['tokens']:,} tokens, seq_len {out['seq_len']})", EVAL_COLUMNS, [row],
            EVAL_FORMATS
        )
    )


@app.command("sensitivity")
def sensitivity_command(
    model: ModelOpt,
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the table (.safetensors).")],
    samples: Annotated[int, typer.Option("--samples", min=1, help="Calibration windows.")] = 128,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", min=2, help="Window length (default: min(512, max)).")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Parallel Ray workers.")] = 1,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="Ray cluster address (env QUANTPLAN_RAY_ADDRESS); default local."),
    ] = None,
    micro_batch: Annotated[int, typer.Option("--micro-batch", min=1, help="Sequences per Fisher micro-batch.")] = 1,
    act_samples: Annotated[int | None, typer.Option(
        "--act-samples", min=1, help="Activation costs on the last N calibration windows (default: 4096 tokens "
        "worth; windows beyond the first 4 forward batches cost a statistics forward).")] = None,
    max_memory: Annotated[float | None, typer.Option(
        "--max-memory", min=0.01, help="GB per worker the pass sizes its batches to (default: its weights, Fisher "
        "sums and 1 GiB of activations, at most half the machine's memory / workers).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Calibration sampling seed.")] = 0,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute even if a cached table exists.")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | float16 | bfloat16 | auto")] = "float32",
    json_out: JsonOpt = False,
) -> None:
    """Fisher sensitivities of every layer to every weight and activation scheme, on Ray workers (cached)."""
    from quantplan.workers.pipeline import LoadSpec, load, loaded_table

    loaded = load(LoadSpec(model=model, data=data, dtype=dtype, seq_len=seq_len, calib_samples=samples, seed=seed))
    table, cached = loaded_table(loaded, workers=workers, address=ray_address, progress=True,
                                 micro_batch=micro_batch, act_samples=act_samples, cache=not no_cache,
                                 max_memory=None if max_memory is None else int(max_memory * 1e9))
    path = table.save(out)
    if json_out:
        print_json(
            {
                "key": table.key,
                "out": str(path),
                "cached": cached,
                "estimator": dict(table.estimator),
                "layers": table.summary(),
            }
        )
        return
    rows = [
        {
            "layer": l.name,
            "params": l.params,
            "w4g128": l.weight_cost.get("w4g128"),
            "w8": l.weight_cost["w8"],
            "a8-static": l.act_cost["a8-static"],
            "a8-dynamic": l.act_cost["a8-dynamic"],
            "act_absmax": l.act_absmax,
        }
        for l in table.layers
    ]
    fmt = {c: ".2e" for c in ("w4g128", "w8", "a8-static", "a8-dynamic")} | {"act_absmax": ".1f", "params": ",d"}
    stdout.print(
        table_view(
            f"predicted loss increase (nats/token), {'cached' if cached else 'computed'}: {path}",
            ["layer", "params", "w4g128", "w8", "a8-static", "a8-dynamic", "act_absmax"],
            rows,
            fmt,
        )
    )


@app.command("demo")
def demo_command(
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Training steps for the demo model.")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Retrain even if a cached model exists.")] = False,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2)] = 128,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help="Evaluate at most N windows.")] = None,
    trials: Annotated[int, typer.Option("--trials", min=0, help="Search trials of the demo's job.")] = 200,
    db: Annotated[str | None, typer.Option("--db", help="Database URL (default: the project database).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Export the artifact here (default: in the cache).")]
    = None,
    json_out: JsonOpt = False,
) -> None:
    """Build a small Llama offline, print its scheme table, run a stored 4.25-bit W4A8 search job (sensitivity,
    search, materialize, apply), and end with the model's leaderboard."""
    from quantplan.quant.plan import Plan
    from quantplan.service.jobs import JobSpec
    from quantplan.service.jobs_cmd import extract_artifact, open_storage, print_leaderboard, run_local_job
    from quantplan.service.views import leaderboard_view, plan_view
    from quantplan.workers.demo import CALIB_SAMPLES, DEFAULT_STEPS, build_demo_model
    from quantplan.workers.evaluate import evaluate
    from quantplan.workers.pipeline import load
    from quantplan.workers.plan_eval import evaluate_plan

    demo = build_demo_model(steps=steps or DEFAULT_STEPS, force=rebuild, progress=True)
    loaded = load(demo.load_spec(seq_len=seq_len, samples=samples))
    net, windows = loaded.net, loaded.windows
    assert windows is not None
    base = evaluate(net, windows, progress=True)
    rows: list[dict[str, Any]] = [{"plan": "FP32", "avg_bits": 32.0, "perplexity": base.perplexity, "kl": 0.0}]
    for scheme in DEMO_SCHEMES:
        result = evaluate_plan(net, Plan.uniform(scheme), windows, loaded.calib_tokens, base_result=base,
                               progress=True)
        rows.append(result.to_dict())
    if not json_out:
        stdout.print(table_view(f"demo model: perplexity on held-out text ({base.tokens:,} tokens)", EVAL_COLUMNS,
                                rows, EVAL_FORMATS))

    # the search as a stored job, run here by the same runner a server uses
    repo, store = open_storage(db)
    spec = JobSpec(model=str(demo.path), data=demo.calib_spec, eval_data=demo.data_spec, budget_bits=4.25,
                   trials=trials, eval_top=2, samples=CALIB_SAMPLES, seq_len=seq_len, eval_samples=samples)
    job = run_local_job(repo, store, spec, progress=not json_out)
    best = next(p for p in repo.plans_for_job(job.id) if any(a.kind == "packed" for a in p.artifacts))
    packed = next(a for a in best.artifacts if a.kind == "packed")
    artifact_dir = extract_artifact(store, packed.sha256, out or demo.path.parent / "artifact", overwrite=True)
    view = plan_view(best)
    searched = {
        "plan": f"searched: {view['label']}",
        "plan_id": best.id,
        "avg_bits": best.avg_bits,
        "bytes": best.bytes,
        "predicted_loss": best.predicted_loss,
        "perplexity": best.metric("perplexity"),
        "kl": best.metric("kl"),
        "perplexity_simulated": best.metric("perplexity_simulated"),
        "artifact": str(artifact_dir),
    }
    board = leaderboard_view(str(demo.path), repo.leaderboard(str(demo.path), act_bits=8, sort="perplexity",
                                                              limit=10, distinct=True))
    if json_out:
        print_json({"model": str(demo.path), "data": demo.data_spec, "tokens": base.tokens, "rows": rows,
                    "job": job.id, "searched": searched, "leaderboard": board})
        return
    stdout.print(
        table_view(
            f"job {job.id}: the searched plan at 4.25 bits (W4A8), materialized and applied with the quantized kernels",
            ("plan", "avg_bits", "pred_loss", "ppl_sim", "ppl_real", "kl"),
            [searched | {"pred_loss": searched["predicted_loss"], "ppl_sim": searched["perplexity_simulated"],
                         "ppl_real": searched["perplexity"]}],
            {**EVAL_FORMATS, "pred_loss": ".4f", "ppl_sim": ".3f", "ppl_real": ".3f"},
        )
    )
    stderr.print(f"artifact exported to {artifact_dir}; apply it with: quantplan apply {artifact_dir} "
                 f"--model {demo.path}", highlight=False, soft_wrap=True)
    print_leaderboard(board)


@app.command("convert-llama2c")
def convert_llama2c_command(
    checkpoint: Annotated[Path, typer.Argument(help="llama2.c checkpoint, e.g. stories260K.bin")],
    tokenizer: Annotated[Path, typer.Argument(help="llama2.c tokenizer, e.g. tok512.bin")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output Hugging Face model directory.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Convert a llama2.c checkpoint and tokenizer to a Hugging Face Llama directory."""
    from quantplan.workers.llama2c import convert_llama2c

    path = convert_llama2c(checkpoint, tokenizer, out, overwrite=overwrite)
    if json_out:
        print_json({"out": str(path)})
    else:
        stderr.print(f"converted {checkpoint} -> {path}")


app.command("materialize")(materialize_command)
app.command("apply")(apply_command)
app.command("search")(search_command)
app.command("run")(run_command)
app.command("runner")(runner_command)
app.command("leaderboard")(leaderboard_command)
app.command("show")(show_command)
app.command("export")(export_command)
app.command("serve")(serve_command)
app.command("submit")(submit_command)
app.command("status")(status_command)
app.command("cancel")(cancel_command)
app.command("download")(download_command)
app.command("convert-gguf")(convert_gguf_command)
app.command("generate")(generate_command)


# a full disk, a quota, a read-only or unwritable place: the environment's fault, said in one line
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: user errors (and a full or unwritable disk) print one line and exit 1, without a
    traceback."""
    try:
        with datasets_scratch():  # temporary copies of data files under the cache, removed at exit
            app(args=argv, prog_name="quantplan")
    except QuantPlanError as e:
        print_error(str(e))
        raise SystemExit(1) from None
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print_error(f"cannot write{where}: {e.strerror or e}; free some space or choose a writable place (the "
                    "output directory, QUANTPLAN_ARTIFACTS, QUANTPLAN_CACHE_DIR)")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
