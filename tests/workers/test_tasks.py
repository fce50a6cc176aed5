"""The sensitivity pass on Ray: worker-count invariance, retries then a clear error, bad addresses."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantplan.errors import QuantPlanError
from quantplan.progress import Progress, ProgressEvent
from quantplan.workers.data import calibration_set
from quantplan.workers.models import load_model
from quantplan.workers.sensitivity import default_max_memory, pass_windows
from quantplan.workers.tasks import RayError, compute_sensitivity, init_ray


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("act_samples", [None, 3])
def test_two_workers_give_the_same_table_as_one(ray_local, stories_hf: Path, stories_dir: Path,
                                                act_samples: int | None) -> None:
    """One worker runs the fused pass; two run Fisher-only shards, then the act set's shards (with 3 act
    samples, 5 sequences come before the act set)."""
    model, tok = load_model(str(stories_hf))
    calib = calibration_set(f"text:{stories_dir / 'sampled_seed1.txt'}", tok, samples=8, seq_len=64, seed=3)
    meta = {"key": "k", "model_info": {}, "calibration": {}, "estimator": {}, "act_samples": act_samples}
    events: dict[int, list[ProgressEvent]] = {1: [], 2: []}
    one = compute_sensitivity(model, calib.tokens, workers=1, progress=Progress(events[1].append), **meta)
    two = compute_sensitivity(model, calib.tokens, workers=2, progress=Progress(events[2].append), **meta)
    # progress counts windows across the workers (the two-worker act set twice: statistics, then Fisher) and
    # layers for the weight costs, each step from 0 to its total
    fused = pass_windows(model, calib.tokens, act_samples=act_samples, max_memory=default_max_memory(model))
    assert fused >= 8  # every window once, act-set windows beyond those held at once twice
    for workers, total in ((1, fused), (2, 8 + (act_samples or 8))):
        steps = {(e.step, e.unit, e.total) for e in events[workers]}
        assert steps == {("sensitivity pass", "windows", total), ("weight costs", "layers", len(one.layers))}
        for step, _, total in steps:
            done = [e.done for e in events[workers] if e.step == step]
            assert done[0] == 0 and done[-1] == total and done == sorted(done)
    assert one.estimator["batches"] == two.estimator["batches"] == 8
    assert one.estimator["act_batches"] == two.estimator["act_batches"] == (act_samples or 8)
    for a, b in zip(one.layers, two.layers, strict=True):
        assert a.name == b.name and a.feeder == b.feeder and a.act_absmax == b.act_absmax
        for costs_a, costs_b in ((a.weight_cost, b.weight_cost), (a.act_cost, b.act_cost)):
            assert costs_a.keys() == costs_b.keys()
            for k in costs_a:
                assert costs_b[k] == pytest.approx(costs_a[k], rel=1e-4, abs=1e-12), (a.name, k)
        assert a.clip == b.clip
    for name, t in one.tensors.items():
        torch.testing.assert_close(two.tensors[name].float(), t.float(), rtol=1e-3, atol=1e-8)


class CrashingModel(nn.Module):
    """Kills the worker process on every forward pass, counting attempts in a file."""

    def __init__(self, counter: str) -> None:
        super().__init__()
        self.inner = _tiny_llama()
        self.counter = counter

    def forward(self, **_kwargs: object) -> None:
        with open(self.counter, "a") as f:
            f.write("x")
        os._exit(1)


class RaisingModel(CrashingModel):
    def forward(self, **_kwargs: object) -> None:
        with open(self.counter, "a") as f:
            f.write("x")
        raise RuntimeError("boom in the worker")


@pytest.mark.parametrize(("model_cls", "workers", "stage"), [
    (RaisingModel, 1, "sensitivity pass"),
    (CrashingModel, 1, "sensitivity pass"),
    (RaisingModel, 2, "sensitivity pass"),
])
def test_failing_worker_is_retried_then_reported(ray_local, tmp_path: Path, model_cls: type, workers: int,
                                                 stage: str) -> None:
    counter = tmp_path / "attempts"
    tokens = torch.randint(0, 64, (1, 8))  # one shard: one task
    with pytest.raises(RayError, match=f"{stage} task failed after 3 attempts") as info:
        compute_sensitivity(model_cls(str(counter)), tokens, workers=workers, key="k", model_info={},
                            calibration={}, estimator={})
    assert counter.read_text() == "xxx"  # one try plus MAX_RETRIES retries
    if model_cls is RaisingModel:
        assert "boom in the worker" in str(info.value)


def test_unreachable_ray_address_fails_fast() -> None:
    with pytest.raises(RayError, match="cannot reach the Ray cluster at 127.0.0.1:9"):
        init_ray("127.0.0.1:9")
    with pytest.raises(RayError, match="not host:port"):
        init_ray("nonsense")


def test_model_without_quantizable_layers() -> None:
    with pytest.raises(QuantPlanError, match="no quantizable layer"):
        compute_sensitivity(nn.Sequential(nn.ReLU()), torch.zeros(1, 4, dtype=torch.long))


def test_plans_measured_together_equal_one_evaluation_each(ray_local, stories_hf: Path, stories_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """measure_plans shares the calibration statistics and the base model's pass between plans, shards the
    windows over the workers and groups the plans; every plan measures as evaluate_plan alone measures it."""
    from quantplan.quant.plan import Plan
    from quantplan.workers import tasks
    from quantplan.workers.plan_eval import evaluate_plan

    model, tok = load_model(str(stories_hf))
    calib = calibration_set(f"text:{stories_dir / 'sampled_seed1.txt'}", tok, samples=4, seq_len=64, seed=3)
    windows = calibration_set(f"text:{stories_dir / 'sampled_seed1.txt'}", tok, samples=5, seq_len=64, seed=4).tokens
    plans = [Plan.uniform(s) for s in ("w4g32:a8-static", "w4g32:a8-lae", "w8:a8-smooth", "w4:a16")]
    alone = [evaluate_plan(model, p, windows, calib.tokens) for p in plans]
    events: list[ProgressEvent] = []
    base, together = tasks.measure_plans(model, plans, windows, calib.tokens, workers=2,
                                         progress=Progress(events.append))
    monkeypatch.setattr(tasks, "PLAN_GROUP_MAX", 3)  # two groups (3 + 1 plans), one shard each
    grouped = tasks.evaluate_plans(model, plans, windows, calib.tokens, workers=2)
    for a, t, g in zip(alone, together, grouped, strict=True):
        assert (t.plan, t.tokens, t.avg_bits, t.bytes) == (a.plan, a.tokens, a.avg_bits, a.bytes)
        for got in (t, g):
            assert got.nll == pytest.approx(a.nll, rel=1e-6) and got.kl == pytest.approx(a.kl, rel=1e-5)
            assert got.base_perplexity == pytest.approx(a.base_perplexity, rel=1e-9)
    assert base.perplexity == pytest.approx(alone[0].base_perplexity, rel=1e-9)
    assert len({a.kl for a in alone}) == 4  # four different plans, not one measured four times
    totals = {(e.step, e.unit, e.total) for e in events}
    assert totals == {("calibration", "windows", 4), ("plan evaluation", "windows", 4 * 5)}
    assert all(e.done == e.total for e in events if e is events[-1])


def test_models_evaluated_on_sharded_windows_equal_one_pass(ray_local, stories_hf: Path, stories_dir: Path) -> None:
    """evaluate_models shards the windows over the workers and ships the models as they are (a real quantized
    model with packed weights here): the merged numbers are evaluate_many's on all windows at once."""
    import copy
    import tempfile

    from quantplan.quant.artifact import load_quantized, materialize
    from quantplan.quant.plan import Plan
    from quantplan.workers.evaluate import evaluate_many
    from quantplan.workers.tasks import evaluate_models

    model, tok = load_model(str(stories_hf))
    windows = calibration_set(f"text:{stories_dir / 'sampled_seed1.txt'}", tok, samples=5, seq_len=64, seed=4).tokens
    with tempfile.TemporaryDirectory() as tmp:
        materialize(model, Plan.uniform("w4g32:a8-dynamic"), None, f"{tmp}/a")
        quantized = copy.deepcopy(model)
        load_quantized(quantized, f"{tmp}/a")
    events: list[ProgressEvent] = []
    base, (result,) = evaluate_models(model, [quantized], windows, workers=2, progress=Progress(events.append))
    want_base, (want,) = evaluate_many(model, [quantized], windows)
    assert base.nll == pytest.approx(want_base.nll, rel=1e-9) and result.tokens == want.tokens == 5 * 63
    # the quantized model's W4A8 CPU path depends on the rows per call (the integer reference below 8 x g rows,
    # the float GEMM on dequantized weights above): the shards (192 and 128 rows) and the single batch (320 rows)
    # take different paths, equal to float rounding
    assert result.nll == pytest.approx(want.nll, rel=1e-6) and result.kl == pytest.approx(want.kl, rel=1e-4)
    assert result.kl > 0 and events[-1].done == events[-1].total == 5


def test_reference_result_is_measured_once_per_model_and_windows(ray_local, stories_hf: Path, stories_dir: Path,
                                                                 tmp_path: Path, monkeypatch) -> None:
    """The unquantized model's result on the evaluation windows is cached by weights and tokens: the second call
    reads it back, other windows or another model measure again."""
    from quantplan.workers.evaluate import evaluate
    from quantplan.workers.pipeline import LoadSpec, load, reference_result

    monkeypatch.setenv("QUANTPLAN_CACHE_DIR", str(tmp_path))
    text = f"text:{stories_dir / 'sampled_seed1.txt'}"
    loaded = load(LoadSpec(model=str(stories_hf), data=text, seq_len=64, windows=True, eval_samples=4))
    first, cached = reference_result(loaded, workers=2)
    assert not cached and first.kl is None
    assert first.nll == pytest.approx(evaluate(loaded.net, loaded.windows).nll, rel=1e-9)
    again, cached = reference_result(loaded, workers=2)
    assert cached and again == first
    fewer = replace(loaded, windows=loaded.windows[:2])
    assert reference_result(fewer, workers=2)[1] is False
    with torch.no_grad():
        loaded.net.get_input_embeddings().weight.mul_(1.01)  # another model: another fingerprint
    other = replace(loaded)  # a new Loaded hashes the weights again
    assert other.fingerprint != loaded.fingerprint
    changed, cached = reference_result(other, workers=2)
    assert not cached and changed.nll != first.nll
    assert len(list((tmp_path / "reference").glob("*.json"))) == 3
