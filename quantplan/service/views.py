"""JSON views of stored records, shared by the command line (`--json`) and the HTTP API (torch-free).

The keys are a contract with scripts: add to them, never rename.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from quantplan.errors import QuantPlanError
from quantplan.quant.plan import Plan
from quantplan.quant.targets import plan_formats
from quantplan.storage import JobRecord, LeaderboardPage, PlanRecord

PLAN_COLUMNS = ("id", "job", "label", "avg_bits", "bytes", "act", "pred_loss", "ppl", "kl", "pareto", "artifact")
PLAN_FORMATS = {"avg_bits": ".3f", "bytes": ",d", "pred_loss": ".4f", "ppl": ".3f", "kl": ".4f"}


STEP_KEYS = ("step", "unit", "done", "total", "elapsed", "rate", "eta")
FINAL = ("succeeded", "failed", "cancelled")  # job statuses that do not change any more


def job_view(job: JobRecord) -> dict[str, Any]:
    """A job's status as users see it (`quantplan status`, `GET /v1/jobs/{id}`).

    `progress` is the whole job's fraction done; `step` .. `eta` are where the running step of `stage` stands
    (units done of total, seconds elapsed, units per second, seconds left; None where unknown)."""
    step = job.step_progress or {}
    return {
        "id": job.id,
        "status": job.status,
        "stage": job.stage,
        "progress": job.progress,
        **{k: step.get(k) for k in STEP_KEYS},
        "error": job.error,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "spec": job.spec,
        "submitter": job.submitter,
        "runner": job.runner,
        "created_at": _time(job.created_at),
        "started_at": _time(job.started_at),
        "finished_at": _time(job.finished_at),
        "heartbeat_at": _time(job.heartbeat_at),
    }


def step_line(job: dict[str, Any]) -> str:
    """Where the running step stands: 'sensitivity pass 12/64 windows, 0.41/s, eta 2:07' ('' when unknown)."""
    if job.get("step") is None or job.get("total") is None:
        return ""
    parts = [f"{job['step']} {job['done']}/{job['total']} {job['unit']}"]
    if job.get("rate"):
        parts.append(f"{job['rate']:.2f}/s")
    if job.get("eta") is not None and job["done"] < job["total"] and job["status"] == "running":
        minutes, seconds = divmod(round(job["eta"]), 60)
        parts.append(f"eta {minutes}:{seconds:02d}")
    return ", ".join(parts)


def plan_view(plan: PlanRecord, *, full: bool = False) -> dict[str, Any]:
    """A stored plan: cost, prediction, metrics (as a list and, for the common ones, flat), artifacts.

    `perplexity` and `kl` are the smallest stored values over datasets (the materialized model's when it was
    materialized, else the simulation's). With `full`, the plan JSON itself is included under `plan`.
    """
    meta = plan.plan.get("meta", {}) if isinstance(plan.plan, dict) else {}
    view: dict[str, Any] = {
        "id": plan.id,
        "job_id": plan.job_id,
        "model_id": plan.model_id,
        "label": meta.get("label"),
        "recipe": meta.get("recipe"),
        "avg_bits": plan.avg_bits,
        "bytes": plan.bytes,
        "act_bits": plan.act_bits,
        "predicted_loss": plan.predicted_loss,
        "is_pareto": plan.is_pareto,
        "perplexity": plan.metric("perplexity"),
        "kl": plan.metric("kl"),
        "plan_sha256": plan.plan_sha256,
        "created_at": _time(plan.created_at),
        "metrics": [{"name": m.name, "dataset": m.dataset, "value": m.value} for m in plan.metrics],
        "artifacts": [{"kind": a.kind, "sha256": a.sha256, "bytes": a.bytes, "uri": a.uri} for a in plan.artifacts],
        "formats": _formats(plan.plan_sha256, plan.plan),  # export formats its schemes fit
    }
    if full:
        view["plan"] = plan.plan
        view["schemes"] = scheme_counts(plan.plan)
    return view


_FORMATS: dict[str, tuple[str, ...]] = {}  # plan sha256 -> its formats: judging a plan takes milliseconds, and a
# leaderboard page shows up to 1,000 (the sha256 covers everything but the plan's free-form `meta`)


def _formats(sha256: str, plan: Any) -> list[str]:
    if sha256 not in _FORMATS:
        if len(_FORMATS) >= 100_000:
            _FORMATS.clear()
        try:
            _FORMATS[sha256] = tuple(plan_formats(Plan.from_dict(plan)))
        except QuantPlanError:
            _FORMATS[sha256] = ()
    return list(_FORMATS[sha256])


def leaderboard_view(model: str, page: LeaderboardPage) -> dict[str, Any]:
    return {"model": model, "total": page.total, "offset": page.offset, "limit": page.limit,
            "plans": [plan_view(p) for p in page.plans]}


def plan_row(view: dict[str, Any]) -> dict[str, Any]:
    """A `plan_view` as a row of the leaderboard table (PLAN_COLUMNS)."""
    return {**view, "job": view["job_id"], "act": view["act_bits"], "pred_loss": view["predicted_loss"],
            "ppl": view["perplexity"], "pareto": "yes" if view["is_pareto"] else "",
            "artifact": "yes" if any(a["kind"] == "packed" for a in view["artifacts"]) else ""}


def scheme_counts(plan: dict[str, Any]) -> dict[str, int]:
    """How many layers use each scheme, from a plan's JSON (`layers` map; `default` for the rest)."""
    layers = plan.get("layers") or {}
    counts = Counter(str(v.get("scheme", v)) if isinstance(v, dict) else str(v) for v in layers.values())
    return dict(counts.most_common())


def _time(value: Any) -> str | None:
    return None if value is None else value.isoformat()
