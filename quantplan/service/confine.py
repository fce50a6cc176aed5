"""What a job may read on a shared server: model and data paths inside configured roots, hub ids only when allowed,
model weights as safetensors only (torch-free).

The API checks every submission (`confine`) before it stores the job, and a confined runner (`quantplan serve`'s
runners, `quantplan runner --confined`) checks again when it loads the job. Paths are resolved (`~`, `..`, symlinks)
before the check, and the verdict never depends on whether a path exists: a refusal says the same about
`/etc/passwd` as about a file that is not there, so errors reveal nothing about the server's files. Local mode
(`quantplan run`) does not confine: its user owns the machine.

Roots: `QUANTPLAN_MODEL_ROOTS`, `QUANTPLAN_DATA_ROOTS` (`os.pathsep`-separated directories; none set: no local
path is accepted). Hub: `QUANTPLAN_ALLOW_HUB` (a Hugging Face model id, and `wikitext2` from the hub).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from quantplan.errors import ModelLoadError
from quantplan.service.jobs import JobSpec, SpecError
from quantplan.settings import StorageSettings
from quantplan.workers.dataspec import parse_syntax

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")  # `name` or `org/name`
DATA_FIELDS = ("data", "eval_data", "select_data")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ConfinementError(SpecError):
    """A job input outside what the server lets jobs read (the API answers 422)."""


def confine(spec: JobSpec, settings: StorageSettings) -> JobSpec:
    """The spec with its model and data paths resolved, or a `ConfinementError` naming the first refused input."""
    updates: dict[str, str] = {"model": confine_model(spec.model, settings)}
    for field in DATA_FIELDS:
        value = getattr(spec, field)
        if value is not None:
            updates[field] = confine_data(field, value, settings)
    return JobSpec.parse({**spec.to_json(), **updates})


def confine_model(model: str, settings: StorageSettings) -> str:
    """A hub id (when the hub is allowed) as written, or the resolved path of a directory under a model root."""
    written = model.strip()
    if _is_hub_id(written):
        if settings.allow_hub:
            return written
        raise ConfinementError(f"model {written!r}: this server does not fetch models from the Hugging Face hub "
                               f"(QUANTPLAN_ALLOW_HUB is off); {_use('model', settings)}")
    return _inside("model", written, settings)


def confine_data(field: str, value: str, settings: StorageSettings) -> str:
    """The data spec with every path resolved under a data root; `wikitext2` (the hub's) only when allowed."""
    kind, paths = parse_syntax(value)
    if not paths:  # `wikitext2` from the hub
        if settings.allow_hub:
            return value
        raise ConfinementError(f"{field} {value!r}: this server does not fetch data from the Hugging Face hub "
                               f"(QUANTPLAN_ALLOW_HUB is off); {_use('data', settings)}")
    resolved = [_inside("data", p, settings, field=field) for p in paths]
    return f"{kind}:" + ",".join(resolved)


def check_safetensors(model: str) -> None:
    """A local model directory must hold safetensors weights: a pickle checkpoint (`pytorch_model.bin`) can run
    code when it is loaded, so a server refuses it (a `ModelLoadError`, not retried)."""
    path = Path(model)
    if not path.is_dir():
        return  # a hub id (allowed by `confine_model`) or a missing directory: the loader says what is wrong
    names = [p.name for p in path.iterdir() if p.is_file()]
    if any(n.endswith(".safetensors") for n in names):
        return
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise ModelLoadError(f"model directory {model} holds pickle checkpoints only ({_pickles(names)}); this server "
                             "loads safetensors weights only: save the model with `save_pretrained(dir, "
                             "safe_serialization=True)` and submit that directory")
    raise ModelLoadError(f"model directory {model} holds no safetensors weights (*.safetensors); save the model "
                         "with `save_pretrained(dir)` and submit that directory")


def _pickles(names: list[str]) -> str:
    return ", ".join(sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))[:3])


def _is_hub_id(written: str) -> bool:
    return bool(HUB_ID.match(written)) and ".." not in written and not os.path.isabs(written)


def _inside(kind: str, written: str, settings: StorageSettings, *, field: str | None = None) -> str:
    """`written` resolved, if it lies inside one of the `kind` roots; the refusal is the same whether or not the
    path exists (and whatever it points to)."""
    roots = [os.path.realpath(os.path.expanduser(r)) for r in settings.roots(kind)]
    name = field or kind
    if not os.path.isabs(os.path.expanduser(written)):
        raise ConfinementError(f"{name} path {written!r} is relative; {_use(kind, settings)}")
    resolved = os.path.realpath(os.path.expanduser(written))  # `..` and every symlink, existing or not
    if any(os.path.commonpath([root, resolved]) == root for root in roots):
        return resolved
    raise ConfinementError(f"{name} path {written!r} is outside the {kind} roots of this server; "
                           f"{_use(kind, settings)}")


def _use(kind: str, settings: StorageSettings) -> str:
    roots = settings.roots(kind)
    env = f"QUANTPLAN_{kind.upper()}_ROOTS"
    if not roots:
        return f"this server accepts no local {kind} paths ({env} is not set): ask its operator"
    return f"use an absolute path inside {' or '.join(roots)} ({env})"
