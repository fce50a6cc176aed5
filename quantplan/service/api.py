"""The HTTP API (FastAPI), versioned under /v1: submit and follow search jobs, query the leaderboard, download plans.

    POST /v1/jobs                  202, the job (optional `Idempotency-Key` header: a retried submission is safe)
    GET  /v1/jobs                  jobs, newest last (`status`, `limit`)
    GET  /v1/jobs/{id}             status, stage, progress (step, done, total, eta), error
    GET  /v1/jobs/{id}/plans       the plans a job stored, with metrics
    POST /v1/jobs/{id}/cancel      cancel a queued job now, a running one at its next stage
    GET  /v1/leaderboard           plans of a model: filtered, sorted, paged
    GET  /v1/plans/{id}            a plan with its metrics and artifacts
    GET  /v1/plans/{id}/plan.json  the plan file
    GET  /v1/plans/{id}/artifact   the materialized artifact (tar), streamed; its sha256 in `X-Content-SHA256`
    GET  /healthz                  database and Ray reachable (200) or not (503)

Writes need `Authorization: Bearer <token>` with a token from the settings (`QUANTPLAN_API_TOKENS`); reads too
when `QUANTPLAN_AUTH_READS` is set. A job belongs to its submitter: cancelling it takes its owner's or an admin's
token, idempotency keys are per user, and anonymous readers see no spec paths, error texts or submitters
(`service.access`). A job reads only what the server's roots allow (`service.confine`). Errors are JSON
`{"detail": "..."}`: 401 no/bad token, 403 another user's job, 404 unknown id, 409 conflicting idempotency key,
413 body over `QUANTPLAN_MAX_REQUEST_BYTES`, 422 invalid input, 503 database unreachable, 500 with a request id
(the details are in the server's log, never in the response). The job runner is separate (`quantplan runner`, or
the runners `quantplan serve` starts).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime, and the
# dependency aliases below are local to `_routes`.
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException

from quantplan.errors import QuantPlanError
from quantplan.net import AddressError, unreachable
from quantplan.service import web
from quantplan.service.access import User, bearer, find_user, public_job, public_plan, scoped_key
from quantplan.service.client import SHA_HEADER
from quantplan.service.confine import confine
from quantplan.service.jobs import PRINTABLE, JobSpec, SpecError, error_message
from quantplan.service.views import job_view, leaderboard_view, plan_view
from quantplan.storage import (
    DatabaseUnavailableError,
    InvalidRecordError,
    JobStateError,
    NotFoundError,
    Repository,
    StorageError,
    StorageSettings,
    load_settings,
    open_store,
)
from quantplan.storage.artifacts import CHUNK, ArtifactStore

log = logging.getLogger("quantplan.service.api")

API_VERSION = "v1"
JOB_STATUSES = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Id = Annotated[int, Path(ge=1, le=2**31 - 1, description="A positive integer id.")]


class Problem(BaseModel):
    detail: str = Field(description="What was wrong and what to do.")


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or unknown bearer token."},
    422: {"model": Problem, "description": "Invalid id, query or body; the message names each field."},
    404: {"model": Problem, "description": "No such job, plan or model."},
    413: {"model": Problem, "description": "Request body too large."},
    503: {"model": Problem, "description": "The database is unreachable; retry later."},
}


class Services:
    """What the endpoints use: settings, repository, artifact store, tokens (token -> name; with roles:
    `principals`, token -> (name, role))."""

    def __init__(self, settings: StorageSettings, repo: Repository | None = None,
                 store: ArtifactStore | None = None) -> None:
        self.settings = settings
        self.repo = repo or Repository(settings=settings)
        self.store = store or open_store(settings.artifacts)
        self.principals = settings.principals()
        self.tokens = {token: name for token, (name, _) in self.principals.items()}


def create_app(settings: StorageSettings | None = None, *, repo: Repository | None = None,
               store: ArtifactStore | None = None, on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The API over the database and store named by `settings` (default: `load_settings()`); `on_shutdown` runs
    when the server stops (before uvicorn re-raises the signal that stopped it)."""
    settings = settings or (repo.settings if repo is not None else load_settings())
    services = Services(settings, repo, store)
    if not services.tokens:
        log.warning("no API tokens configured (QUANTPLAN_API_TOKENS): every write will be refused with 401")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            on_shutdown()
        if repo is None:
            services.repo.close()

    app = FastAPI(title="QuantPlan", version=API_VERSION, lifespan=lifespan,
                  description="Mixed-precision quantization plans for language models: submit search jobs, "
                              "query the leaderboard, download plans.")
    app.state.services = services
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    _install_error_handlers(app)
    app.include_router(_routes(services))
    web.mount(app, services)  # the web UI at / (quantplan/service/web.py)
    return app


# ---------------------------------------------------------------------------------------------- auth


def _identify(services: Services, authorization: str | None) -> User:
    token = bearer(authorization)
    user = find_user(services.principals, token)
    if user is None:
        raise Unauthorized("a valid bearer token is required" if token is None else "unknown bearer token")
    return user


class Unauthorized(Exception):
    pass


class Forbidden(Exception):
    pass


# ---------------------------------------------------------------------------------------------- routes


def _routes(services: Services) -> APIRouter:
    router = APIRouter()
    Auth = Annotated[str | None, Header(description="Bearer <token>")]

    def writer(authorization: Auth = None) -> User:
        return _identify(services, authorization)

    def reader(authorization: Auth = None) -> User | None:
        """The caller; None for an anonymous read (allowed unless QUANTPLAN_AUTH_READS). A token that is sent
        must be valid."""
        if authorization is None and not services.settings.auth_reads:
            return None
        return _identify(services, authorization)

    Writer = Annotated[User, Depends(writer)]
    Reader = Annotated[User | None, Depends(reader)]
    repo, store = services.repo, services.store

    def job_out(job: Any, user: User | None) -> dict[str, Any]:
        return job_view(job) if user is not None else public_job(job_view(job))

    def plan_out(plan: Any, user: User | None, *, full: bool = False) -> dict[str, Any]:
        return plan_view(plan, full=full) if user is not None else public_plan(plan_view(plan, full=full))

    @router.post(f"/{API_VERSION}/jobs", status_code=202, responses={**ERRORS, 409: {"model": Problem}},
                 summary="Submit a search job")
    def submit(spec: JobSpec, user: Writer,
               idempotency_key: Annotated[str | None, Header(max_length=255, pattern=r"^[\x21-\x7e]+$")] = None
               ) -> dict[str, Any]:
        spec = confine(spec, services.settings)  # 422 for a path outside the roots, or the hub when it is off
        try:
            job = repo.create_job(spec.to_json(), submitter=user.name,
                                  idempotency_key=scoped_key(user, idempotency_key))
        except StorageError as e:
            if isinstance(e, DatabaseUnavailableError) or idempotency_key is None:
                raise
            raise Conflict("this idempotency key already names another of your jobs, with another spec; send a "
                           "new key for a new job") from e
        log.info("job %d submitted by %s", job.id, user.name)
        return job_view(job)

    @router.get(f"/{API_VERSION}/jobs", responses=ERRORS, summary="List jobs")
    def jobs(user: Reader, status: JOB_STATUSES | None = None,
             limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
        return [job_out(j, user) for j in repo.list_jobs(status, limit)]

    @router.get(f"/{API_VERSION}/jobs/{{job_id}}", responses=ERRORS, summary="A job's status")
    def job(job_id: Id, user: Reader) -> dict[str, Any]:
        return job_out(repo.get_job(job_id), user)

    @router.get(f"/{API_VERSION}/jobs/{{job_id}}/plans", responses=ERRORS, summary="The plans a job stored")
    def job_plans(job_id: Id, user: Reader) -> list[dict[str, Any]]:
        repo.get_job(job_id)  # 404 for an unknown job rather than an empty list
        return [plan_out(p, user) for p in repo.plans_for_job(job_id)]

    @router.post(f"/{API_VERSION}/jobs/{{job_id}}/cancel", responses={**ERRORS, 403: {"model": Problem}},
                 summary="Cancel a job (its submitter or an admin)")
    def cancel(job_id: Id, user: Writer) -> dict[str, Any]:
        if not user.owns(repo.get_job(job_id).submitter):
            raise Forbidden(f"job {job_id} belongs to another user; only its submitter or an admin token may "
                            "cancel it")
        return job_view(repo.cancel_job(job_id))

    @router.get(f"/{API_VERSION}/leaderboard", responses=ERRORS, summary="Plans of a model")
    def leaderboard(
        user: Reader,
        model: Annotated[str, Query(min_length=1, max_length=1024, pattern=PRINTABLE,
                                    description="Name, fingerprint or id.")],
        max_avg_bits: Annotated[float | None, Query(gt=0, le=64)] = None,
        max_bytes: Annotated[int | None, Query(ge=0, le=2**62)] = None,
        act_bits: Annotated[int | None, Query(ge=1, le=32)] = None,
        sort: Annotated[str, Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")] = "perplexity",
        order: Literal["asc", "desc"] = "asc",
        dataset: Annotated[str | None, Query(max_length=4096, pattern=PRINTABLE)] = None,
        pareto_only: bool = False,
        distinct: Annotated[bool, Query(description="A plan several jobs stored is listed once.")] = False,
        limit: Annotated[int, Query(ge=1, le=1000)] = 20,
        offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    ) -> dict[str, Any]:
        key: int | str = int(model) if model.isdigit() and len(model) < 10 else model
        page = repo.leaderboard(key, max_avg_bits=max_avg_bits, max_bytes=max_bytes, act_bits=act_bits, sort=sort,
                                dataset=dataset, order=order, pareto_only=pareto_only, limit=limit, offset=offset,
                                distinct=distinct)
        view = leaderboard_view(model, page)
        return view if user is not None else {**view, "plans": [public_plan(p) for p in view["plans"]]}

    @router.get(f"/{API_VERSION}/plans/{{plan_id}}", responses=ERRORS, summary="A plan with its metrics")
    def plan(plan_id: Id, user: Reader) -> dict[str, Any]:
        return plan_out(repo.get_plan(plan_id), user, full=True)

    @router.get(f"/{API_VERSION}/plans/{{plan_id}}/plan.json", responses=ERRORS, summary="The plan file")
    def plan_file(plan_id: Id, _: Reader) -> JSONResponse:
        record = repo.get_plan(plan_id)
        return JSONResponse(record.plan, headers={"Content-Disposition": f'attachment; filename="plan-{plan_id}.json"'})

    @router.get(f"/{API_VERSION}/plans/{{plan_id}}/artifact", responses=ERRORS, response_class=StreamingResponse,
                summary="The materialized artifact (tar archive), streamed")
    def artifact(plan_id: Id, _: Reader, format: Annotated[  # noqa: A002 - the query parameter's name
            Literal["quantplan", "compressed-tensors"], Query(description="quantplan: the packed artifact; "
                                                                          "compressed-tensors: a Hugging Face "
                                                                          "checkpoint vLLM serves, built from it on "
                                                                          "first request and kept")] = "quantplan",
                 ) -> StreamingResponse:
        record = repo.get_plan(plan_id)
        packed = next((a for a in record.artifacts if a.kind == "packed"), None)
        if packed is None:
            raise NotFoundError(f"plan {plan_id} has no materialized artifact; pick a plan whose `artifacts` "
                                "lists one (the job materializes its best plans)")
        if format != "quantplan":
            from quantplan.service.exports import artifact_in_format

            settings = services.settings
            confined = bool(settings.roots("model") or settings.roots("data"))
            packed = artifact_in_format(repo, store, record, format, confined=confined)
        reader_ = store.open(packed.sha256)
        headers = {SHA_HEADER: packed.sha256, "Content-Length": str(packed.bytes), "ETag": f'"{packed.sha256}"',
                   "Content-Disposition": f'attachment; filename="plan-{plan_id}.tar"'}
        return StreamingResponse(_chunks(reader_), media_type="application/x-tar", headers=headers)

    @router.get("/healthz", summary="Database and Ray reachable (each check's result for token holders)",
                responses={503: {"description": "Unhealthy"}})
    def healthz(authorization: Auth = None) -> JSONResponse:
        checks = {"database": _check_database(repo), "ray": _check_ray(services.settings.ray_address)}
        ok = all(v in ("ok", "local") for v in checks.values())
        known = find_user(services.principals, bearer(authorization)) is not None
        body = {"status": "ok" if ok else "unavailable", **(checks if known else {})}  # no hosts for anonymous
        return JSONResponse(body, status_code=200 if ok else 503)

    return router


def _chunks(f: Any) -> Iterator[bytes]:
    with f:
        while chunk := f.read(CHUNK):
            yield chunk


def _check_database(repo: Repository) -> str:
    try:
        with repo.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as e:  # any failure to talk to it is "unreachable" here; its text (URL, host) stays in the log
        log.warning("health check: database unreachable: %s", str(e).splitlines()[0][:200])
        return "unreachable"


def _check_ray(address: str | None) -> str:
    """`local` when jobs use a local Ray instance; else whether the cluster's GCS port accepts connections."""
    if not address or address in ("local", "auto"):
        return "local"
    try:
        why = unreachable(address, timeout=2.0)
    except AddressError as e:
        why = str(e)
    return "ok" if why is None else f"unreachable: {address}: {why}"


# ---------------------------------------------------------------------------------------------- errors


class Conflict(Exception):
    pass


def _install_error_handlers(app: FastAPI) -> None:
    def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(Unauthorized)
    async def _401(_: Request, e: Unauthorized) -> JSONResponse:
        return problem(401, f"{e}; send `Authorization: Bearer <token>` with a token the server was given "
                            "(QUANTPLAN_API_TOKENS)", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Forbidden)
    async def _403(_: Request, e: Forbidden) -> JSONResponse:
        return problem(403, str(e))

    @app.exception_handler(Conflict)
    async def _409(_: Request, e: Conflict) -> JSONResponse:
        return problem(409, str(e))

    def internal(e: BaseException) -> JSONResponse:
        """500 with a request id: the error (which may hold database text or a URL) goes to the log only."""
        request_id = uuid.uuid4().hex[:16]
        log.error("request %s failed: %s: %s", request_id, type(e).__name__, e, exc_info=e)
        return problem(500, f"internal error (request id {request_id}); the operator finds the details in the "
                            "server's log", {"X-Request-ID": request_id})

    @app.exception_handler(Exception)
    async def _500(_: Request, e: Exception) -> JSONResponse:
        return internal(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 400:  # FastAPI's "error parsing the body" (bytes that are not UTF-8 JSON)
            return problem(422, "invalid request: the body is not a JSON document (UTF-8); send the job spec as "
                                "JSON")
        return problem(e.status_code, str(e.detail), dict(e.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _422(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
            parts.append(f"{where}: {error_message(err)}")
        return problem(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(QuantPlanError)
    async def _quantplan(_: Request, e: QuantPlanError) -> JSONResponse:
        if isinstance(e, NotFoundError):
            return problem(404, str(e))
        if isinstance(e, DatabaseUnavailableError):
            log.error("database unavailable: %s", e)
            return problem(503, "the database is unavailable; retry later", {"Retry-After": "5"})
        if isinstance(e, (SpecError, InvalidRecordError)):
            return problem(422, str(e))
        if isinstance(e, JobStateError):
            return problem(409, str(e))
        if isinstance(e, StorageError):  # its message quotes the database's text and URL
            return internal(e)
        return problem(400, str(e))


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes (declared Content-Length or counted)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._too_large(send)
            return
        if declared is not None:
            await self.app(scope, receive, send)
            return
        # no declared length (chunked): read the body here, at most `limit` bytes, then replay it to the app
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._too_large(send)
                return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    async def _too_large(self, send: Any) -> None:
        response = JSONResponse({"detail": f"request body over {self.limit:,} bytes; send a smaller body"},
                                status_code=413)
        await response({"type": "http"}, _no_receive, send)


def _replay(messages: list[dict[str, Any]], then: Any = None) -> Any:
    """An ASGI `receive` that returns `messages`, then defers to `then` (e.g. to see a disconnect)."""
    pending = list(messages)

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        return await then() if then is not None else {"type": "http.disconnect"}

    return receive


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}
