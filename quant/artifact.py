"""Packed artifacts: a plan materialized as packed weights, written atomically, verified before it is applied.

An artifact is a directory (docs/ARTIFACTS.md is the contract):

    plan.json               the plan, as given
    quantized.safetensors   per quantized layer: codes, scales, zeros, bias, act_scale, inv_pre_scale;
                            per folded norm: weight, bias, equalization (s); metadata: format, version, layers, norms
    manifest.json           format and version, base model identity and fingerprint, the plan's cost, the sha256 of
                            the other files, measured metrics, and the sha256 of the manifest itself

`materialize` runs `apply_plan` with `QuantLinear.from_float` as the module factory, so the artifact holds exactly
what the fake-quant simulation simulates. `load_quantized` checks the format, every checksum and the base model's
fingerprint, then builds every quantized module, and only then swaps the first one in: a refused artifact leaves
the model untouched.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quant.apply import ApplyReport, apply_plan, resolve_plan, validate_plan
from quant.errors import ArtifactError, PlanError
from quant.fingerprint import model_fingerprint
from quant.kernels.dispatch import select_kernel
from quant.kernels.runtime import UnsupportedSchemeError
from quant.modules import LINEAR_TYPES, FakeQuantLinear, linear_shape
from quant.packing import FORMAT_NAME, FORMAT_VERSION, PackedWeight
from quant.plan import LayerSpec, Plan, PlanCost, atomic_write_text
from quant.qlinear import QuantLinear
from quant.schemes import LayerScheme

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "quantplan.artifact"
ARTIFACT_VERSION = 1
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "quantized.safetensors"
MANIFEST_FILE = "manifest.json"
CHECKSUM_KEY = "manifest_sha256"
HASHED_FILES = (PLAN_FILE, WEIGHTS_FILE)  # the manifest lists these; it checks itself with CHECKSUM_KEY
LAYER_TENSORS = ("codes", "scales", "zeros", "bias", "act_scale", "inv_pre_scale")
PACKED_TENSORS = ("codes", "scales", "zeros")
NORM_TENSORS = ("weight", "bias", "equalization")

Measure = Callable[[Path], Mapping[str, Any]]


@dataclass(frozen=True)
class ArtifactInfo:
    """An artifact directory and its (checked) manifest."""

    path: Path
    manifest: Mapping[str, Any]

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["base_model"]["fingerprint"])

    @property
    def layers(self) -> dict[str, str]:
        """Quantized layer -> its layer scheme."""
        return dict(self.manifest["layers"])

    @property
    def cost(self) -> Mapping[str, Any]:
        """The plan's cost model: bytes, avg_bits, params."""
        return self.manifest["cost"]

    @property
    def metrics(self) -> Mapping[str, Any]:
        """Measured: bytes, avg_bits, artifact_bytes; after a measurement also perplexity, kl, ..."""
        return self.manifest["metrics"]

    def plan(self) -> Plan:
        return Plan.load(self.path / PLAN_FILE)


# -- materialize --------------------------------------------------------------------------------------------
def check_materializable(model: nn.Module, plan: Plan) -> dict[str, LayerSpec]:
    """The specs of the layers `plan` quantizes; PlanError when it does not fit `model` or a layer has no kernel."""
    validate_plan(model, plan)
    specs = {n: s for n, s in resolve_plan(model, plan).items() if s.scheme.quantized}
    if not specs:
        raise PlanError("the plan quantizes no layer (every layer resolves to w16:a16): there is nothing to pack")
    refused: dict[str, list[str]] = {}  # reason -> layers
    for name, spec in specs.items():
        try:
            select_kernel(spec.scheme)
        except UnsupportedSchemeError as e:
            refused.setdefault(str(e), []).append(name)
    if refused:
        reason, names = next(iter(refused.items()))
        raise PlanError(
            f"cannot materialize the plan: {names[0]} (and {len(names) - 1} more): {reason}; give such layers a "
            "scheme a kernel computes (w2/w4/w8 weights, see docs/FORMAT.md) or w16:a16 to keep them unquantized"
        )
    return specs


def materialize(
    model: nn.Module,
    plan: Plan,
    calibration: Any,
    out_dir: str | os.PathLike[str],
    *,
    model_info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    measure: Measure | None = None,
) -> ArtifactInfo:
    """Calibrate, quantize and pack `plan` on a copy of `model` (left untouched) into the artifact `out_dir`.

    `calibration` is what `apply_plan` takes (token ids, a CalibrationSet, or None when no layer needs static
    scales or equalization). The artifact is written to a temporary sibling directory and renamed, so a failure
    leaves nothing. `measure`, if given, is called with the complete staged artifact and returns metrics
    (perplexity, kl, ...) that are recorded in the manifest before the rename.
    """
    out = Path(out_dir)
    _check_destination(out, overwrite)
    check_materializable(model, plan)
    fingerprint = model_fingerprint(model)
    if plan.model.fingerprint and plan.model.fingerprint != fingerprint:
        log.warning("the plan was made for model fingerprint %.12s, this model's is %.12s", plan.model.fingerprint,
                    fingerprint)
    work = copy.deepcopy(model)
    report = apply_plan(work, plan, calibration, batch_size=batch_size, module_factory=QuantLinear.from_float)
    tensors, layers = _artifact_tensors(work, report)
    del work
    base_model = {**_default_identity(model, plan), **(model_info or {}), "fingerprint": fingerprint}
    with _staging(out, overwrite) as tmp:
        atomic_write_text(tmp / PLAN_FILE, plan.to_json())
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=_weights_metadata(layers, report.folded))
        files = {name: _file_entry(tmp / name) for name in HASHED_FILES}
        _write_manifest(tmp, _manifest(base_model, report, layers, tensors, files, calibration))
        if measure is not None:
            record_metrics(tmp, measure(tmp))
    info = read_manifest(out)
    log.info("materialized %d layers into %s (%s bytes of weights)", len(info.layers), out, info.metrics["bytes"])
    return info


def _default_identity(model: nn.Module, plan: Plan) -> dict[str, Any]:
    config = getattr(model, "config", None)
    name = plan.model.name or str(getattr(config, "_name_or_path", "") or "")
    return {"name": name, "revision": plan.model.revision, "architecture": type(model).__name__}


def _artifact_tensors(
    work: nn.Module, report: ApplyReport
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The tensors of every QuantLinear and folded norm of `work`, and each layer's scheme and in_features."""
    modules = dict(work.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name in report.replaced:
        layer = modules[name]
        assert isinstance(layer, QuantLinear), f"{name} was built by QuantLinear.from_float"
        layers[name] = {"scheme": str(layer.scheme), "in_features": layer.in_features}
        tensors |= _named(name, {k: getattr(layer, k) for k in LAYER_TENSORS})
    for norm in report.folded:
        module = modules[norm]
        s = report.norm_scales[norm]
        tensors |= _named(norm, {"weight": module.weight, "bias": getattr(module, "bias", None), "equalization": s})
    return tensors, layers


def _named(prefix: str, tensors: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": t.detach().cpu().contiguous() for k, t in tensors.items() if t is not None}


def _weights_metadata(layers: Mapping[str, Any], norms: Mapping[str, list[str]]) -> dict[str, str]:
    return {
        "format": ARTIFACT_FORMAT,
        "version": str(ARTIFACT_VERSION),
        "packed_format": FORMAT_NAME,
        "packed_version": str(FORMAT_VERSION),
        "layers": json.dumps(layers, separators=(",", ":")),
        "norms": json.dumps(norms, separators=(",", ":")),
    }


def _manifest(
    base_model: Mapping[str, Any],
    report: ApplyReport,
    layers: Mapping[str, Mapping[str, Any]],
    tensors: Mapping[str, torch.Tensor],
    files: Mapping[str, Any],
    calibration: Any,
) -> dict[str, Any]:
    assert report.cost is not None
    return {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "base_model": dict(base_model),
        "packed_format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        "calibration": _calibration_info(calibration),
        "cost": {"bytes": report.cost.bytes, "avg_bits": report.cost.avg_bits, "params": report.cost.params},
        "layers": {name: info["scheme"] for name, info in layers.items()},
        "norms": {norm: list(consumers) for norm, consumers in report.folded.items()},
        "files": dict(files),
        "metrics": _size_metrics(report.cost, layers, tensors, files),
    }


def _calibration_info(calibration: Any) -> dict[str, Any] | None:
    if calibration is None:
        return None
    if hasattr(calibration, "spec_dict"):
        return dict(calibration.spec_dict())
    tokens = getattr(calibration, "tokens", calibration)
    return {"samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])}


def _size_metrics(
    cost: PlanCost, layers: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], files: Mapping[str, Any]
) -> dict[str, Any]:
    """Weight bytes as stored: packed layers from the file, layers kept at 16 bits as the cost model counts them."""
    packed = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.rpartition(".")[2] in PACKED_TENSORS)
    kept = sum(c.bytes for name, c in cost.layers.items() if name not in layers)
    return {
        "bytes": packed + kept,
        "avg_bits": 8 * (packed + kept) / max(cost.params, 1),
        "artifact_bytes": sum(int(f["bytes"]) for f in files.values()),
    }


def record_metrics(path: str | os.PathLike[str], metrics: Mapping[str, Any]) -> ArtifactInfo:
    """Merge measured `metrics` (JSON-able) into the artifact's manifest, rewritten atomically."""
    info = read_manifest(path)
    manifest = dict(info.manifest)
    manifest["metrics"] = {**manifest["metrics"], **_finite(metrics)}
    _write_manifest(info.path, manifest)
    return read_manifest(info.path)


def _finite(value: Any) -> Any:
    """`value` with non-finite floats (an infinite perplexity) as None: strict JSON has no Infinity or NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    return value


# -- files, checksums, the manifest ------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _canonical(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    """The manifest in canonical form, carrying the sha256 of its own canonical form without that key."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    digest = hashlib.sha256(_canonical(body).encode()).hexdigest()
    atomic_write_text(root / MANIFEST_FILE, _canonical({**body, CHECKSUM_KEY: digest}))


def read_manifest(path: str | os.PathLike[str]) -> ArtifactInfo:
    """The artifact at `path` with its manifest checked (format, version, its own checksum); files not yet."""
    root = Path(path)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        what = "directory not found" if not root.exists() else f"no {MANIFEST_FILE} in it"
        raise ArtifactError(
            f"no artifact at {root} ({what}): pass a directory written by `quantplan materialize --out`"
        )
    text = manifest_path.read_text(encoding="utf-8", errors="replace")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({e.msg}): {_corrupted()}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path} is not a JSON object: {_corrupted()}")
    _check_format(manifest_path, manifest.get("format"), manifest.get("version"))
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    digest = hashlib.sha256(_canonical(body).encode()).hexdigest()
    if manifest.get(CHECKSUM_KEY) != digest or text != _canonical(manifest):
        raise ArtifactError(f"{manifest_path} fails its checksum (it was changed after it was written): {_corrupted()}")
    return ArtifactInfo(root, manifest)


def _corrupted() -> str:
    return "the artifact is corrupted or was tampered with; download it again or re-run `quantplan materialize`"


def _check_format(where: Path, fmt: Any, version: Any) -> None:
    if fmt != ARTIFACT_FORMAT:
        raise ArtifactError(f"{where} is not a QuantPlan artifact (format {fmt!r}, expected {ARTIFACT_FORMAT!r})")
    if str(version) != str(ARTIFACT_VERSION):
        raise ArtifactError(
            f"{where}: unknown artifact format version {version!r}; this QuantPlan reads version {ARTIFACT_VERSION}: "
            "upgrade quantplan, or materialize the plan again with this one"
        )


def verify_artifact(path: str | os.PathLike[str], model: nn.Module | None = None) -> ArtifactInfo:
    """Check the manifest, the sha256 and size of every file it lists, and (given `model`) the base fingerprint."""
    info = read_manifest(path)
    files = info.manifest.get("files")
    if not isinstance(files, dict) or sorted(files) != sorted(HASHED_FILES):
        raise ArtifactError(f"{info.path / MANIFEST_FILE} does not list {', '.join(HASHED_FILES)}: {_corrupted()}")
    for name, entry in files.items():
        _verify_file(info.path / name, entry)
    if model is not None:
        _verify_base(info, model_fingerprint(model))
    return info


def _verify_file(path: Path, entry: Mapping[str, Any]) -> None:
    if not path.is_file():
        raise ArtifactError(f"artifact file {path} is missing: {_corrupted()}")
    actual = _file_entry(path)
    if actual["bytes"] != entry.get("bytes") or actual["sha256"] != entry.get("sha256"):
        raise ArtifactError(
            f"{path} fails its sha256 check (manifest {str(entry.get('sha256'))[:12]}..., file "
            f"{actual['sha256'][:12]}...): {_corrupted()}"
        )


def _verify_base(info: ArtifactInfo, fingerprint: str) -> None:
    if fingerprint == info.fingerprint:
        return
    base = info.manifest["base_model"]
    raise ArtifactError(
        f"{info.path} was made for another base model ({base.get('name') or base.get('architecture')}, fingerprint "
        f"{info.fingerprint[:12]}...), not this one (fingerprint {fingerprint[:12]}...): load the base model the "
        "artifact names, with the same weights and dtype"
    )


# -- load ----------------------------------------------------------------------------------------------------
def load_quantized(
    model: nn.Module, path: str | os.PathLike[str], *, backend: str | None = None
) -> ArtifactInfo:
    """Verify the artifact at `path` against `model`, then swap its quantized layers and folded norms in, in place.

    Everything (format, checksums, base fingerprint, tensors, shapes) is checked and every module built before
    the first swap, so an ArtifactError leaves `model` unchanged. `backend`: None/'auto' (Triton on CUDA, torch on
    the CPU), 'triton' or 'torch'. `path` may be an artifact or a directory exported by `export_pretrained`.
    """
    _require_base(model)
    info = verify_artifact(path, model)
    modules = dict(model.named_modules())
    layers, norms = _read_weights(info, modules, backend)
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    with torch.no_grad():
        for norm, tensors in norms.items():
            for key, value in tensors.items():
                getattr(modules[norm], key).copy_(value)
    log.debug("loaded %d quantized layers and %d folded norms from %s", len(layers), len(norms), info.path)
    return info


def _require_base(model: nn.Module) -> None:
    if any(isinstance(m, (QuantLinear, FakeQuantLinear)) for m in model.modules()):
        raise ArtifactError(
            "the model already holds quantized layers: load the artifact into a freshly loaded, unquantized base model"
        )


def _read_weights(
    info: ArtifactInfo, modules: Mapping[str, nn.Module], backend: str | None
) -> tuple[dict[str, QuantLinear], dict[str, dict[str, torch.Tensor]]]:
    """Every QuantLinear and the folded norms' new weights, checked against the model's modules."""
    path = info.path / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        _check_format(path, meta.get("format"), meta.get("version"))
        layers: dict[str, dict[str, Any]] = json.loads(meta["layers"])
        if {n: v["scheme"] for n, v in layers.items()} != info.layers:
            raise ArtifactError(f"{path} and its manifest list different layers: {_corrupted()}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
        built = {n: _build_layer(n, v, meta, tensors, modules, backend) for n, v in layers.items()}
        norms = {n: _norm_tensors(n, tensors, modules) for n in json.loads(meta["norms"])}
    return built, norms


def _build_layer(
    name: str,
    info: Mapping[str, Any],
    meta: Mapping[str, str],
    tensors: Mapping[str, torch.Tensor],
    modules: Mapping[str, nn.Module],
    backend: str | None,
) -> QuantLinear:
    module = modules.get(name)
    if not isinstance(module, LINEAR_TYPES):
        raise ArtifactError(f"the artifact quantizes {name}, which is not a linear layer of this model")
    scheme = LayerScheme.parse(info["scheme"])
    own = {k: tensors[f"{name}.{k}"] for k in LAYER_TENSORS if f"{name}.{k}" in tensors}
    packed_meta = {"format": meta["packed_format"], "version": meta["packed_version"], "scheme": str(scheme.weight),
                   "in_features": str(info["in_features"])}
    packed = PackedWeight.from_tensors(own, packed_meta)
    if (packed.out_features, packed.in_features) != linear_shape(module):
        raise ArtifactError(
            f"{name}: the artifact holds a {packed.out_features}x{packed.in_features} weight, the model's layer is "
            f"{'x'.join(map(str, linear_shape(module)))}: this artifact belongs to another model"
        )
    device = next(module.parameters()).device
    extra = {k: t.to(device) for k, t in own.items() if k not in PACKED_TENSORS}
    return QuantLinear(packed.to(device), scheme.act, extra.get("bias"), act_scale=extra.get("act_scale"),
                       inv_pre_scale=extra.get("inv_pre_scale"), backend=backend)


def _norm_tensors(
    norm: str, tensors: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module]
) -> dict[str, torch.Tensor]:
    module = modules.get(norm)
    out = {}
    for key in ("weight", "bias"):
        value, target = tensors.get(f"{norm}.{key}"), getattr(module, key, None)
        if value is None:
            continue
        if not isinstance(target, torch.Tensor) or target.shape != value.shape:
            raise ArtifactError(f"the artifact folds into {norm}.{key}, which this model lacks or shapes differently")
        out[key] = value.to(target.device, target.dtype)
    return out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# -- export ---------------------------------------------------------------------------------------------------
def export_pretrained(
    model: nn.Module,
    artifact: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """A self-contained directory: the base `model` (save_pretrained), `tokenizer`, and the artifact's files.

    `model` must be the unquantized base the artifact was made for (verified). Load it again with
    `load_quantized(AutoModelForCausalLM.from_pretrained(out_dir), out_dir)`.
    """
    _require_base(model)
    info = verify_artifact(artifact, model)
    out = Path(out_dir)
    _check_destination(out, overwrite)
    with _staging(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in (*HASHED_FILES, MANIFEST_FILE):
            shutil.copyfile(info.path / name, tmp / name)
    return out


# -- atomic directories -------------------------------------------------------------------------------------
def _check_destination(out: Path, overwrite: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ArtifactError(f"{out} already exists: choose another output directory, or pass --overwrite")
    replaceable = out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST_FILE).is_file())
    if not replaceable:
        raise ArtifactError(f"{out} exists and is not an artifact directory: refusing to replace it")


@contextmanager
def _staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` when the block succeeds and removed in any case."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ArtifactError(f"cannot write to {out.parent}: {e.strerror or e}") from None
    tmp.chmod(0o755)  # mkdtemp makes it 0700; an artifact should read like any downloaded directory
    try:
        yield tmp
        _publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op after the rename


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    old = None
    if overwrite and out.exists():
        _check_destination(out, overwrite)  # again: it may have appeared since the first check
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    try:
        os.rename(tmp, out)
    except OSError as e:
        if old is not None:
            os.replace(old, out)
        raise ArtifactError(f"cannot create {out}: {e.strerror or e} (another process may have written it)") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
