"""The compressed-tensors export, checked by the library itself: ModelCompressor decompresses it to QuantPlan's
dequantized weights bit for bit, transformers loads it, and its config validates against QuantizationConfig."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from quantplan.errors import ArtifactError, PlanError
from quantplan.quant import artifact as art
from quantplan.quant.apply import apply_plan
from quantplan.quant.export_ct import export_artifact
from quantplan.quant.plan import Plan
from quantplan.quant.targets import fused_groups, plan_formats
from quantplan.workers.models import load_model
from tests.conftest import DEMO_STEPS
from tests.quant.test_apply import VOCAB
from tests.quant.test_apply import _model as tiny_model

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils.quantization_config import CompressedTensorsConfig  # noqa: E402

CT = "compressed-tensors"


def oracle_plan(big_group: int) -> Plan:
    """One layer kind per acceptance item: folded LAE on q/k/v, w3g64 o_proj, asymmetric w4g32 a8-dynamic gate/up,
    w8 per-channel a8-static down_proj (K = 172 on stories260K: only per-channel tiles it), the rest by default."""
    return Plan.from_layers({  # the first matching pattern wins
        r"re:.*layers\.0\.self_attn\.o_proj": f"w4g{big_group}",  # symmetric, the largest group K allows
        r"re:.*layers\.0\.mlp\.down_proj": "w8:a8-dynamic",
        r"re:.*self_attn\.[qkv]_proj": "w4g32:a8-lae",
        r"re:.*self_attn\.o_proj": "w3g64",
        r"re:.*mlp\.(gate|up)_proj": "w4g32a:a8-dynamic",
        r"re:.*mlp\.down_proj": "w8:a8-static",
    })


class Tok:
    """A tokenizer stand-in for the tiny random models: writes one file."""

    def save_pretrained(self, d: Path) -> None:
        (Path(d) / "tokenizer.json").write_text("{}")


def decompressed(out: Path, like: nn.Module) -> nn.Module:
    """The export read back by compressed-tensors' own ModelCompressor: a fresh model of the same config, the
    quantization config applied and compressed (the layout), the checkpoint loaded, then decompressed."""
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig(**config))
    shell = type(like)(like.config).eval()
    apply_quantization_config(shell, compressor.quantization_config, run_compressed=False)
    compressor.compress_model(shell)
    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(f)))
    result = shell.load_state_dict(state, strict=False)
    heads = {"lm_head.weight", "embed_out.weight"}  # the output head: tied, or renamed on save (GPT-NeoX)
    assert set(result.unexpected_keys) <= heads and set(result.missing_keys) <= heads, result
    for key in result.unexpected_keys:
        shell.get_output_embeddings().weight.data.copy_(state[key])
    shell.tie_weights()
    compressor.decompress_model(shell)
    return shell


def weight_only(model: nn.Module) -> None:
    """Turn compressed-tensors' activation fake-quant off: the model computes with its (decompressed) weights."""
    for m in model.modules():
        if hasattr(m, "quantization_scheme"):
            m.quantization_enabled = False


def assert_same_weights(mine: nn.Module, reference: nn.Module) -> None:
    ref = dict(reference.named_parameters())
    for name, p in mine.named_parameters():
        if name in ref:
            assert p.dtype == ref[name].dtype and torch.equal(p, ref[name]), f"{name} differs"
    assert {n for n, _ in mine.named_parameters()} >= {n for n in ref if not n.endswith("act_scale")}


@pytest.fixture(scope="module")
def stories(stories_hf: Path):
    model, tokenizer = load_model(str(stories_hf))
    return model, tokenizer, torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def demo(demo_cache: Path):
    from quantplan.workers.demo import build_demo_model

    built = build_demo_model(demo_cache, steps=DEMO_STEPS, progress=False)
    model, tokenizer = load_model(str(built.path))
    return model, tokenizer, torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("which", "big_group"), [("stories", 64), ("demo", 128)])
def test_decompresses_bit_identical_to_quantplan(request, tmp_path: Path, which: str, big_group: int) -> None:
    model, tokenizer, tokens = request.getfixturevalue(which)
    plan = oracle_plan(big_group)
    out = art.export(model, plan, tokens, tmp_path / "ct", format=CT, tokenizer=tokenizer)
    simulated = copy.deepcopy(model)
    report = apply_plan(simulated, plan, tokens, quantize_activations=False)  # weight-only fake-quant, folded
    assert report.folded and not report.prescaled, "q/k/v share their norm's LAE scale"
    assert (out / "tokenizer_config.json").is_file() or (out / "tokenizer.json").is_file()
    loaded = decompressed(out, model)
    assert_same_weights(loaded, simulated)  # quantized layers, folded norms, everything else
    weight_only(loaded)
    with torch.no_grad():
        y, y_sim = loaded(input_ids=tokens).logits, simulated(input_ids=tokens).logits
    assert (y - y_sim).abs().max().item() <= 1e-4
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    schemes = {str(s.scheme) for s in report.specs.values()}
    assert len(config["config_groups"]) == len(schemes) and config["format"] == "mixed-precision"


def test_from_pretrained_forward_matches_weight_only_fake_quant(tmp_path: Path, stories) -> None:
    """transformers' own loader (compressed on load, decompressed on the first forward). compressed-tensors 0.20
    cannot load asymmetric pack-quantized groups this way (it does not pack their zero-points on the meta device),
    so this plan is symmetric; the ModelCompressor test above covers the asymmetric ones."""
    model, tokenizer, tokens = stories
    plan = Plan.from_layers({
        r"re:.*self_attn\.[qkv]_proj": "w4g32:a8-lae", r"re:.*o_proj": "w3g64", r"re:.*down_proj": "w8:a8-static",
        r"re:.*layers\.1\.mlp\.(gate|up)_proj": "w8", r"re:.*layers\.[02-9]\.mlp\.(gate|up)_proj": "w4g64:a8-dynamic",
    })
    out = art.export(model, plan, tokens, tmp_path / "ct", format=CT, tokenizer=tokenizer)
    simulated = copy.deepcopy(model)
    apply_plan(simulated, plan, tokens, quantize_activations=False)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    weight_only(loaded)
    with torch.no_grad():
        y, y_sim = loaded(input_ids=tokens).logits, simulated(input_ids=tokens).logits
    assert (y - y_sim).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_config_validates_and_no_fused_group_is_split(tmp_path: Path, arch: str) -> None:
    model = tiny_model(arch)
    tokens = torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    plan = Plan.from_layers({r"re:.*(q_proj|k_proj|v_proj|query_key_value)": "w4g32:a8-lae",
                             r"re:.*(gate_proj|up_proj|dense_h_to_4h)": "w8:a8-dynamic"},
                            default=Plan.uniform("w4g64:a8-static").default)
    out = art.export(model, plan, tokens, tmp_path / "ct", format=CT, tokenizer=Tok())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == CT and config["quantization_status"] == "compressed"
    QuantizationConfig.model_validate(config)
    group_of = {t: g for g, spec in config["config_groups"].items() for t in spec["targets"]}
    for spec in config["config_groups"].values():
        assert spec["format"] == ("int-quantized" if spec["weights"]["num_bits"] == 8 else "pack-quantized")
    groups = fused_groups(group_of, arch)
    assert bool(groups) == (arch != "gpt_neox")
    for group in groups:
        assert len({group_of[n] for n in group}) == 1, group
    assert_same_weights(decompressed(out, model), _simulated(model, plan, tokens))


def _simulated(model: nn.Module, plan: Plan, tokens: torch.Tensor) -> nn.Module:
    sim = copy.deepcopy(model)
    apply_plan(sim, plan, tokens, quantize_activations=False)
    return sim


def test_a_plan_mixing_a_fused_group_is_refused(tmp_path: Path) -> None:
    model = tiny_model("llama")
    plan = Plan.from_layers({r"re:.*layers\.0\.self_attn\.k_proj": "w8"}, default=Plan.uniform("w4g32").default)
    with pytest.raises(PlanError, match=r"(?s)model\.layers\.0\.self_attn\.q_proj.*--target compressed-tensors"):
        art.export(model, plan, None, tmp_path / "ct", format=CT, tokenizer=Tok())
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("arch", "plan", "message"), [
    ("llama", Plan.from_layers({r"re:.*o_proj": "w4g32:a8-lae"}), r"o_proj.*runtime pre-scale"),
    ("llama", Plan.uniform("w16:a8-dynamic"), "activation-only"),
    ("gpt2", Plan.uniform("w4g32"), "Conv1D"),
    ("llama", Plan.uniform("w8a:a8-dynamic"), "asymmetric 8-bit"),
])
def test_inexpressible_layers_are_one_error_and_nothing_is_written(tmp_path, arch, plan, message) -> None:
    model = tiny_model(arch)
    tokens = torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PlanError, match=message):
        art.export(model, plan, tokens, tmp_path / "ct", format=CT, tokenizer=Tok())
    assert not list(tmp_path.iterdir()), "nothing half-written"


def test_existing_directory_and_missing_tokenizer(tmp_path: Path) -> None:
    model = tiny_model("llama")
    (tmp_path / "there").mkdir()
    (tmp_path / "there" / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="already exists"):
        art.export(model, Plan.uniform("w4g32"), None, tmp_path / "there", format=CT, tokenizer=Tok())
    assert (tmp_path / "there" / "keep.txt").read_text() == "mine"
    with pytest.raises(ArtifactError, match="needs the tokenizer"):
        art.export(model, Plan.uniform("w4g32"), None, tmp_path / "ct", format=CT,
                   model_info={"name": str(tmp_path / "no-such-model")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there"]


def test_manifest_checksums_and_overwrite(tmp_path: Path) -> None:
    model = tiny_model("llama")
    out = art.export(model, Plan.uniform("w4g32"), None, tmp_path / "ct", format=CT, tokenizer=Tok())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "quantplan.compressed-tensors-export" and manifest["manifest_sha256"]
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry == art.file_entry(out / name)
    art.export(model, Plan.uniform("w8"), None, out, format=CT, tokenizer=Tok(), overwrite=True)  # an earlier export
    assert json.loads((out / "manifest.json").read_text())["layers"]["model.layers.0.mlp.up_proj"] == "w8:a16"
    with pytest.raises(ArtifactError, match="is not a QuantPlan artifact"):
        art.read_manifest(out)  # `quantplan apply` on it: one clear error


def test_a_stored_artifact_converts_to_the_same_checkpoint(tmp_path: Path, stories) -> None:
    model, tokenizer, tokens = stories
    plan = Plan.from_layers({r"re:.*self_attn\.[qkv]_proj": "w4g32:a8-lae", r"re:.*down_proj": "w8:a8-static"},
                            default=Plan.uniform("w4g64:a8-dynamic").default)
    art.materialize(model, plan, tokens, tmp_path / "art")
    direct = art.export(model, plan, tokens, tmp_path / "direct", format=CT, tokenizer=tokenizer)
    converted = export_artifact(model, tmp_path / "art", tmp_path / "converted", tokenizer=tokenizer)
    a, b = load_file(str(direct / "model.safetensors")), load_file(str(converted / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((direct / "config.json").read_text())["quantization_config"] == \
        json.loads((converted / "config.json").read_text())["quantization_config"]


def test_plan_formats_from_the_plan_alone() -> None:
    assert plan_formats(oracle_plan(64)) == ["compressed-tensors"]  # w3g64: no kernel
    assert plan_formats(Plan.uniform("w4g128:a8-static")) == ["quantplan", "compressed-tensors"]
    mixed = Plan.from_layers({"model.layers.0.self_attn.k_proj": "w8"}, default=Plan.uniform("w4g32").default)
    assert plan_formats(mixed) == ["quantplan"]  # q/k/v would mix schemes
    assert plan_formats(Plan.uniform("w8a:a8-dynamic")) == []
