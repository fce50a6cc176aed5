"""Export formats built on demand from a stored plan's packed artifact (`GET /v1/plans/{id}/artifact?format=`),
archived in the artifact store and recorded beside the packed one, so the second request streams the stored archive.

A build loads the plan's base model as the runners see it (on a confined server: inside the model roots, safetensors
only), verifies the packed artifact against it (fingerprint, checksums) and converts it (`quant.export_ct`): the
very codes and scales the job measured, no calibration again. One build at a time per process.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from quantplan.errors import QuantPlanError
from quantplan.service.confine import check_safetensors, confine_model
from quantplan.storage import ArtifactRecord, NotFoundError, PlanRecord, Repository
from quantplan.storage.artifacts import ArtifactStore

PACKED = "packed"  # the runner's kind for a materialized plan (service.runner.PACKED)
FORMATS = ("quantplan", "compressed-tensors")  # export format -> the artifact kind it is stored under: see `kind`
_BUILDING = threading.Lock()


def kind(fmt: str) -> str:
    """The artifact kind a format is stored under ("quantplan" is the packed artifact itself)."""
    if fmt not in FORMATS:
        raise QuantPlanError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    return PACKED if fmt == "quantplan" else fmt


def artifact_in_format(repo: Repository, store: ArtifactStore, plan: PlanRecord, fmt: str, *,
                       confined: bool) -> ArtifactRecord:
    """The plan's stored archive in `fmt`, built from its packed artifact the first time it is asked for."""
    wanted = kind(fmt)
    found = _stored(plan, wanted)
    if found is not None:
        return found
    packed = _stored(plan, PACKED)
    if packed is None:
        raise NotFoundError(f"plan {plan.id} has no materialized artifact to export from; pick a plan whose "
                            "`artifacts` lists one (the job materializes its best plans)")
    with _BUILDING:
        found = _stored(repo.get_plan(plan.id), wanted)  # built by another request meanwhile
        return found if found is not None else _build(repo, store, plan, packed, fmt, confined)


def _stored(plan: PlanRecord, wanted: str) -> ArtifactRecord | None:
    return next((a for a in plan.artifacts if a.kind == wanted), None)


def _build(repo: Repository, store: ArtifactStore, plan: PlanRecord, packed: ArtifactRecord, fmt: str,
           confined: bool) -> ArtifactRecord:
    from quantplan.service.artifact_cmd import write_in_format

    model = repo.get_model(plan.model_id).name
    if confined:
        model = confine_model(model, repo.settings)
        check_safetensors(model)
    with tempfile.TemporaryDirectory(prefix="quantplan-export-") as work:
        out = write_in_format(lambda d: store.extract_dir(packed.sha256, d), Path(work) / fmt, fmt, model=model)
        stored = store.put_dir(out)
    return repo.record_artifact(plan.id, fmt, stored.uri, stored.sha256, stored.size)
