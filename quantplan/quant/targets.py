"""Deployment targets (torch-free): which layer schemes a format can express, and the layers a server fuses.

`quantplan` (the packed artifact, docs/ARTIFACTS.md) runs every scheme a QuantPlan kernel computes.
`compressed-tensors` (the Hugging Face checkpoint vLLM serves, docs/ARTIFACTS.md#compressed-tensors-vllm) stores
integer weights of 2 to 8 bits per group or per channel, with int8 activations per token (dynamic) or per tensor
(static scale); equalizations only where they fold into a norm. vLLM fuses the shards of some layers into one
(q/k/v -> qkv_proj, gate/up -> gate_up_proj) and needs one scheme per fused layer: `fused_groups` lists them from
the model's architecture (vLLM's `packed_modules_mapping` of that model type), so the export and the search can
keep them together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from quantplan.quant.kernels.served import serving
from quantplan.quant.plan import REGEX_PREFIX, Plan
from quantplan.quant.schemes import ActScheme, LayerScheme

TARGETS = ("quantplan", "compressed-tensors")
CT_TARGET = "compressed-tensors"

# vLLM's packed_modules_mapping per model_type: fused layer -> its shards (siblings under one parent module).
_QKV = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
_QKV_GATE_UP = {**_QKV, "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _QKV_GATE_UP, "mistral": _QKV_GATE_UP, "qwen2": _QKV_GATE_UP, "qwen3": _QKV_GATE_UP,
    "gemma": _QKV_GATE_UP, "gemma2": _QKV_GATE_UP, "phi3": {}, "opt": _QKV,
    "gpt_neox": {}, "gpt2": {},  # query_key_value and c_attn are one layer already; their MLPs fuse nothing
}
_DEFAULT_FUSED = _QKV_GATE_UP  # model types vLLM's table has not been copied for: the common Llama-style names


def ct_scheme_reason(scheme: LayerScheme) -> str | None:
    """Why compressed-tensors cannot express `scheme` (None when it can, w16:a16 included: left dense)."""
    w, a = scheme.weight, scheme.act
    if not w.quantized:
        return None if not a.quantized else "activation-only quantization (w16:a8-*) has no compressed-tensors scheme"
    if str(a) not in ACT_ARGS:
        return f"the activation strategy {a} is not one compressed-tensors knows"
    if a.quantized and w.bits == 8 and w.asymmetric:
        return "asymmetric 8-bit weights with int8 activations: no int8 kernel takes weight zero-points"
    return None


def ct_layer_reason(scheme: LayerScheme, in_features: int, *, conv1d: bool = False) -> str | None:
    """`ct_scheme_reason`, plus what a layer's shape and kind decide: compressed-tensors groups must tile K and only
    nn.Linear layers are packed. (Whether an equalization folds into a norm is known after calibration: the export
    refuses a runtime pre-scale then.)"""
    reason = ct_scheme_reason(scheme)
    if reason or not scheme.quantized:
        return reason
    if conv1d:
        return "a GPT-2 Conv1D layer (compressed-tensors packs nn.Linear layers only)"
    g = scheme.weight.group_size(in_features)
    if in_features % g:
        return f"group size {g} does not divide in_features {in_features} (compressed-tensors does not pad K)"
    return None


def fused_groups(layers: Iterable[str], model_type: str | None = None) -> list[tuple[str, ...]]:
    """The sets of layers (of `layers`) a server fuses into one, each in shard order; groups of two or more."""
    table = FUSED_MODULES.get(model_type or "", _DEFAULT_FUSED)
    found: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for name in layers:
        parent, _, leaf = name.rpartition(".")
        for fused, shards in table.items():
            if leaf in shards:
                found.setdefault((parent, fused), []).append((shards.index(leaf), name))
    return [tuple(n for _, n in sorted(g)) for _, g in sorted(found.items()) if len(g) > 1]


def mixed_fused_groups(specs: Mapping[str, str], model_type: str | None = None) -> list[tuple[str, ...]]:
    """The fused groups whose layers do not all have the same scheme (and clip/alpha) under `specs`
    (layer -> a canonical string of its spec)."""
    return [g for g in fused_groups(specs, model_type) if len({specs[n] for n in g}) > 1]


ACT_ARGS: dict[str, dict[str, object] | None] = {  # compressed-tensors input_activations per strategy
    "a16": None,
    "a8-dynamic": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
    **{name: {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
       for name in ("a8-static", "a8-lae", "a8-smooth")},
}


def ct_format(scheme: LayerScheme) -> str:
    """The compressed-tensors storage format of a layer: int8 weights with int8 activations stay unpacked
    (int-quantized, what vLLM's W8A8 kernels read), everything else is packed into int32 words."""
    return "int-quantized" if scheme.weight.bits == 8 and scheme.act is not ActScheme.A16 else "pack-quantized"


def plan_formats(plan: Plan, model_type: str | None = None) -> list[str]:
    """The export formats whose schemes `plan` keeps to, judged from the plan alone: every scheme it names has a
    kernel (`quantplan`) or a compressed-tensors form and no fused set of the layers it names mixes schemes
    (`compressed-tensors`). Layer shapes (group sizes that must tile K) are checked when the plan is exported."""
    specs = [s for _, s in plan.layers] + [plan.default]
    schemes = [s.scheme for s in specs if s.scheme.quantized]
    formats = []
    if all(s.weight.quantized and serving(s.weight, s.act.bits) is not None for s in schemes):
        formats.append("quantplan")
    siblings = {n for k, _ in plan.layers if not k.startswith(REGEX_PREFIX) for n in _fused_siblings(k, model_type)}
    resolved = {n: str(plan.resolve(n).scheme) for n in siblings}
    if not any(ct_scheme_reason(s) for s in schemes) and not mixed_fused_groups(resolved, model_type):
        formats.append(CT_TARGET)
    return formats


def _fused_siblings(name: str, model_type: str | None) -> list[str]:
    parent, _, leaf = name.rpartition(".")
    prefix = f"{parent}." if parent else ""
    table = FUSED_MODULES.get(model_type or "", _DEFAULT_FUSED)
    return [prefix + s for shards in table.values() if leaf in shards for s in shards]
