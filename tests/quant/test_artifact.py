"""Packed artifacts: round trips against the fake-quant simulation, sizes, tampering, bad input, export."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import quantplan.quant as quant
from quantplan.errors import ArtifactError, PlanError
from quantplan.quant import artifact as art
from quantplan.quant.apply import apply_plan
from quantplan.quant.fingerprint import model_fingerprint
from quantplan.quant.packing import PackingError, pack_weight, packed_shapes
from quantplan.quant.plan import Plan
from quantplan.quant.qlinear import QuantLinear
from quantplan.quant.quantizers import quantize_weight
from quantplan.quant.schemes import WeightScheme
from quantplan.workers.artifacts import evaluate_artifact, materialize_plan
from quantplan.workers.data import calibration_set, eval_windows
from quantplan.workers.demo import build_demo_model
from quantplan.workers.evaluate import evaluate
from quantplan.workers.models import load_model
from tests.conftest import DEMO_STEPS
from tests.quant.test_apply import ARCHS, VOCAB
from tests.quant.test_apply import _model as tiny_model

PPL_TOL = 0.005  # acceptance 1: the artifact's perplexity within 0.5% of the simulation
SIZE_TOL = 0.02  # ... and its size on disk (plan.json + quantized.safetensors) within 2% of the plan's cost model
HEADER_MAX = 1024  # the weights file's header: a fixed handful of entries, whatever the number of layers


def mixed_plan(group: int) -> Plan:
    """The acceptance mix: a8-dynamic by default, LAE on q/k/v, weight-only o_proj, w8:a8-static down_proj."""
    return Plan.from_layers(
        {
            r"re:.*self_attn\.[qkv]_proj": "w4g64:a8-lae",
            r"re:.*self_attn\.o_proj": f"w4g{group}:a16",
            r"re:.*mlp\.down_proj": "w8:a8-static",
        },
        default=Plan.uniform(f"w4g{group}:a8-dynamic").default,
    )


# Equalizations that cannot share a norm (runtime pre-scales), SmoothQuant, asymmetric zero-points.
PRESCALED_PLAN = Plan.from_layers(
    {
        r"re:.*mlp\.gate_proj": {"scheme": "w4g32a:a8-smooth", "alpha": 0.6},
        r"re:.*mlp\.up_proj": "w4g64:a8-lae",
        r"re:.*self_attn\.[qkv]_proj": {"scheme": "w4g64:a8-static", "clip": 0.9},
    },
    default=Plan.uniform("w8:a8-dynamic").default,
)


class Case:
    """A base model, its evaluation windows and calibration set."""

    def __init__(self, path: Path, data: str, calib_data: str) -> None:
        self.model, tokenizer = load_model(str(path))
        self.path = path
        self.windows = eval_windows(data, tokenizer, seq_len=128, max_windows=12)
        self.calib = calibration_set(calib_data, tokenizer, samples=8, seq_len=128)
        self.base = evaluate(self.model, self.windows)

    def simulate(self, plan: Plan) -> float:
        model = copy.deepcopy(self.model)
        apply_plan(model, plan, self.calib)
        return evaluate(model, self.windows).perplexity


@pytest.fixture(scope="module")
def stories(stories_hf: Path, stories_dir: Path) -> Case:
    text = f"text:{stories_dir / 'sampled_seed1.txt'}"
    return Case(stories_hf, text, text)


@pytest.fixture(scope="module")
def demo(demo_cache: Path) -> Case:
    built = build_demo_model(demo_cache, steps=DEMO_STEPS, progress=False)  # the session's demo model
    return Case(built.path, built.data_spec, built.calib_spec)


@pytest.fixture(scope="module")
def stories_artifact(tmp_path_factory: pytest.TempPathFactory, stories: Case) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / "stories-mixed"
    materialize_plan(stories.model, mixed_plan(64), stories.calib, out, windows=stories.windows,
                     eval_info={"data": "sampled_seed1"}, base_result=stories.base)
    return out


def unchanged(model: nn.Module, fingerprint: str) -> bool:
    return model_fingerprint(model) == fingerprint and not any(isinstance(m, QuantLinear) for m in model.modules())


def weights_header(path: Path) -> tuple[int, dict]:
    """The safetensors header of the artifact's weights file: its length in bytes (with the 8-byte prefix), parsed."""
    raw = (path / art.WEIGHTS_FILE).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n, json.loads(raw[8 : 8 + n])


def stored_bytes(path: Path, keys: tuple[str, ...]) -> int:
    """Bytes of the flat tensors `keys` as they lie in the file (from the safetensors header)."""
    _, header = weights_header(path)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k in keys)


# -- acceptance 1: round trip ------------------------------------------------------------------------------
@pytest.mark.parametrize(("which", "plan"), [("stories", mixed_plan(64)), ("stories", PRESCALED_PLAN),
                                             ("demo", mixed_plan(128))], ids=["stories", "stories-prescaled", "demo"])
def test_round_trip_matches_simulation_and_cost(request, tmp_path: Path, which: str, plan: Plan) -> None:
    case: Case = request.getfixturevalue(which)
    before = model_fingerprint(case.model)
    info, measured = materialize_plan(case.model, plan, case.calib, tmp_path / "a", windows=case.windows,
                                      base_result=case.base)
    assert unchanged(case.model, before), "materialize works on a copy"
    assert measured is not None and info.metrics["perplexity"] == measured.perplexity
    assert measured.perplexity == pytest.approx(case.simulate(plan), rel=PPL_TOL)
    assert measured.kl > 0 and measured.perplexity < 1.5 * case.base.perplexity

    assert stored_bytes(info.path, art.PACKED_TENSORS) == info.metrics["bytes"]
    assert info.metrics["bytes"] == pytest.approx(info.cost["bytes"], rel=SIZE_TOL)
    assert info.metrics["avg_bits"] == pytest.approx(info.cost["avg_bits"], rel=SIZE_TOL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "no temporary directory left behind"


def test_loaded_modules_and_manifest(stories: Case, stories_artifact: Path) -> None:
    model = copy.deepcopy(stories.model)
    info = quant.load_quantized(model, stories_artifact)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == len(info.layers) == 35  # 7 linears x 5 blocks; the tied output head stays
    kernels = {n.rpartition(".")[2]: m.kernel.name for n, m in quantized.items()}
    assert kernels == {"q_proj": "w4a8", "k_proj": "w4a8", "v_proj": "w4a8", "o_proj": "w4a16",
                       "gate_proj": "w4a8", "up_proj": "w4a8", "down_proj": "w8a8"}
    m = info.manifest
    assert m["base_model"]["fingerprint"] == model_fingerprint(stories.model)
    assert set(m["files"]) == {"plan.json", "quantized.safetensors"}
    assert len(m["norms"]) == 5 and all(len(v) == 3 for v in m["norms"].values())  # input norms feed q, k, v
    assert {"perplexity", "kl", "bytes", "avg_bits", "tokens", "artifact_bytes"} <= set(m["metrics"])
    assert Plan.load(stories_artifact / "plan.json") == mixed_plan(64)


ACCEPTANCE_PLANS = {  # acceptance 1's layer types; stories260K (K = 64) takes group 64 where the demo takes 128
    "stories": [mixed_plan(64), Plan.uniform("w4g64:a8-dynamic"), Plan.uniform("w8:a8-static"),
                Plan.uniform("w4g64:a16")],
    "demo": [mixed_plan(128), Plan.uniform("w4g128:a8-dynamic"), Plan.uniform("w8:a8-static"),
             Plan.uniform("w4g128:a16")],
}


@pytest.mark.parametrize(("which", "i"), [(w, i) for w, plans in ACCEPTANCE_PLANS.items() for i in range(len(plans))])
def test_size_on_disk_within_two_percent_of_cost(tmp_path: Path, request, which: str, i: int) -> None:
    """Acceptance 1's size clause: plan.json + quantized.safetensors within 2% of `Plan.cost`, header included."""
    case: Case = request.getfixturevalue(which)
    info = art.materialize(case.model, ACCEPTANCE_PLANS[which][i], case.calib, tmp_path / "a")
    on_disk = sum((info.path / name).stat().st_size for name in art.HASHED_FILES)
    assert info.metrics["artifact_bytes"] == on_disk
    assert on_disk == pytest.approx(info.cost["bytes"], rel=SIZE_TOL)
    header_bytes, header = weights_header(info.path)
    assert header_bytes <= HEADER_MAX and set(header) - {"__metadata__"} <= set(art.FLAT_TENSORS)
    assert (info.path / art.WEIGHTS_FILE).stat().st_size == header_bytes + stored_bytes(info.path, art.FLAT_TENSORS)


def test_the_only_overhead_is_the_header_the_plan_and_fp32_vectors(tmp_path: Path, stories: Case) -> None:
    """All-LAE on stories260K: o_proj and down_proj keep 1/s (fp32 [K]), which the cost model does not count."""
    info = art.materialize(stories.model, Plan.uniform("w4g64:a8-lae"), stories.calib, tmp_path / "a")
    header_bytes, _ = weights_header(info.path)
    k = {"o_proj": 64, "down_proj": 172}  # in_features of the layers no norm feeds alone
    vectors = 4 * (5 * sum(k.values()) + 10 * 64 + 35)  # 1/s of 10 layers, s of 10 norms, 35 activation scales
    plan_bytes = (info.path / art.PLAN_FILE).stat().st_size
    assert info.metrics["artifact_bytes"] == info.cost["bytes"] + vectors + header_bytes + plan_bytes
    assert len(info.manifest["norms"]) == 10 and header_bytes <= HEADER_MAX


def test_packed_shapes_are_what_pack_weight_makes() -> None:
    torch.manual_seed(0)
    for text, (n, k) in [("w4g128", (64, 172)), ("w4g32a", (20, 96)), ("w8", (64, 172)), ("w8a", (13, 30)),
                         ("w2g64a", (33, 64)), ("w4", (7, 9))]:
        scheme = WeightScheme.parse(text)
        packed = pack_weight(quantize_weight(torch.randn(n, k), scheme, 1.0))
        assert {key: tuple(t.shape) for key, t in packed.tensors().items()} == packed_shapes(scheme, n, k), text


def test_whole_file_within_two_percent_of_cost_on_a_wider_model(tmp_path: Path) -> None:
    """Headers and fp32 vectors are a fixed overhead: negligible once layers have real widths."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4)
    model = LlamaForCausalLM(cfg).eval()
    tokens = torch.randint(0, 128, (2, 16))
    info = art.materialize(model, mixed_plan(128), tokens, tmp_path / "a")
    file_bytes = (info.path / art.WEIGHTS_FILE).stat().st_size
    assert file_bytes == pytest.approx(info.cost["bytes"], rel=SIZE_TOL)
    assert info.metrics["artifact_bytes"] == pytest.approx(info.cost["bytes"], rel=SIZE_TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_other_architectures_match_the_simulation(tmp_path: Path, arch: str) -> None:
    """Biases, LayerNorm biases folded, GPT-2's transposed Conv1D: the same logits as the fake-quant model."""
    model, tokens = tiny_model(arch), torch.randint(2, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    plan = Plan.from_layers({"re:.*(q_proj|query_key_value|c_attn)": "w4g32:a8-lae"},
                            default=Plan.uniform("w8:a8-static").default)
    simulated = copy.deepcopy(model)
    apply_plan(simulated, plan, tokens)
    art.materialize(model, plan, tokens, tmp_path / "a")
    info = quant.load_quantized(model, tmp_path / "a")
    with torch.no_grad():
        y, y_sim = model(input_ids=tokens).logits, simulated(input_ids=tokens).logits
    assert (y - y_sim).abs().max() <= 1e-4 * y_sim.abs().max()
    assert bool(info.manifest["norms"]) == (arch in ("gpt_neox", "gpt2")), "where q, k, v are one layer, its norm folds"
    for norm in info.manifest["norms"]:  # refolded from the stored s: bit for bit what apply_plan folded
        mine, theirs = model.get_submodule(norm), simulated.get_submodule(norm)
        assert all(torch.equal(getattr(mine, p), getattr(theirs, p)) for p in ("weight", "bias")
                   if getattr(mine, p, None) is not None)


# -- acceptance 2: tampering, refused before any module is swapped ------------------------------------------
def tampered_copy(src: Path, dst: Path, file: str, where: float) -> Path:
    shutil.copytree(src, dst)
    data = bytearray((dst / file).read_bytes())
    i = min(int(len(data) * where), len(data) - 1)
    data[i] ^= 0x01
    (dst / file).write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("file", ["plan.json", "quantized.safetensors", "manifest.json"])
@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_a_changed_byte_in_any_file_is_refused(tmp_path, stories: Case, stories_artifact: Path, file: str,
                                               where: float) -> None:
    bad = tampered_copy(stories_artifact, tmp_path / "bad", file, where)
    model = copy.deepcopy(stories.model)
    before = model_fingerprint(model)
    with pytest.raises(ArtifactError, match="corrupted or was tampered with"):
        quant.load_quantized(model, bad)
    assert unchanged(model, before)


def test_another_base_model_is_refused(stories: Case, stories_artifact: Path) -> None:
    model = copy.deepcopy(stories.model)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] += 1e-3
    before = model_fingerprint(model)
    with pytest.raises(ArtifactError, match="was made for another base model"):
        quant.load_quantized(model, stories_artifact)
    assert unchanged(model, before)


def rewrite_manifest(path: Path, **changes: object) -> None:
    manifest = json.loads((path / art.MANIFEST_FILE).read_text())
    art.write_manifest(path, {**manifest, **changes})


@pytest.mark.parametrize(("version", "advice"), [(3, "upgrade quantplan, or materialize"),
                                                   (1, "an older QuantPlan wrote it: materialize the plan again")])
def test_unknown_artifact_version_is_refused(tmp_path, stories: Case, stories_artifact: Path, version: int,
                                             advice: str) -> None:
    bad = shutil.copytree(stories_artifact, tmp_path / f"v{version}")
    rewrite_manifest(bad, version=version)
    model = copy.deepcopy(stories.model)
    before = model_fingerprint(model)
    with pytest.raises(ArtifactError, match=f"unknown artifact format version {version}; this QuantPlan reads "
                                            f"version 2: {advice}"):
        quant.load_quantized(model, bad)
    assert unchanged(model, before)


def rewrite_weights(path: Path, change) -> None:
    """Rewrite the weights file through `change(tensors, metadata)`, and the manifest so its checksums pass."""
    with safe_open(str(path / art.WEIGHTS_FILE), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    change(tensors, meta)
    save_file(tensors, str(path / art.WEIGHTS_FILE), metadata=meta)
    manifest = json.loads((path / art.MANIFEST_FILE).read_text())
    rewrite_manifest(path, files={**manifest["files"], art.WEIGHTS_FILE: art.file_entry(path / art.WEIGHTS_FILE)})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, m: t.update(scales=t["scales"][:-1]), "ends before model.layers.4.self_attn.v_proj's scales"),
        (lambda t, m: t.update(act_scale=torch.cat([t["act_scale"], t["act_scale"][:1]])), "holds values no layer"),
        (lambda t, m: t.update(extra=torch.zeros(2)), "holds tensors this format does not lay out \\(extra\\)"),
        (lambda t, m: m.update(index_sha256="0" * 64), "was laid out for other layers than its manifest lists"),
    ],
    ids=["short", "long", "unknown-tensor", "other-index"],
)
def test_a_consistently_forged_layout_is_refused(tmp_path, stories: Case, stories_artifact: Path, change,
                                                 message: str) -> None:
    """Checksums recomputed: the layout checks still refuse before any module is swapped."""
    bad = shutil.copytree(stories_artifact, tmp_path / "forged")
    rewrite_weights(bad, change)
    model = copy.deepcopy(stories.model)
    before = model_fingerprint(model)
    with pytest.raises(ArtifactError, match=message):
        quant.load_quantized(model, bad)
    assert unchanged(model, before)


def test_unknown_packed_weight_version_is_refused(tmp_path, stories: Case, stories_artifact: Path) -> None:
    bad = shutil.copytree(stories_artifact, tmp_path / "packed-v2")
    rewrite_weights(bad, lambda tensors, meta: meta.update(packed_version="2"))
    model = copy.deepcopy(stories.model)
    before = model_fingerprint(model)
    with pytest.raises(PackingError, match="unsupported packed weight"):
        quant.load_quantized(model, bad)
    assert unchanged(model, before)


def test_missing_artifact_and_missing_file(tmp_path, stories: Case, stories_artifact: Path) -> None:
    with pytest.raises(ArtifactError, match="no artifact at .*directory not found"):
        quant.load_quantized(stories.model, tmp_path / "nowhere")
    partial = shutil.copytree(stories_artifact, tmp_path / "partial")
    (partial / art.WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match="quantized.safetensors is missing"):
        art.verify_artifact(partial)


# -- bad input and atomic writes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        ("w4g128:a8-dynamic", "group size 128 is larger than in_features K=64"),
        ("w3g32:a8-dynamic", "cannot materialize the plan: .*3-bit weights have no packed format"),
        ("w16:a8-static", "cannot materialize the plan: .*activation-only int8 has no kernel"),
        ("w16:a16", "the plan quantizes no layer"),
    ],
)
def test_plans_that_cannot_be_materialized(tmp_path, stories: Case, scheme: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        art.materialize(stories.model, Plan.uniform(scheme), stories.calib, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_a_failure_leaves_nothing_and_existing_output_is_kept(tmp_path, stories: Case) -> None:
    plan = Plan.uniform("w4g64:a8-dynamic")

    def broken_measure(staged: Path) -> dict:
        assert (staged / art.MANIFEST_FILE).is_file()
        raise RuntimeError("evaluation crashed")

    with pytest.raises(RuntimeError, match="evaluation crashed"):
        art.materialize(stories.model, plan, None, tmp_path / "a", measure=broken_measure)
    assert list(tmp_path.iterdir()) == []

    first = art.materialize(stories.model, plan, None, tmp_path / "a")
    with pytest.raises(ArtifactError, match="already exists: choose another output directory, or pass --overwrite"):
        art.materialize(stories.model, mixed_plan(64), stories.calib, tmp_path / "a")
    second = art.materialize(stories.model, mixed_plan(64), stories.calib, tmp_path / "a", overwrite=True)
    assert second.layers != first.layers and sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="is not an artifact directory: refusing to replace it"):
        art.materialize(stories.model, plan, None, tmp_path / "notes", overwrite=True)


def test_record_metrics_keeps_the_manifest_verifiable(tmp_path, stories: Case) -> None:
    info = art.materialize(stories.model, Plan.uniform("w8:a8-dynamic"), None, tmp_path / "a")
    art.record_metrics(info.path, {"perplexity": 4.5, "eval": {"data": "x"}})
    again = art.verify_artifact(info.path, stories.model)
    assert again.metrics["perplexity"] == 4.5 and again.metrics["bytes"] == info.metrics["bytes"]


# -- export -------------------------------------------------------------------------------------------------
def test_export_loads_again_with_from_pretrained(tmp_path, stories: Case, stories_artifact: Path) -> None:
    base, _ = load_model(str(stories.path))
    out = art.export_pretrained(base, stories_artifact, tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # another directory: the same fingerprint
    quant.load_quantized(reloaded, out)
    direct = copy.deepcopy(stories.model)
    quant.load_quantized(direct, stories_artifact)
    with torch.no_grad():
        ids = stories.windows[:2]
        assert torch.equal(reloaded(input_ids=ids).logits, direct(input_ids=ids).logits)
    assert evaluate_artifact(base, out, stories.windows[:2]).kl > 0
    with pytest.raises(ArtifactError, match="the model already holds quantized layers"):
        art.export_pretrained(reloaded, stories_artifact, tmp_path / "hf2")
    with pytest.raises(ArtifactError, match="the model already holds quantized layers"):
        quant.load_quantized(reloaded, out)


def test_import_quant_stays_torch_free() -> None:
    code = ("import sys, quantplan.quant as quant; assert 'torch' not in sys.modules; quant.ArtifactError; "
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_kl_on_a_slice_with_a_known_base(stories: Case, stories_artifact: Path) -> None:
    """With the unquantized model's result known, `kl_windows` runs the reference on the last windows only: the
    perplexity still covers every window (equal to the full evaluation's), the KL is the slice's."""
    full = evaluate_artifact(stories.model, stories_artifact, stories.windows, base_result=stories.base)
    part = evaluate_artifact(stories.model, stories_artifact, stories.windows, base_result=stories.base, kl_windows=3)
    quantized = copy.deepcopy(stories.model)
    quant.load_quantized(quantized, stories_artifact)
    on_slice = evaluate(quantized, stories.windows[-3:], reference=stories.model)
    assert part.tokens == full.tokens and part.nll == pytest.approx(full.nll, rel=1e-9)
    assert part.kl == pytest.approx(on_slice.kl, rel=1e-9) and part.kl_tokens == on_slice.tokens == 3 * 127
    assert full.kl_tokens == full.tokens and part.kl != pytest.approx(full.kl, rel=1e-6)
    assert part.base_perplexity == stories.base.perplexity
    # without a known base the reference runs on every window anyway: the KL covers them all
    assert evaluate_artifact(stories.model, stories_artifact, stories.windows, kl_windows=3).kl == pytest.approx(
        full.kl, rel=1e-9)
    with pytest.raises(ValueError, match="kl_windows must be at least 1"):
        evaluate_artifact(stories.model, stories_artifact, stories.windows, base_result=stories.base, kl_windows=0)
