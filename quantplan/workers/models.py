"""Load a causal language model and its tokenizer from a local directory or the Hugging Face hub.

`load_model(spec)` accepts a Hugging Face model directory (config.json, weights, tokenizer files) or a
hub id such as ``meta-llama/Llama-2-7b-hf``. Failures the user can fix raise `ModelLoadError` with a
one-line message; an unsupported dtype or device raises `QuantPlanError`.

`model_identity(spec)` describes a model (name, revision, architecture, parameter count) cheaply, for
reports and cache keys.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantplan.errors import ModelLoadError, QuantPlanError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["DTYPES", "load_model", "model_fingerprint", "model_identity", "resolve_dtype"]

#: Accepted `dtype` names (and their aliases) for `load_model`.
DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "auto": "auto",
}

_MAX_CAUSE_CHARS = 200


def resolve_dtype(dtype: str) -> torch.dtype | str:
    """Map a dtype name to a `torch.dtype`, or to ``"auto"`` (the checkpoint's own dtype)."""
    import torch

    name = DTYPES.get(str(dtype).strip().lower()) if isinstance(dtype, str) else None
    if name is None:
        raise QuantPlanError(f"unsupported dtype {dtype!r}: use one of float32, float16, bfloat16 or auto")
    return "auto" if name == "auto" else getattr(torch, name)


def _resolve_device(device: str) -> torch.device:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise QuantPlanError(f"unsupported device {device!r}: use cpu, cuda or cuda:<index>") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise QuantPlanError(f"device {device!r} requested but CUDA is not available here: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise QuantPlanError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return dev


def _looks_like_path(spec: str) -> bool:
    """True for specs meant as filesystem paths rather than hub ids.

    Hub ids are ``name`` or ``org/name``: at most one ``/`` and no leading ``.``, ``~`` or ``/``. So on
    POSIX, where ``os.sep`` is ``/``, a single ``/`` alone does not make a path.
    """
    if spec.startswith((".", "~", "/", os.sep)):
        return True
    if os.sep != "/" and os.sep in spec:
        return True
    if os.altsep and os.altsep != "/" and os.altsep in spec:
        return True
    return spec.count("/") > 1


def _load_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "this model could not be fetched or read"."""
    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, ImportError]
    try:
        from huggingface_hub import errors as hub_errors

        errors += [hub_errors.HfHubHTTPError, hub_errors.OfflineModeIsEnabled, hub_errors.HFValidationError]
    except ImportError:  # pragma: no cover - huggingface_hub is a transformers dependency
        pass
    for module, attr in (("requests", "RequestException"), ("httpx", "HTTPError"), ("httpx2", "HTTPError")):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(__import__(module), attr))
    return tuple(errors)


def _cause(e: BaseException) -> str:
    """The first line of an exception's message, shortened, for one-line errors."""
    text = str(e).strip().splitlines()
    first = text[0].strip() if text else ""
    if len(first) > _MAX_CAUSE_CHARS:
        first = first[: _MAX_CAUSE_CHARS - 3] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _local_dir(spec: str) -> Path | None:
    """The local directory `spec` names, None for a hub id; raise for a missing path or a file."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelLoadError(
            f"model path is not a directory: {spec}; pass a Hugging Face model directory (config.json, "
            "weights, tokenizer files)"
        )
    if _looks_like_path(spec):
        raise ModelLoadError(
            f"model directory not found: {spec}; check the path, or pass a Hugging Face hub id such as org/name"
        )
    return None


def _wrap_load_error(spec: str, local: Path | None, e: BaseException) -> ModelLoadError:
    if local is not None:
        return ModelLoadError(
            f"could not load a model from directory {local} ({_cause(e)}); it must be a Hugging Face "
            "causal-LM directory with config.json, weights and tokenizer files"
        )
    return ModelLoadError(
        f"could not load model {spec!r} from the Hugging Face hub ({_cause(e)}); the id may be wrong or the "
        "hub unreachable: pass a local model directory, or set HF_HUB_OFFLINE=1 with a warm cache"
    )


def load_model(
    spec: str, *, dtype: str = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a local directory or a hub id, in eval mode on `device`.

    dtype: ``float32`` (default), ``float16``, ``bfloat16`` or ``auto`` (the checkpoint's dtype).
    Raises `ModelLoadError` for a missing directory or a model that cannot be fetched or read, and
    `QuantPlanError` for an unsupported dtype or device.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError("empty model spec: pass a Hugging Face model directory or hub id")
    spec = spec.strip()
    torch_dtype = resolve_dtype(dtype)
    dev = _resolve_device(device)
    local = _local_dir(spec)
    source = str(local) if local is not None else spec

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # The tokenizer first: it is small, so a wrong id or an unreachable hub fails fast.
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except _load_errors() as e:
        raise _wrap_load_error(spec, local, e) from e
    model.to(dev)
    model.eval()
    return model, tokenizer


def _commit_from_path(path: str | os.PathLike[str] | None) -> str | None:
    """The commit hash of a hub-cache snapshot path (``.../snapshots/<hash>/...``), else None."""
    if not path:
        return None
    parts = Path(path).resolve().parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "snapshots" and i + 1 < len(parts):
            return parts[i + 1]
    return None


def _hub_commit(spec: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
    except Exception:  # noqa: BLE001 - best effort only
        return None
    return _commit_from_path(cached) if isinstance(cached, str) else None


def model_identity(spec: str, model: PreTrainedModel | None = None) -> dict[str, Any]:
    """Describe a model: name, source, revision, architecture, model_type, parameter count, dtype.

    With `model` (already loaded from `spec`) its config and parameters are used; otherwise only the
    config is read and the parameters are counted on the meta device (nothing is allocated).
    ``revision`` is the hub commit hash when known (hub ids and hub-cache snapshot directories), else
    None. JSON-able.
    """
    import torch

    spec = spec.strip()
    local = _local_dir(spec)
    if model is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        source = str(local) if local is not None else spec
        try:
            config = AutoConfig.from_pretrained(source)
            with torch.device("meta"):
                counted = AutoModelForCausalLM.from_config(config)
        except _load_errors() as e:
            raise _wrap_load_error(spec, local, e) from e
    else:
        config = model.config
        counted = model
    parameters = sum(p.numel() for p in counted.parameters())
    revision = getattr(config, "_commit_hash", None)
    if revision is None:
        revision = _commit_from_path(local) if local is not None else _hub_commit(spec)
    architectures = getattr(config, "architectures", None) or [type(counted).__name__]
    if model is not None:
        config_dtype = model.dtype
    else:
        config_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return {
        "name": str(local) if local is not None else spec,
        "source": "local" if local is not None else "hub",
        "revision": revision,
        "architecture": architectures[0],
        "model_type": getattr(config, "model_type", None),
        "parameters": int(parameters),
        "dtype": str(config_dtype).removeprefix("torch.") if config_dtype is not None else None,
    }


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config and every parameter/buffer: equal iff same weights (see `quant.fingerprint`)."""
    from quantplan.quant.fingerprint import model_fingerprint as fingerprint

    return fingerprint(model)
