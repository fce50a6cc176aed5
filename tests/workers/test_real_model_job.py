"""The whole job on a real pretrained model, reduced (acceptance 5 of issue 14): SmolLM2-135M-Instruct.

A regression that only a real model shows (a 49,152-entry vocabulary, 30 blocks, 210 linear layers, tied
embeddings, activation outliers) fails here. The job runs through `bench/real_model.py`'s `run_job`, so the bench
keeps working too: sensitivity on Ray (2 workers), a W4A8 search at 4.25 bits, measured re-scoring,
materialization and the real kernels' evaluation, on 2 windows of 128 tokens (1 to re-score). Most of its time
is the weight-cost sweep of the sensitivity pass (210 layers x every scheme and clip ratio), whatever the windows.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import time
from pathlib import Path

import pytest

from quantplan.quant import load_quantized
from quantplan.quant.qlinear import QuantLinear
from tests.workers.conftest import SmolLM2

REPO = Path(__file__).resolve().parents[2]


def bench_module():
    """bench/real_model.py, imported under a name no installed package has."""
    spec = importlib.util.spec_from_file_location("bench_real_model", REPO / "bench" / "real_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smollm2_whole_job_reduced(smollm2: SmolLM2, shared_data: Path, ray_local, tmp_path: Path,
                                   all_cores: None) -> None:
    bench = bench_module()
    clock = time.perf_counter()
    result = bench.run_job(str(smollm2.hf_dir), f"wikitext2:{shared_data / 'wikitext2'}", calib_windows=2,
                           seq_len=128, trials=8, eval_top=1, baselines=False, rescore_windows=1, test_windows=2,
                           budgets=((4.25, 8),), workers=2, out=tmp_path / "out", progress=False)
    seconds = time.perf_counter() - clock

    # the sensitivity table: every quantizable layer of the 30 blocks, every cost finite and ordered
    table = result.table
    assert len(table.layers) == 210 and table.layers[0].name == "model.layers.0.self_attn.q_proj"
    assert sum(layer.params for layer in table.layers) == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    for layer in table.layers:
        costs = {**layer.weight_cost, **layer.act_cost}
        assert all(math.isfinite(c) and c >= 0 for c in costs.values()), layer.name
        assert 0 < layer.weight_cost["w8"] < layer.weight_cost["w4g128"], layer.name
        assert layer.act_cost["a8-static"] > 0, layer.name

    # the search: a plan within the budget, measured on the slice
    [search] = result.searches
    report, final = search["report"], search["final"]
    assert report.best is not None and report.best.under_budget and report.best.avg_bits <= 4.25
    assert report.best.label in report.measured
    assert search["how"] == "materialized, real kernels"

    # the materialized plan with the real kernels on the test windows: finite, near the float model
    base = result.base
    assert result.loaded.windows.shape == (2, 128) and base.tokens == final.tokens == 2 * 127
    assert 10 < base.perplexity < 200  # a working language model on 2 x 128 WikiText-2 test tokens
    assert math.isfinite(final.perplexity) and base.perplexity * 0.9 < final.perplexity < 3 * base.perplexity
    assert 0 < final.kl < 1.5 and final.avg_bits <= 4.25

    # the artifact loads into a fresh copy of the model, its quantized layers swapped in (w16 layers stay nn.Linear)
    model = copy.deepcopy(result.loaded.net)
    info = load_quantized(model, search["artifact"])
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(info.layers) >= 200

    # every stage timed, the Ray workers' memory seen
    stages = {row["stage"].split(":")[0]: row for row in result.stages}
    assert {"load", "sensitivity", "search 4.25 bits, W4A8", "re-score 4.25 bits, W4A8"} <= set(stages)
    assert all(row["seconds"] > 0 and row["driver"] > 0 for row in result.stages)
    assert stages["sensitivity"]["worker"] > 0
    rows = result.rows()
    assert [r["windows"] for r in rows] == ["test", "slice", "test"]
    print(f"\nSmolLM2-135M reduced job: {seconds:.1f} s (fetch + convert {smollm2.seconds:.1f} s before it); "
          + "; ".join(f"{r['stage']} {r['seconds']:.1f} s" for r in result.stages)
          + f"; float ppl {base.perplexity:.2f}, plan ppl {final.perplexity:.2f}, KL {final.kl:.4f}")
