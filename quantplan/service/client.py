"""A small client of the QuantPlan HTTP API (httpx), used by the remote commands of the command line.

Every failure is a `QuantPlanError` with the server's message: an unreachable server, a refused token, an unknown
id, a downloaded artifact whose sha256 does not match the header.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from quantplan.errors import QuantPlanError

SHA_HEADER = "X-Content-SHA256"  # the archive's sha256, sent by GET /v1/plans/{id}/artifact
CHUNK = 1 << 20


class ClientError(QuantPlanError):
    """The server refused a request, or could not be reached."""


class Client:
    """`Client("http://host:8000", token)`; the token is sent as `Authorization: Bearer <token>`."""

    def __init__(self, server: str, token: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not server.startswith(("http://", "https://")):
            raise ClientError(f"server URL {server!r} must start with http:// or https:// "
                              "(e.g. http://localhost:8000)")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.server = server.rstrip("/")
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/jobs", json=spec, headers=headers)

    def job(self, job_id: int) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{int(job_id)}")

    def job_plans(self, job_id: int) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/jobs/{int(job_id)}/plans")

    def jobs(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/jobs", params=_params(status=status, limit=limit))

    def cancel(self, job_id: int) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{int(job_id)}/cancel")

    def leaderboard(self, **query: Any) -> dict[str, Any]:
        return self._json("GET", "/v1/leaderboard", params=_params(**query))

    def plan(self, plan_id: int) -> dict[str, Any]:
        return self._json("GET", f"/v1/plans/{int(plan_id)}")

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/healthz", ok=(200, 503))

    def download(self, plan_id: int, out: str | os.PathLike[str], *, overwrite: bool = False,
                 format: str = "quantplan") -> dict[str, Any]:  # noqa: A002 - the API's query parameter
        """Stream a plan's artifact archive to a temporary file, verify its sha256 against the server's header, and
        unpack it into `out` atomically (`quant.atomic.staging_dir`). Nothing is left on failure."""
        from quantplan.quant.atomic import check_destination, staging_dir

        out = Path(out)
        check_destination(out, overwrite)  # before the download, not after it
        with tempfile.TemporaryDirectory(prefix="quantplan-download-") as work:
            archive, digest, size = Path(work) / "artifact.tar", hashlib.sha256(), 0
            with self._stream("GET", f"/v1/plans/{int(plan_id)}/artifact", params={"format": format}) as response, \
                    archive.open("wb") as f:
                expected = response.headers.get(SHA_HEADER)
                for chunk in response.iter_bytes(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            if not expected or digest.hexdigest() != expected.lower():
                raise ClientError(f"the artifact of plan {plan_id} arrived with sha256 {digest.hexdigest()}, the "
                                  f"server announced {expected}; download it again")
            with staging_dir(out, overwrite) as tmp, tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        return {"plan_id": int(plan_id), "out": str(out), "sha256": expected, "bytes": size}

    # ------------------------------------------------------------------ plumbing

    def _json(self, method: str, path: str, *, ok: tuple[int, ...] = (), **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        if response.status_code >= 400 and response.status_code not in ok:
            raise self._refused(response)
        return response.json()

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed response; a refused request or a dropped connection (also mid-body) is a `ClientError`."""
        try:
            with self.http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._refused(response)
                yield response
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None

    def _unreachable(self, e: httpx.HTTPError) -> ClientError:
        return ClientError(f"cannot reach the QuantPlan server at {self.server}: {e}; check --server / "
                           "QUANTPLAN_SERVER and that `quantplan serve` is running")

    def _refused(self, response: httpx.Response) -> ClientError:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text[:500]
        hint = "; set --token or QUANTPLAN_TOKEN" if response.status_code == 401 else ""
        return ClientError(f"server answered {response.status_code}: {detail}{hint}")


def _params(**query: Any) -> dict[str, Any]:
    return {k: v for k, v in query.items() if v is not None and v is not False}
