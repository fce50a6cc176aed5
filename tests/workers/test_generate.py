"""Greedy generation with a KV cache (quantplan generate, bench/decode.py) on the real stories260K model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantplan.quant.artifact import load_quantized, materialize
from quantplan.quant.plan import Plan
from quantplan.quant.qlinear import QuantLinear, set_cpu_kernels
from quantplan.workers.generate import generate, model_bytes
from quantplan.workers.models import load_model
from tests.service.test_cli import run_cli

PROMPT = "Once upon a time, there was a little girl named Lily. She"


def test_greedy_generation_equals_transformers_generate(stories_hf: Path) -> None:
    net, tok = load_model(str(stories_hf))
    one = tok(PROMPT, return_tensors="pt").input_ids
    ids = torch.cat([one, one.flip(1)])  # two rows of the same length
    got = generate(net, ids, 12)
    with torch.no_grad():
        want = net.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[:, ids.shape[1]:]
    assert torch.equal(got.tokens, want) and got.tokens.shape == (2, 12)
    assert got.prompt_tokens == ids.numel() and got.prefill_s > 0 and got.decode_s > 0
    assert got.decode_tokens_per_s > 0 and got.timings()["new_tokens"] == 24
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        generate(net, ids, 0)


def test_applied_plan_generates_with_the_fast_cpu_kernels(stories_hf: Path, tmp_path: Path) -> None:
    """Decoding on a W4A8 plan with cpu_kernels="fast": the int4pack GEMM where it packs the weight; the model
    is smaller than the float one, and the exact kernels give the same greedy text on this short prompt."""
    net, tok = load_model(str(stories_hf))
    float_bytes = model_bytes(net)
    materialize(net, Plan.uniform("w4g64:a8-dynamic"), None, tmp_path / "art")
    load_quantized(net, tmp_path / "art")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    exact = generate(net, ids, 8)
    assert set_cpu_kernels(net, "fast") == 35
    out = generate(net, ids, 8)
    layers = [m for m in net.modules() if isinstance(m, QuantLinear)]
    packed = [m for m in layers if "int4pack" in m._prepared]
    assert packed and len(packed) < len(layers)  # stories260K's MLP (N = 172: not a multiple of 16) is not packed
    assert all(m.out_features % 16 == 0 for m in packed)
    assert torch.equal(out.tokens, exact.tokens) and model_bytes(net) < float_bytes


def test_generate_command(capsys, stories_hf: Path, tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "generate", "--model", str(stories_hf), "--prompt", PROMPT, "-n", "6", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["text"] and result["new_tokens"] <= 6 and result["prefill_tokens_per_s"] > 0
    assert set(result) >= {"prefill_s", "decode_s", "decode_tokens_per_s", "model_bytes", "prompt_tokens"}
    code, out, err = run_cli(capsys, "generate", "--model", str(stories_hf), "--prompt", PROMPT, "-n", "4")
    assert code == 0 and out.strip() and "tokens/s" in err
    code, _, err = run_cli(capsys, "generate", "--model", str(stories_hf), "--prompt", PROMPT, "--artifact",
                           str(tmp_path / "nothing"))
    assert code != 0 and "error:" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "generate", "--model", str(stories_hf), "--prompt", PROMPT, "--cpu-kernels", "quick")
    assert code != 0 and "unknown --cpu-kernels 'quick'" in err and "Traceback" not in err
