"""Who may do what on a shared server: callers (bearer token -> name and role), job ownership, per-user
idempotency keys, and the views anonymous readers get (torch-free).

Roles: `user` acts on its own jobs; `admin` on every job. Anonymous readers (when `QUANTPLAN_AUTH_READS` is off)
see jobs' status and progress, plans and metrics, but not the paths of a job's spec, its error text, its
submitter or runner, nor where artifacts are stored.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from quantplan.service.confine import DATA_FIELDS

HIDDEN_SPEC_KEYS = ("model", *DATA_FIELDS)  # where a spec names files or models of the submitter
HIDDEN_JOB_KEYS = ("submitter", "runner")


@dataclass(frozen=True)
class User:
    """An authenticated caller: the token's name (recorded as a job's submitter) and role."""

    name: str
    role: str = "user"

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def owns(self, submitter: str | None) -> bool:
        """Whether this caller may act on a job `submitter` submitted (its own, or any as an admin)."""
        return self.admin or (submitter is not None and hmac.compare_digest(submitter, self.name))


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, None without one."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def find_user(principals: Mapping[str, tuple[str, str]], token: str | None) -> User | None:
    """The caller a token names (constant-time comparison against every configured token), None if unknown."""
    found = None
    for known, (name, role) in principals.items():
        if token is not None and hmac.compare_digest(token.encode(), known.encode()):
            found = User(name, role)
    return found


def scoped_key(user: User, key: str | None) -> str | None:
    """The stored form of a user's idempotency key: the same key sent by two users names two jobs."""
    if key is None:
        return None
    return "u1:" + hashlib.sha256(f"{user.name}\x00{key}".encode()).hexdigest()


def public_job(view: dict[str, Any]) -> dict[str, Any]:
    """A job view (`views.job_view`) without what only token holders see: spec paths, error text, submitter."""
    spec = view.get("spec") or {}
    hidden = {k: None for k in HIDDEN_JOB_KEYS}
    error = None if view.get("error") is None else "hidden: send a bearer token to see the error"
    return {**view, **hidden, "error": error,
            "spec": {k: v for k, v in spec.items() if k not in HIDDEN_SPEC_KEYS}}


def public_plan(view: dict[str, Any]) -> dict[str, Any]:
    """A plan view without the artifact store's locations (the sha256 and size stay)."""
    artifacts = [{k: v for k, v in a.items() if k != "uri"} for a in view.get("artifacts", ())]
    return {**view, "artifacts": artifacts}
