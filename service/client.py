"""A small client of the QuantPlan HTTP API (httpx), used by the remote commands of the command line.

Every failure is a `QuantPlanError` with the server's message: an unreachable server, a refused token, an unknown
id, a downloaded artifact whose sha256 does not match the header.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import httpx

from quant.errors import QuantPlanError

SHA_HEADER = "X-Content-SHA256"  # same as service.api.SHA_HEADER (kept here so the client needs no FastAPI)
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

    def download(self, plan_id: int, out: str | os.PathLike[str], *, overwrite: bool = False) -> dict[str, Any]:
        """Stream a plan's artifact archive to a temporary file, verify its sha256 against the server's header,
        unpack it into a sibling temporary directory and rename that to `out`. Nothing is left on failure."""
        out = Path(out)
        if out.exists() and not overwrite:
            raise ClientError(f"{out} already exists; choose a new directory or pass --overwrite")
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            archive, digest, size = work / "artifact.tar", hashlib.sha256(), 0
            with self._stream("GET", f"/v1/plans/{int(plan_id)}/artifact") as response, archive.open("wb") as f:
                expected = response.headers.get(SHA_HEADER)
                for chunk in response.iter_bytes(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            if not expected or digest.hexdigest() != expected.lower():
                raise ClientError(f"the artifact of plan {plan_id} arrived with sha256 {digest.hexdigest()}, the "
                                  f"server announced {expected}; download it again")
            unpacked = work / "artifact"
            with tarfile.open(archive) as tar:
                tar.extractall(unpacked, filter="data")
            if out.exists():
                shutil.rmtree(out)
            unpacked.rename(out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
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

    def _stream(self, method: str, path: str) -> Any:
        client = self

        class _Stream:
            def __enter__(self) -> httpx.Response:
                try:
                    self.cm = client.http.stream(method, path)
                    response = self.cm.__enter__()
                except httpx.HTTPError as e:
                    raise client._unreachable(e) from None
                if response.status_code >= 400:
                    response.read()
                    self.cm.__exit__(None, None, None)
                    raise client._refused(response)
                return response

            def __exit__(self, *exc: Any) -> None:
                self.cm.__exit__(*exc)

        return _Stream()

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
