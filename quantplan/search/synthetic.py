"""Synthetic sensitivity tables shaped like real models, for tests and benchmarks (no model, no torch).

Costs follow the shape of measured tables: weight cost ~ s_l * 4^-b (finer groups and zero-points a little
cheaper), activation cost largest for per-tensor static and for inputs with large outliers (down_proj), and
max|X| log-normal per layer type. The numbers are made up; only the structure (shapes, feeders, which
schemes fit which K) is that of the model.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from quantplan.quant.costs import TABLE_FORMAT, LayerSensitivity, TableInfo
from quantplan.quant.schemes import GROUP_SIZES, PER_CHANNEL, WeightScheme

GROUP_FACTOR = {32: 0.80, 64: 0.88, 128: 0.95, PER_CHANNEL: 1.25}
ACT_FACTOR = {"a8-static": 1.0, "a8-dynamic": 0.3, "a8-lae": 0.45, "a8-smooth": 0.6}


@dataclass(frozen=True)
class LayerShape:
    """One linear layer of a block: its name suffix, (N, K), the norm feeding it, typical max|X|."""

    suffix: str
    shape: tuple[int, int]
    feeder: str | None
    absmax: float


def llama_block(hidden: int, intermediate: int, kv: int | None = None) -> tuple[LayerShape, ...]:
    kv = kv or hidden
    attn, mlp = "input_layernorm", "post_attention_layernorm"
    return (
        LayerShape("self_attn.q_proj", (hidden, hidden), attn, 12.0),
        LayerShape("self_attn.k_proj", (kv, hidden), attn, 12.0),
        LayerShape("self_attn.v_proj", (kv, hidden), attn, 12.0),
        LayerShape("self_attn.o_proj", (hidden, hidden), None, 4.0),
        LayerShape("mlp.gate_proj", (intermediate, hidden), mlp, 20.0),
        LayerShape("mlp.up_proj", (intermediate, hidden), mlp, 20.0),
        LayerShape("mlp.down_proj", (hidden, intermediate), None, 300.0),
    )


LLAMA_7B = llama_block(4096, 11008)  # 32 blocks: 224 layers, 6.5e9 parameters


def synthetic_table(
    blocks: int = 32, block: Sequence[LayerShape] = LLAMA_7B, *, seed: int = 0, bits: Sequence[int] = (2, 3, 4, 8)
) -> TableInfo:
    """A table for `blocks` copies of `block` (a 7B Llama by default) with plausible random costs."""
    rng = random.Random(seed)
    layers = []
    for b in range(blocks):
        for spec in block:
            name = f"model.layers.{b}.{spec.suffix}"
            feeder = f"model.layers.{b}.{spec.feeder}" if spec.feeder else None
            layers.append(synthetic_layer(name, spec.shape, feeder, spec.absmax, rng, bits))
    model = {"name": f"synthetic-{blocks}x{len(block)}", "fingerprint": f"synthetic-{seed}"}
    return TableInfo(f"synthetic-{blocks}-{seed}", model, {"synthetic": True}, {"seed": seed}, tuple(layers))


def synthetic_layer(
    name: str, shape: tuple[int, int], feeder: str | None, absmax: float, rng: random.Random,
    bits: Sequence[int] = (2, 3, 4, 8),
) -> LayerSensitivity:
    n, k = shape
    s = rng.lognormvariate(0, 1) * 1e-3 * math.sqrt(n * k / 4096**2)
    weight, clip = {"w16": 0.0}, {}
    for b in bits:
        for g in (*GROUP_SIZES, PER_CHANNEL):
            for asym in (False, True):
                scheme = WeightScheme(b, g, asym)
                if scheme.group_size(k) > k:
                    continue
                jitter = rng.uniform(0.9, 1.1)
                weight[str(scheme)] = s * 4.0 ** (4 - b) * GROUP_FACTOR[g] * (0.85 if asym else 1.0) * jitter
                clip[str(scheme)] = 1.0 if b >= 8 else rng.choice((0.85, 0.9, 0.95, 1.0))
    v = absmax * rng.lognormvariate(0, 0.5)
    a = s * 0.05 * (v / 10) ** 1.5
    act = {"a16": 0.0, **{name: a * f * rng.uniform(0.8, 1.2) for name, f in ACT_FACTOR.items()}}
    return LayerSensitivity(name, shape, feeder, weight, clip, act, v, {"p99.9": v / 4})


def write_table_file(table: TableInfo, path: str | Path) -> Path:
    """Save a table's metadata as a tensor-free safetensors file that `read_table_info` (and
    `SensitivityTable.load`) read like a computed one."""
    header = json.dumps({"__metadata__": {TABLE_FORMAT: json.dumps(table.metadata())}}, separators=(",", ":"))
    header += " " * (-len(header) % 8)  # safetensors pads the header to 8 bytes
    data = len(header.encode()).to_bytes(8, "little") + header.encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
