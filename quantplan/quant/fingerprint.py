"""model_fingerprint: a sha256 that names a model's exact weights and architecture, wherever it was loaded from.

Artifacts, plans and sensitivity tables record it; `quant.artifact.load_quantized` refuses a base model whose
fingerprint differs from the one the artifact was made for.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

# Config entries that say where or with what a model was loaded, not what it computes: a copy of the same
# checkpoint in another directory (or from the hub cache) must have the same fingerprint.
_LOCATION_KEYS = ("_name_or_path", "_commit_hash", "transformers_version")


def config_json(model: nn.Module) -> str:
    """The model config as canonical JSON without location keys ('' for a model without a config)."""
    config = getattr(model, "config", None)
    if config is None:
        return ""
    data = {k: v for k, v in config.to_dict().items() if k not in _LOCATION_KEYS}
    return json.dumps(data, sort_keys=True, default=str)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the config and every parameter/buffer (name, dtype, shape, bytes): equal iff same weights."""
    h = hashlib.sha256(config_json(model).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
