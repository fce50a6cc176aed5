"""Packed artifacts: a plan materialized as packed weights, written atomically, verified before it is applied.

An artifact is a directory (docs/ARTIFACTS.md is the contract):

    plan.json               the plan, as given
    quantized.safetensors   one flat tensor per kind, concatenated over the quantized layers in name order: codes,
                            scales, zeros, act_scale, inv_pre_scale; equalization (s) over the folded norms in
                            name order; metadata: format, version, packed format, index_sha256
    manifest.json           format and version, base model identity and fingerprint, the plan's cost, the layers and
                            folded norms (the index), the sha256 of the other files, measured metrics, and the sha256
                            of the manifest itself

A layer's pieces follow from its scheme, its shape in the base model and whether a norm took its s, so the file
needs no per-layer tensor entries (whose safetensors header would outweigh the scales of a small model): a reader
cuts them back out in the same order. Biases and folded norms are not stored: the fingerprinted base model holds
the biases, and `load_quantized` divides the base norm by the stored s exactly as `apply_plan` did.

`materialize` runs `apply_plan` with `QuantLinear.from_float` as the module factory, so the artifact holds exactly
what the fake-quant simulation simulates. That artifact is the first of the export formats (`EXPORT_FORMATS`,
"quantplan"): `export` quantizes the same way and hands the quantized copy to the format registered under a name,
so another format is one `register_export_format` call. `load_quantized` checks the format, every checksum and the
base model's fingerprint, then builds every quantized module, and only then swaps the first one in: a refused
artifact leaves the model untouched.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quantplan.errors import ArtifactError, PlanError
from quantplan.progress import Progress
from quantplan.quant.act_handlers import act_handler, registered_param_names
from quantplan.quant.apply import ApplyReport, apply_plan, resolve_plan, validate_plan
from quantplan.quant.atomic import MARKER, check_destination, staging_dir
from quantplan.quant.fingerprint import model_fingerprint
from quantplan.quant.kernels.dispatch import select_kernel
from quantplan.quant.kernels.runtime import UnsupportedSchemeError
from quantplan.quant.modules import LINEAR_TYPES, FakeQuantLinear, linear_shape
from quantplan.quant.packing import FORMAT_NAME, FORMAT_VERSION, PackedWeight, packed_shapes
from quantplan.quant.packing import check_format as check_packed_format
from quantplan.quant.plan import LayerSpec, Plan, PlanCost, atomic_write_text
from quantplan.quant.qlinear import QuantLinear
from quantplan.quant.schemes import LayerScheme

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "quantplan.artifact"
ARTIFACT_FORMAT_NAME = "quantplan"  # its name among the export formats
ARTIFACT_VERSION = 2  # 1: one safetensors entry per layer tensor and folded norm; 2: flat tensors per kind
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "quantized.safetensors"
MANIFEST_FILE = MARKER  # quant.atomic replaces only directories that hold it
CHECKSUM_KEY = "manifest_sha256"
HASHED_FILES = (PLAN_FILE, WEIGHTS_FILE)  # the manifest lists these; it checks itself with CHECKSUM_KEY
PACKED_TENSORS = ("codes", "scales", "zeros")
# Stored per quantized layer, in this order: the packed weight, its strategy's activation parameters (the built-in
# strategies' static scale `act_scale`; a registered strategy's handler names its own), 1/s unless a norm took s.
LAYER_TENSORS = (*PACKED_TENSORS, "act_scale", "inv_pre_scale")
FLAT_TENSORS = (*LAYER_TENSORS, "equalization")  # the tensors of the weights file; equalization: per folded norm

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
def check_materializable(
    model: nn.Module, plan: Plan, resolved: Mapping[str, LayerSpec] | None = None
) -> dict[str, LayerSpec]:
    """The specs of the layers `plan` quantizes; PlanError when it does not fit `model` or a layer has no kernel.
    `resolved`: `resolve_plan(model, plan)` when the caller has it."""
    resolved = resolve_plan(model, plan) if resolved is None else resolved
    validate_plan(model, plan, resolved)
    specs = {n: s for n, s in resolved.items() if s.scheme.quantized}
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


@dataclass
class ExportJob:
    """What an export format writes from: the plan, quantized once (QuantLinear layers) on a copy of the model."""

    model: nn.Module  # the base model, untouched
    quantized: nn.Module  # the copy holding QuantLinear layers (and the folded norms)
    plan: Plan
    report: ApplyReport  # replaced layers, folded norms and their s, the resolved specs, the plan's cost
    base_model: Mapping[str, Any]  # identity (name, revision, architecture) and fingerprint
    calibration: Any
    measure: Measure | None = None  # formats that can be loaded back call it with the staged directory
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportFormat:
    """A registered way to write a quantized model: `write(job, staging_dir)` fills a fresh directory that
    `export` then renames into place (so a failure leaves nothing)."""

    name: str
    write: Callable[[ExportJob, Path], None]
    description: str = ""
    # How a quantized layer is built for this format (apply_plan's module_factory; QuantLinear.from_float when
    # None), and the check run before any work (check_materializable when None): both see what `export` sees.
    module_factory: Callable[..., nn.Module] | None = None
    check: Callable[..., Mapping[str, LayerSpec]] | None = None


EXPORT_FORMATS: dict[str, ExportFormat] = {}
# Formats shipped in their own module, registered when that module is imported (on first use by name).
BUILTIN_FORMAT_MODULES = {"compressed-tensors": "quantplan.quant.export_ct"}


def register_export_format(fmt: ExportFormat) -> ExportFormat:
    if fmt.name in EXPORT_FORMATS:
        raise ArtifactError(f"export format {fmt.name!r} is already registered")
    EXPORT_FORMATS[fmt.name] = fmt
    return fmt


def unregister_export_format(name: str) -> None:
    if name == ARTIFACT_FORMAT_NAME:
        raise ArtifactError(f"{name!r} is the built-in artifact format and cannot be unregistered")
    EXPORT_FORMATS.pop(name, None)


def export_format(name: str) -> ExportFormat:
    if name not in EXPORT_FORMATS and name in BUILTIN_FORMAT_MODULES:
        importlib.import_module(BUILTIN_FORMAT_MODULES[name])
    fmt = EXPORT_FORMATS.get(name)
    if fmt is None:
        names = dict.fromkeys([*EXPORT_FORMATS, *BUILTIN_FORMAT_MODULES])
        raise ArtifactError(f"unknown export format {name!r}; use one of {', '.join(names)}")
    return fmt


def export(
    model: nn.Module,
    plan: Plan,
    calibration: Any,
    out_dir: str | os.PathLike[str],
    *,
    format: str = "quantplan",  # noqa: A002 - the user-facing word
    model_info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    measure: Measure | None = None,
    resolved: Mapping[str, LayerSpec] | None = None,
    progress: bool | Progress = False,
    tokenizer: Any = None,
    stats: Any = None,
) -> Path:
    """Calibrate, quantize and pack `plan` on a copy of `model` (left untouched), then write it in `format` into
    `out_dir` (staged in a temporary sibling directory and renamed). Arguments as `materialize`'s; `tokenizer`: for
    formats that write a complete model directory (compressed-tensors; else loaded from the model's name); `stats`:
    the calibration statistics when they are known (`apply_plan(stats=)`: not collected again)."""
    fmt = export_format(format)
    out = Path(out_dir)
    check_destination(out, overwrite)  # before the expensive part; staging_dir checks again
    resolved = resolve_plan(model, plan) if resolved is None else resolved
    (fmt.check or check_materializable)(model, plan, resolved)
    fingerprint = model_fingerprint(model)
    if plan.model.fingerprint and plan.model.fingerprint != fingerprint:
        log.warning("the plan was made for model fingerprint %.12s, this model's is %.12s", plan.model.fingerprint,
                    fingerprint)
    work = copy.deepcopy(model)
    report = apply_plan(work, plan, calibration, batch_size=batch_size,
                        module_factory=fmt.module_factory or QuantLinear.from_float, resolved=resolved,
                        progress=progress, stats=stats)
    base_model = {**_default_identity(model, plan), **(model_info or {}), "fingerprint": fingerprint}
    job = ExportJob(model, work, plan, report, base_model, calibration, measure,
                    meta={} if tokenizer is None else {"tokenizer": tokenizer})
    del work
    with staging_dir(out, overwrite) as tmp:
        fmt.write(job, tmp)
    return out


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
    resolved: Mapping[str, LayerSpec] | None = None,
    progress: bool | Progress = False,
    stats: Any = None,
) -> ArtifactInfo:
    """Calibrate, quantize and pack `plan` on a copy of `model` (left untouched) into the artifact `out_dir`.

    `calibration` is what `apply_plan` takes (token ids, a CalibrationSet, or None when no layer needs static
    scales or equalization). The artifact is written to a temporary sibling directory and renamed, so a failure
    leaves nothing. `measure`, if given, is called with the complete staged artifact and returns metrics
    (perplexity, kl, ...) that are recorded in the manifest before the rename. `resolved`: the plan's
    `resolve_plan(model, plan)` when the caller has it (nothing resolves the plan again). `progress` reports
    the layers quantized (`apply_plan`); `stats`: as `export`'s.
    """
    out = export(model, plan, calibration, out_dir, format=ARTIFACT_FORMAT_NAME, model_info=model_info,
                 overwrite=overwrite, batch_size=batch_size, measure=measure, resolved=resolved, progress=progress,
                 stats=stats)
    info = read_manifest(out)
    log.info("materialized %d layers into %s (%s bytes of weights)", len(info.layers), out, info.metrics["bytes"])
    return info


def _write_artifact(job: ExportJob, tmp: Path) -> None:
    """The "quantplan" export format: plan.json, quantized.safetensors and manifest.json (docs/ARTIFACTS.md)."""
    tensors, layers = _artifact_tensors(job.quantized, job.report)
    atomic_write_text(tmp / PLAN_FILE, job.plan.to_json())
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=_weights_metadata(_index(layers, job.report.folded)))
    files = {name: file_entry(tmp / name) for name in HASHED_FILES}
    write_manifest(tmp, _manifest(job.base_model, job.report, layers, tensors, files, job.calibration))
    if job.measure is not None:
        record_metrics(tmp, job.measure(tmp))


register_export_format(ExportFormat(ARTIFACT_FORMAT_NAME, _write_artifact, "packed weights for QuantLinear "
                                    "(Triton on CUDA, torch on the CPU): docs/ARTIFACTS.md"))


def _default_identity(model: nn.Module, plan: Plan) -> dict[str, Any]:
    config = getattr(model, "config", None)
    name = plan.model.name or str(getattr(config, "_name_or_path", "") or "")
    return {"name": name, "revision": plan.model.revision, "architecture": type(model).__name__}


def _artifact_tensors(work: nn.Module, report: ApplyReport) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The flat tensors of the weights file, and each quantized layer's scheme (layers in name order)."""
    modules = dict(work.named_modules())
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in FLAT_TENSORS}
    layers: dict[str, str] = {}
    folded = {n for consumers in report.folded.values() for n in consumers}
    for name in sorted(report.replaced):
        layer = modules[name]
        assert isinstance(layer, QuantLinear), f"{name} was built by QuantLinear.from_float"
        keys = (*layer.packed.tensors(), *_layer_extras(layer.scheme, layer.in_features, name in folded))
        held = layer.stored_tensors()
        assert list(held) == list(keys), f"{name} holds {list(held)}; the layout stores {keys}"
        layers[name] = str(layer.scheme)
        for key, t in held.items():
            parts.setdefault(key, []).append(t)
    for norm in sorted(report.folded):
        parts["equalization"].append(report.norm_scales[norm].float())  # fp32, as apply_plan made it
    return {k: _concat(k, pieces) for k, pieces in parts.items() if pieces}, layers


def _layer_extras(scheme: LayerScheme, in_features: int, folded: bool) -> dict[str, tuple[int, ...]]:
    """What a layer stores beside its packed weight, with shapes: its strategy's activation parameters (a static
    scale [1] for the built-in calibrated ones), and 1/s [K] unless a norm took s."""
    extras = dict(act_handler(scheme.act).param_shapes(in_features))
    if scheme.act.equalized and not folded:
        extras["inv_pre_scale"] = (in_features,)
    return extras


def _concat(key: str, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    dtypes = sorted({str(t.dtype) for t in pieces})
    if len(dtypes) > 1:
        raise ArtifactError(
            f"the quantized layers store {key} in several dtypes ({', '.join(dtypes)}): load the model in one dtype "
            "(--dtype) and materialize again"
        )
    return torch.cat([t.detach().reshape(-1).cpu() for t in pieces])


def _index(layers: Mapping[str, str], folded: Mapping[str, list[str]]) -> dict[str, Any]:
    """What lays out the flat tensors: layer -> scheme and norm -> the layers sharing its s, as the manifest lists."""
    return {"layers": dict(layers), "norms": {norm: list(consumers) for norm, consumers in folded.items()}}


def _weights_metadata(index: Mapping[str, Any]) -> dict[str, str]:
    return {
        "format": ARTIFACT_FORMAT,
        "version": str(ARTIFACT_VERSION),
        "packed_format": FORMAT_NAME,
        "packed_version": str(FORMAT_VERSION),
        "index_sha256": hashlib.sha256(_canonical(index).encode()).hexdigest(),
    }


def _manifest(
    base_model: Mapping[str, Any],
    report: ApplyReport,
    layers: Mapping[str, str],
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
        **_index(layers, report.folded),
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
    packed = sum(t.numel() * t.element_size() for k, t in tensors.items() if k in PACKED_TENSORS)
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
    write_manifest(info.path, manifest)
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


def file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _canonical(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
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
        older = str(version).isdigit() and int(version) < ARTIFACT_VERSION
        todo = "an older QuantPlan wrote it: materialize" if older else "upgrade quantplan, or materialize"
        raise ArtifactError(
            f"{where}: unknown artifact format version {version!r}; this QuantPlan reads version {ARTIFACT_VERSION}: "
            f"{todo} the plan again with this one"
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
    actual = file_entry(path)
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
    """Every QuantLinear and the folded norms' new weights, cut out of the flat tensors in the manifest's order."""
    path = info.path / WEIGHTS_FILE
    norms: dict[str, list[str]] = dict(info.manifest.get("norms") or {})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        _check_format(path, meta.get("format"), meta.get("version"))
        check_packed_format(meta.get("packed_format"), meta.get("packed_version"))
        index = _index(info.layers, norms)
        if meta.get("index_sha256") != hashlib.sha256(_canonical(index).encode()).hexdigest():
            raise ArtifactError(f"{path} was laid out for other layers than its manifest lists: {_corrupted()}")
        reader = _FlatReader(path, {k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - not a mapping
    folded = {n for consumers in norms.values() for n in consumers}
    built = {n: _build_layer(n, LayerScheme.parse(scheme), reader, modules, n in folded, backend)
             for n, scheme in sorted(info.layers.items())}
    new_norms = {n: _folded_norm(n, reader, modules) for n in sorted(norms)}
    reader.finish()
    return built, new_norms


class _FlatReader:
    """Cuts consecutive pieces out of the flat tensors of a weights file; refuses to run short or leave any over."""

    def __init__(self, path: Path, flat: Mapping[str, torch.Tensor]) -> None:
        known = {*FLAT_TENSORS, *registered_param_names()}
        odd = sorted(k for k, t in flat.items() if k not in known or t.ndim != 1)
        if odd:
            raise ArtifactError(f"{path} holds tensors this format does not lay out ({', '.join(odd)}): {_corrupted()}")
        self.path, self.flat, self.used = path, dict(flat), dict.fromkeys(flat, 0)

    def take(self, key: str, shape: tuple[int, ...], owner: str) -> torch.Tensor:
        """The next `shape` values of `key` (a copy: a view would keep, and save, the whole flat tensor)."""
        flat, start, size = self.flat.get(key), self.used.get(key, 0), math.prod(shape)
        if flat is None or start + size > flat.numel():
            raise ArtifactError(
                f"{self.path} ends before {owner}'s {key}: it does not hold the layers its manifest lists for this "
                f"model: {_corrupted()}"
            )
        self.used[key] = start + size
        return flat[start : start + size].reshape(shape).clone()

    def finish(self) -> None:
        left = {k: t.numel() - self.used[k] for k, t in self.flat.items() if t.numel() != self.used[k]}
        if left:
            raise ArtifactError(f"{self.path} holds values no layer uses ({left}): {_corrupted()}")


def _build_layer(
    name: str,
    scheme: LayerScheme,
    reader: _FlatReader,
    modules: Mapping[str, nn.Module],
    folded: bool,
    backend: str | None,
) -> QuantLinear:
    module = modules.get(name)
    if not isinstance(module, LINEAR_TYPES):
        raise ArtifactError(f"the artifact quantizes {name}, which is not a linear layer of this model")
    n, k = linear_shape(module)
    device = next(module.parameters()).device
    own = {key: reader.take(key, shape, name).to(device) for key, shape in packed_shapes(scheme.weight, n, k).items()}
    packed = PackedWeight(own["codes"], own["scales"], own.get("zeros"), k, scheme.weight)  # format checked per file
    extra = {key: reader.take(key, shape, name).to(device) for key, shape in _layer_extras(scheme, k, folded).items()}
    pre = extra.pop("inv_pre_scale", None)
    return QuantLinear(packed, scheme.act, module.bias, act_params=extra, inv_pre_scale=pre, backend=backend)


def _folded_norm(norm: str, reader: _FlatReader, modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The norm's weight (and bias) divided by its stored s: the very operation with which apply_plan folded it."""
    module = modules.get(norm)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        raise ArtifactError(f"the artifact folds an equalization into {norm}, which this model lacks or is not a norm")
    s = reader.take("equalization", tuple(weight.shape), norm)
    out = {"weight": weight.detach() / s.to(weight.device, weight.dtype)}
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        out["bias"] = bias.detach() / s.to(bias.device, bias.dtype)
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
    with staging_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in (*HASHED_FILES, MANIFEST_FILE):
            shutil.copyfile(info.path / name, tmp / name)
    return out


