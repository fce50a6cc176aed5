"""The sensitivity pass on Ray: worker-count invariance, retries then a clear error, bad addresses."""

from __future__ import annotations

import os
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
