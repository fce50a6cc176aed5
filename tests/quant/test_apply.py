"""apply_plan on tiny randomly initialised GPT-2, Llama, Qwen2, OPT and GPT-NeoX models built offline."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from quantplan.errors import PlanError
from quantplan.quant.apply import apply_plan, layer_shapes, quantizable_modules
from quantplan.quant.modules import FakeQuantLinear
from quantplan.quant.plan import Plan
from quantplan.quant.quantizers import fake_quantize_weight
from quantplan.quant.schemes import WeightScheme

VOCAB = 96


def _tiny(arch: str) -> nn.Module:
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if arch == "llama":
        return LlamaForCausalLM(
            LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                **common,
            )
        )
    if arch == "qwen2":
        return Qwen2ForCausalLM(
            Qwen2Config(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                **common,
            )
        )
    if arch == "opt":
        return OPTForCausalLM(
            OPTConfig(
                hidden_size=64,
                ffn_dim=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=64,
                max_position_embeddings=64,
                **common,
            )
        )
    if arch == "gpt_neox":
        return GPTNeoXForCausalLM(
            GPTNeoXConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
                **common,
            )
        )
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common))


ARCHS = ["llama", "qwen2", "opt", "gpt_neox", "gpt2"]


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = _tiny(arch).eval()
    # Give the norms non-trivial weights and one outlier channel, as trained models have.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
                m.weight.uniform_(0.5, 1.5)
                m.weight[3] = 8.0
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.1, 0.1)
    return model


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(2, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", ["w16:a8-lae", "w16:a8-smooth"])
def test_equalization_alone_keeps_logits(arch: str, scheme: str, tokens: torch.Tensor) -> None:
    model = _model(arch)
    ref = _logits(model, tokens)
    report = apply_plan(model, Plan.uniform(scheme), tokens, quantize_activations=False)
    assert report.folded, "at least the norms feeding attention and MLP inputs are folded"
    assert (_logits(model, tokens) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_targeted_modules_replaced_nothing_else_touched(arch: str, tokens: torch.Tensor) -> None:
    model = _model(arch)
    before = copy.deepcopy(model)
    names = list(quantizable_modules(model))
    targeted = names[::2]  # every other layer, listed by exact name
    plan = Plan.from_layers({n: "w4g32:a8-dynamic" for n in targeted})
    report = apply_plan(model, plan)
    assert sorted(report.replaced) == sorted(targeted)
    modules = dict(model.named_modules())
    for name in names:
        assert isinstance(modules[name], FakeQuantLinear) == (name in targeted)
    old = dict(before.named_parameters())
    for pname, p in model.named_parameters():
        if not any(pname.startswith(t + ".") for t in targeted):
            assert torch.equal(p, old[pname]), f"{pname} changed"
    for name in targeted:  # the replaced weight is the fake-quantized original, in nn.Linear layout
        w = modules[name].weight
        orig = dict(before.named_modules())[name]
        w0 = orig.weight.t() if type(orig).__name__ == "Conv1D" else orig.weight
        assert torch.equal(w, fake_quantize_weight(w0, WeightScheme.parse("w4g32")))
    assert model.get_output_embeddings() is not None and not isinstance(
        model.get_output_embeddings(), FakeQuantLinear
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_every_scheme_runs_and_error_is_ordered(arch: str, tokens: torch.Tensor) -> None:
    base = _model(arch)
    ref = _logits(base, tokens)
    errors = {}
    for scheme in [
        "w8:a16",
        "w4g32:a16",
        "w8:a8-static",
        "w4g32:a8-dynamic",
        "w4g32:a8-lae",
        "w4g32a:a8-smooth",
        "w2g32:a16",
    ]:
        model = copy.deepcopy(base)
        apply_plan(model, Plan.uniform(scheme), tokens)
        out = _logits(model, tokens)
        assert torch.isfinite(out).all()
        errors[scheme] = (out - ref).pow(2).mean().item()
    assert errors["w8:a16"] < errors["w4g32:a16"] < errors["w2g32:a16"]


def test_mixed_equalization_does_not_fold_shared_norm(tokens: torch.Tensor) -> None:
    model = _model("llama")
    ref = _logits(model, tokens)
    plan = Plan.from_layers({"re:.*q_proj": "w16:a8-lae"}, default=Plan.uniform("w16:a16").default)
    report = apply_plan(model, plan, tokens, quantize_activations=False)
    assert not report.folded  # k_proj/v_proj read the same norm output unchanged: q_proj pre-scales
    assert len(report.prescaled) == 2
    assert (_logits(model, tokens) - ref).abs().max() < 1e-4


def test_plan_errors(tokens: torch.Tensor) -> None:
    model = _model("llama")
    with pytest.raises(PlanError, match="need calibration data"):
        apply_plan(model, Plan.uniform("w4g32:a8-static"))
    with pytest.raises(PlanError, match="not among this model's quantizable layers"):
        apply_plan(model, Plan.from_layers({"model.layers.0.self_attn.qproj": "w4"}))
    with pytest.raises(PlanError, match="larger than in_features"):
        apply_plan(model, Plan.uniform("w4g128"))
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())  # nothing half-applied


def test_layer_shapes_match_cost() -> None:
    model = _model("gpt2")
    shapes = layer_shapes(model)
    assert shapes["transformer.h.0.attn.c_attn"] == (192, 64)  # Conv1D stores [in, out]
    assert Plan.uniform("w4g64").cost(shapes).avg_bits == pytest.approx(4 + 16 / 64)
