"""The `compressed-tensors` export format: a plan as a Hugging Face checkpoint that vLLM (and transformers) load.

The directory is the base model's (`save_pretrained`: config, generation config, safetensors shards) plus its
tokenizer, with every quantized linear layer stored the way compressed-tensors stores it and `config.json`
carrying a `quantization_config` (`quant_method: compressed-tensors`, one config group per layer scheme, each with
an explicit `format`). Mapping (docs/ARTIFACTS.md#compressed-tensors-vllm):

    wNgG / wN (channel)  -> pack-quantized: weight_packed int32 [N, ceil(K*N_bits/32)], weight_scale [N, G],
                            weight_shape, weight_zero_point (packed along N) when asymmetric
    w8 with int8 acts    -> int-quantized: weight int8 [N, K], weight_scale [N, 1]
    a8-dynamic           -> input_activations: int8, per token, dynamic (no stored scale)
    a8-static/lae/smooth -> input_activations: int8, per tensor, static `input_scale`; the equalization s is
                            already folded into the norm and the weights (a pre-scale that cannot fold is refused)

A `manifest.json` beside them says what was exported (format `quantplan.compressed-tensors-export`, the base model
and its fingerprint, each layer's scheme) with the size and sha256 of every other file, and lets `--overwrite`
replace an earlier export.

The codes and scales are QuantPlan's own (`quantize_weight` of W diag(s), as the simulation and the packed
artifact make them): compressed-tensors decompresses them to QuantPlan's dequantized weights bit for bit. The
compressed-tensors package is imported when a directory is written, not before (`pip install
'quantplan[vllm-export]'`).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantplan.errors import ArtifactError, PlanError
from quantplan.quant.apply import resolve_plan, validate_plan
from quantplan.quant.artifact import ExportFormat, ExportJob, file_entry, register_export_format, write_manifest
from quantplan.quant.modules import linear_shape
from quantplan.quant.packing import unpack_weight
from quantplan.quant.plan import LayerSpec, Plan
from quantplan.quant.qlinear import QuantLinear
from quantplan.quant.quantizers import QuantizedWeight, quantize_weight
from quantplan.quant.schemes import LayerScheme, WeightScheme
from quantplan.quant.targets import ACT_ARGS, CT_TARGET, ct_format, ct_layer_reason, mixed_fused_groups

log = logging.getLogger(__name__)

FORMAT_NAME = CT_TARGET
MANIFEST_FORMAT = "quantplan.compressed-tensors-export"  # manifest.json: what was exported, from what, checksums
INSTALL_HINT = "pip install 'quantplan[vllm-export]' (compressed-tensors==0.20.0)"


def require_compressed_tensors() -> Any:
    """The compressed-tensors package, or an ArtifactError saying how to install it."""
    try:
        import compressed_tensors
    except ImportError:
        raise ArtifactError(f"the compressed-tensors export needs the compressed-tensors package: {INSTALL_HINT}"
                            ) from None
    return compressed_tensors


class StagedLinear(nn.Module):
    """A quantized layer waiting to be written: QuantPlan's codes and scales, its bias and activation parameters."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, spec: LayerSpec,
                 act_params: Mapping[str, torch.Tensor], prescaled: bool) -> None:
        super().__init__()
        self.qw, self.spec, self.act_params, self.prescaled = qw, spec, dict(act_params), prescaled
        self.bias = None if bias is None else bias.detach().clone()

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec, *,
                   act_scale: torch.Tensor | None = None, pre_scale: torch.Tensor | None = None,
                   act_params: Mapping[str, torch.Tensor] | None = None) -> StagedLinear:
        """The module factory of `apply_plan`: `weight` is W diag(s), as FakeQuantLinear takes it."""
        params = {**({} if act_scale is None else {"act_scale": act_scale}), **(act_params or {})}
        qw = quantize_weight(weight.detach(), spec.scheme.weight, spec.clip)
        return cls(qw, bias, spec, params, pre_scale is not None)

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear) -> StagedLinear:
        """A layer of a loaded packed artifact (`load_quantized`): the same codes, unpacked."""
        return cls(unpack_weight(layer.packed), layer.bias, LayerSpec(layer.scheme), layer.act_params,
                   layer.inv_pre_scale is not None)


# -- what the format can express ---------------------------------------------------------------------------
def check_expressible(model: nn.Module, plan: Plan, resolved: Mapping[str, LayerSpec] | None = None,
                      ) -> dict[str, LayerSpec]:
    """The specs of the layers `plan` quantizes; one PlanError listing every layer compressed-tensors cannot
    express (scheme, shape, GPT-2 Conv1D) and every fused group (q/k/v, gate/up) whose layers differ."""
    resolved = resolve_plan(model, plan) if resolved is None else resolved
    validate_plan(model, plan, resolved)
    specs = {n: s for n, s in resolved.items() if s.scheme.quantized}
    if not specs:
        raise PlanError("the plan quantizes no layer (every layer resolves to w16:a16): there is nothing to export")
    modules = dict(model.named_modules())
    refused = {}
    for name, spec in specs.items():
        module = modules[name]
        reason = ct_layer_reason(spec.scheme, linear_shape(module)[1], conv1d=not isinstance(module, nn.Linear))
        if reason:
            refused[name] = f"{spec.scheme}: {reason}"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for group in mixed_fused_groups({n: str(s.scheme) for n, s in resolved.items()}, model_type):
        refused[group[0]] = (f"vLLM fuses {', '.join(group)} into one layer, which needs one scheme; the plan gives "
                             f"{', '.join(str(resolved[n].scheme) for n in group)}")
    if refused:
        raise PlanError(_refusal(refused))
    return specs


def _refusal(refused: Mapping[str, str]) -> str:
    shown = "; ".join(f"{n} ({why})" for n, why in list(refused.items())[:6])
    more = f"; and {len(refused) - 6} more" if len(refused) > 6 else ""
    return (f"the plan cannot be exported as compressed-tensors: {len(refused)} layer(s) it cannot express: {shown}"
            f"{more}. Search with `--target compressed-tensors` (the space compressed-tensors expresses, fused "
            "layers sharing one scheme), or give those layers another scheme")


# -- writing -------------------------------------------------------------------------------------------------
def _write(job: ExportJob, tmp: Path) -> None:
    ct = require_compressed_tensors()
    tokenizer = job.meta.get("tokenizer")
    tokenizer = _load_tokenizer(job.base_model) if tokenizer is None else tokenizer
    staged = _staged_layers(job.quantized)
    prescaled = {n: f"{layer.spec.scheme}: keeps a runtime pre-scale (no norm alone feeds it)"
                 for n, layer in staged.items() if layer.prescaled}
    if prescaled:
        raise PlanError(_refusal(prescaled))
    scale_dtype = torch.float32 if next(job.model.parameters()).dtype == torch.float32 else torch.float16
    groups: dict[str, list[str]] = defaultdict(list)
    for name, layer in staged.items():
        _set_submodule(job.quantized, name, _compressed_module(layer, scale_dtype, ct))
        groups[str(layer.spec.scheme)].append(name)
    job.quantized.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _add_quantization_config(tmp / "config.json", quantization_config(groups, _head_name(job.quantized), ct))
    files = {p.name: file_entry(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    write_manifest(tmp, {"format": MANIFEST_FORMAT, "version": 1, "base_model": dict(job.base_model),
                          "layers": {n: str(layer.spec.scheme) for n, layer in sorted(staged.items())}, "files": files})
    log.info("wrote %d quantized layers in %d config groups as compressed-tensors", len(staged), len(groups))


def _add_quantization_config(path: Path, config: Mapping[str, Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data["quantization_config"] = dict(config)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _staged_layers(model: nn.Module) -> dict[str, StagedLinear]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            out[name] = StagedLinear.from_quant_linear(module)
        elif isinstance(module, StagedLinear):
            out[name] = module
    return out


def _load_tokenizer(base_model: Mapping[str, Any]) -> Any:
    from transformers import AutoTokenizer

    name = base_model.get("name")
    try:
        if not name:
            raise OSError("the model's name is unknown")
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as e:
        raise ArtifactError(f"the compressed-tensors export is a complete model directory and needs the tokenizer, "
                            f"but none loads from {name!r} ({str(e).splitlines()[0][:160]}): pass the tokenizer "
                            "(export(..., tokenizer=...)) or use a model directory that holds one") from None


def _head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def _ct_codes(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes [N, K] and zero-points [N, G] in compressed-tensors' signed range [-2^(b-1), 2^(b-1)-1], int8:
    asymmetric codes and zero-points shift by 2^(b-1) together, so (q - z) is unchanged."""
    codes = qw.codes[:, : qw.in_features]
    if qw.zeros is None:
        return codes.to(torch.int8), None
    offset = 1 << (qw.scheme.bits - 1)
    return (codes - offset).to(torch.int8), (qw.zeros - offset).to(torch.int8)


def _compressed_module(layer: StagedLinear, scale_dtype: torch.dtype, ct: Any) -> nn.Module:
    """An nn.Module holding the layer's tensors under compressed-tensors' names (what save_pretrained writes)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    qw, scheme = layer.qw, layer.spec.scheme
    codes, zeros = _ct_codes(qw)
    tensors: dict[str, torch.Tensor] = {"weight_scale": qw.scales.to(scale_dtype).contiguous()}  # [N, G], exact
    if ct_format(scheme) == "int-quantized":
        tensors["weight"] = codes.contiguous()
    else:
        bits = scheme.weight.bits
        tensors["weight_packed"] = pack_to_int32(codes.contiguous(), bits)
        tensors["weight_shape"] = torch.tensor(tuple(codes.shape), dtype=torch.int64)
        if zeros is not None:
            tensors["weight_zero_point"] = pack_to_int32(zeros.contiguous(), bits, packed_dim=0)
    static = layer.act_params.get("act_scale")
    if scheme.act.quantized and not scheme.act.per_token:
        tensors["input_scale"] = static.detach().reshape(1).to(scale_dtype)
    if layer.bias is not None:
        tensors["bias"] = layer.bias
    module = nn.Module()
    for key, t in tensors.items():
        module.register_buffer(key, t.detach().cpu())
    return module


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def weight_args(weight: WeightScheme) -> dict[str, Any]:
    grouped = weight.group > 0
    return {"num_bits": weight.bits, "type": "int", "symmetric": not weight.asymmetric,
            "strategy": "group" if grouped else "channel", "group_size": weight.group if grouped else None,
            "dynamic": False}


def quantization_config(groups: Mapping[str, list[str]], head: str | None, ct: Any = None) -> dict[str, Any]:
    """config.json's `quantization_config`: one config group per layer scheme (its layers by exact name), each
    with an explicit format; validated by compressed-tensors' own QuantizationConfig."""
    ct = ct or require_compressed_tensors()
    from compressed_tensors.quantization import QuantizationConfig

    config_groups = {}
    for i, (scheme_text, names) in enumerate(sorted(groups.items())):
        scheme = LayerScheme.parse(scheme_text)
        config_groups[f"group_{i}"] = {
            "targets": sorted(names), "weights": weight_args(scheme.weight),
            "input_activations": ACT_ARGS[str(scheme.act)], "output_activations": None, "format": ct_format(scheme),
        }
    formats = {g["format"] for g in config_groups.values()}
    validated = QuantizationConfig.model_validate({
        "config_groups": config_groups, "quant_method": "compressed-tensors",
        "format": "mixed-precision" if len(config_groups) > 1 else formats.pop(),
        "quantization_status": "compressed", "ignore": [head] if head else [],
    })
    return {"version": ct.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **validated.model_dump(exclude={"quant_method"})}


register_export_format(ExportFormat(
    FORMAT_NAME, _write, "a Hugging Face checkpoint in compressed-tensors' mixed-precision format, which vLLM serves "
    "(docs/ARTIFACTS.md#compressed-tensors-vllm)", module_factory=StagedLinear.from_float, check=check_expressible))


def export_artifact(model: nn.Module, artifact: str | Path, out_dir: str | Path, *, tokenizer: Any = None,
                    overwrite: bool = False) -> Path:
    """A stored packed artifact (verified against the base `model`, left untouched) rewritten as a
    compressed-tensors directory: the very codes, scales and folded norms, no calibration again."""
    import copy

    from quantplan.quant.artifact import load_quantized, read_manifest
    from quantplan.quant.atomic import check_destination, staging_dir

    out = Path(out_dir)
    check_destination(out, overwrite)
    info = read_manifest(artifact)
    check_expressible(model, info.plan())
    work = copy.deepcopy(model)
    load_quantized(work, artifact, backend="torch")
    job = ExportJob(model, work, info.plan(), None, dict(info.manifest["base_model"]), None,  # type: ignore[arg-type]
                    meta={} if tokenizer is None else {"tokenizer": tokenizer})
    with staging_dir(out, overwrite) as tmp:
        _write(job, tmp)
    return out
