"""The web UI: server-rendered pages (Jinja2) over the same repository and store as the API, mounted at `/`.

    GET  /                          models with stored plans: unquantized perplexity, plans, jobs
    GET  /leaderboard?model=...     a model's plans: filter form, Pareto plot (SVG), sortable table
    GET  /plans/{id}                cost, predicted vs measured, metrics, per-layer heatmap, downloads, commands
    GET  /plans/{id}/plan.json      the plan file;  GET /plans/{id}/download/{format}: a stored artifact
    GET  /jobs, /jobs/{id}          jobs: status, stage, step, the study's best value; a running job refreshes
    POST /jobs, /jobs/{id}/cancel   submit / cancel (token holders: the token is sent once to /login and kept
                                    in an HttpOnly, SameSite=Strict cookie)

Every page works without JavaScript (forms submit with GET, sorting is links, refresh is a meta tag); the small
script in static/ only submits the filter form on change and copies commands. Nothing is loaded from another
origin. Reads follow the API's rule: open unless `QUANTPLAN_AUTH_READS`, then the cookie's token is required.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from quantplan.errors import QuantPlanError
from quantplan.service.access import User, find_user, public_job, public_plan
from quantplan.service.client import SHA_HEADER
from quantplan.service.confine import confine
from quantplan.service.exports import FORMATS, PACKED, artifact_in_format, kind
from quantplan.service.jobs import JobSpec
from quantplan.service.views import FINAL, job_view, plan_view, step_line
from quantplan.service.webplan import cost_by_scheme, export_formats, heatmap
from quantplan.service.webplot import X_AXES, Y_AXES, pareto_plot, plan_kind
from quantplan.storage import NotFoundError
from quantplan.storage.artifacts import CHUNK

HERE = Path(__file__).parent
COOKIE = "quantplan_token"

SORTS = {"id": "id", "avg_bits": "avg bits", "bytes": "bytes", "act_bits": "act", "predicted_loss": "pred. loss",
         "perplexity": "perplexity", "kl": "KL"}
Id = Annotated[int, PathParam(ge=1, le=2**31 - 1)]  # as the API's ids: a 32-bit database key
MAX_PLANS = 1000  # a leaderboard page shows (and plots) at most this many plans


templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                        trim_blocks=True, lstrip_blocks=True)
templates.filters["num"] = lambda v, spec="": "-" if v is None else format(v, spec)


def mount(app: FastAPI, services: Any) -> None:
    """Add the pages and their static files to the API's app (`services`: its repository, store, settings)."""
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(_routes(services))


class Page:
    """What every handler needs: the request, who is signed in, and rendering."""

    def __init__(self, services: Any, request: Request) -> None:
        self.services, self.request = services, request
        self.signed_in: User | None = find_user(services.principals, request.cookies.get(COOKIE))
        self.user = None if self.signed_in is None else self.signed_in.name

    def readable(self) -> bool:
        return self.signed_in is not None or not self.services.settings.auth_reads

    def job(self, job: Any) -> dict[str, Any]:
        """A job as this reader may see it: anonymous readers get the API's public view (no spec paths, error
        text or submitter)."""
        view = job_view(job)
        return view if self.signed_in is not None else public_job(view)

    def plan(self, plan: Any, *, full: bool = False) -> dict[str, Any]:
        view = plan_view(plan, full=full)
        return view if self.signed_in is not None else public_plan(view)

    def may_cancel(self, job: Mapping[str, Any]) -> bool:
        return self.signed_in is not None and self.signed_in.owns(job.get("submitter"))

    def render(self, name: str, status: int = 200, **context: Any) -> Response:
        if not self.readable():
            return RedirectResponse(f"/login?next={self.request.url.path}", status_code=303)
        html = templates.get_template(name).render(user=self.user, path=self.request.url.path, **context)
        return HTMLResponse(html, status_code=status)


def _routes(services: Any) -> APIRouter:  # noqa: C901 - one closure per page keeps the services in scope
    router = APIRouter(include_in_schema=False)
    repo, store = services.repo, services.store

    @router.get("/", response_class=HTMLResponse)
    def models(request: Request) -> Response:
        return Page(services, request).render("models.html", models=repo.model_summaries())

    @router.get("/leaderboard", response_class=HTMLResponse)
    def leaderboard(request: Request) -> Response:
        page = Page(services, request)
        q = _board_query(request.query_params)
        if not q["model"]:
            return RedirectResponse("/", status_code=303)
        started = time.perf_counter()
        try:
            board = repo.leaderboard(q["model"], max_avg_bits=q["max_bits"], max_bytes=q["max_bytes"],
                                     act_bits=q["act_bits"], sort=q["sort"], order=q["order"],
                                     pareto_only=q["pareto_only"], distinct=q["distinct"], limit=MAX_PLANS)
        except NotFoundError as e:
            return page.render("error.html", 404, message=str(e))
        views = [page.plan(p) for p in board.plans]
        if q["format"]:  # plans whose schemes the target format expresses (`views.plan_view`'s `formats`)
            views = [v for v in views if q["format"] in v.get("formats", ())]
        base = _base_perplexity(views) or next((m.base_perplexity for m in repo.model_summaries()
                                                if m.name == q["model"]), None)
        plot = pareto_plot(views, x=q["x"], y=q["y"], log=q["log"], base_perplexity=base)
        response = page.render("leaderboard.html", q=q, plans=views, total=board.total, plot=plot,
                               base_perplexity=base, sorts=SORTS, x_axes=X_AXES, y_axes=Y_AXES,
                               formats=_format_names(), kind=plan_kind, link=lambda **kw: _link(q, **kw))
        response.headers["Server-Timing"] = f"render;dur={(time.perf_counter() - started) * 1000:.1f}"
        return response

    @router.get("/plans/{plan_id}", response_class=HTMLResponse)
    def plan(request: Request, plan_id: Id) -> Response:
        page = Page(services, request)
        try:
            view = page.plan(repo.get_plan(plan_id), full=True)
        except NotFoundError as e:
            return page.render("error.html", 404, message=str(e))
        model = repo.get_model(view["model_id"])
        kinds = {a["kind"]: a for a in view["artifacts"]}
        downloads = [{"format": name, "description": about, "artifact": kinds.get(_kind(name)),
                      "servable": name in FORMATS} for name, about in export_formats()]
        server = str(request.base_url).rstrip("/")
        return page.render("plan.html", plan=view, model=model, heatmap=heatmap(view["plan"]),
                           cost=cost_by_scheme(view["plan"]), downloads=downloads, server=server,
                           base_perplexity=view_metric(view, "base_perplexity"))

    @router.get("/plans/{plan_id}/plan.json")
    def plan_file(request: Request, plan_id: Id) -> Response:
        if not Page(services, request).readable():
            return _unauthorized()
        record = repo.get_plan(plan_id)
        return JSONResponse(record.plan, headers={"Content-Disposition": f'attachment; filename="plan-{plan_id}.json"'})

    @router.get("/plans/{plan_id}/download/{fmt}")
    def download(request: Request, plan_id: Id, fmt: str) -> Response:
        if not Page(services, request).readable():
            return _unauthorized()
        record = repo.get_plan(plan_id)
        found = next((a for a in record.artifacts if a.kind == kind(fmt)), None)  # kind() refuses unknown formats
        if found is None:  # as GET /v1/plans/{id}/artifact?format=: built from the packed artifact, then kept
            if not any(a.kind == PACKED for a in record.artifacts):
                raise NotFoundError(f"plan {plan_id} has no materialized artifact; pick a plan whose `artifacts` "
                                    "lists one (the job materializes its best plans)")
            settings = services.settings
            found = artifact_in_format(repo, store, record, fmt,
                                       confined=bool(settings.roots("model") or settings.roots("data")))
        headers = {SHA_HEADER: found.sha256, "Content-Length": str(found.bytes), "ETag": f'"{found.sha256}"',
                   "Content-Disposition": f'attachment; filename="plan-{plan_id}-{fmt}.tar"'}
        return StreamingResponse(_chunks(store.open(found.sha256)), media_type="application/x-tar", headers=headers)

    @router.get("/jobs", response_class=HTMLResponse)
    def jobs(request: Request) -> Response:
        return _jobs_page(Page(services, request), repo)

    @router.post("/jobs", response_class=HTMLResponse)
    async def submit(request: Request) -> Response:
        page = Page(services, request)
        if page.signed_in is None:
            return _unauthorized()
        form = _form(await request.body())
        try:  # the API's checks: the spec, then the server's model and data roots (service.confine)
            spec = confine(JobSpec.parse(_spec_from_form(form)), services.settings)
        except (QuantPlanError, ValueError) as e:
            return _jobs_page(page, repo, error=str(e), form=form, status=422)
        job = repo.create_job(spec.to_json(), submitter=page.signed_in.name)
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)

    @router.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job(request: Request, job_id: Id) -> Response:
        page = Page(services, request)
        try:
            record = repo.get_job(job_id)
        except NotFoundError as e:
            return page.render("error.html", 404, message=str(e))
        view = page.job(record)
        best = _best_values(repo, [view]).get(job_id)
        plans = [page.plan(p) for p in repo.plans_for_job(job_id)]
        return page.render("job.html", job=view, step=step_line(view), best=best, plans=plans,
                           running=view["status"] not in FINAL, may_cancel=page.may_cancel(job_view(record)))

    @router.post("/jobs/{job_id}/cancel")
    def cancel(request: Request, job_id: Id) -> Response:
        page = Page(services, request)
        if page.signed_in is None:
            return _unauthorized()
        if not page.may_cancel(job_view(repo.get_job(job_id))):
            return JSONResponse({"detail": f"job {job_id} belongs to another user; only its submitter or an admin "
                                           "token may cancel it"}, status_code=403)
        repo.cancel_job(job_id)
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> Response:  # noqa: A002 - the usual parameter name
        return _login_page(request, next)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = _form(await request.body())
        token, target = form.get("token", ""), _local(form.get("next", "/"))
        if find_user(services.principals, token) is None:
            return _login_page(request, target, "unknown token; use one the server was given (QUANTPLAN_API_TOKENS)")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    @router.post("/logout")
    def logout() -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    return router


def _jobs_page(page: Page, repo: Any, *, error: str | None = None, form: Mapping[str, str] | None = None,
               status: int = 200) -> Response:
    views = [page.job(j) for j in reversed(repo.list_jobs(limit=100))]
    return page.render("jobs.html", status, jobs=views, steps={j["id"]: step_line(j) for j in views},
                       best=_best_values(repo, views), error=error, form=form or {},
                       running=any(j["status"] not in FINAL for j in views))


def _best_values(repo: Any, jobs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per job: finished trials of its study and the smallest predicted loss among those within its bit budget."""
    studies = repo.study_progress([f"job-{j['id']}" for j in jobs])
    out = {}
    for j in jobs:
        study = studies.get(f"job-{j['id']}")
        if study is None:
            continue
        budget = j["spec"].get("budget_bits")
        fits = [v for v, bits in study.values if budget is None or bits is None or bits <= budget + 1e-9]
        out[j["id"]] = {"trials": study.trials, "best": min(fits) if fits else None}
    return out


def _login_page(request: Request, target: str, error: str | None = None) -> Response:
    html = templates.get_template("login.html").render(user=None, path="/login", next=_local(target), error=error)
    return HTMLResponse(html, status_code=401 if error else 200)


def _board_query(params: Mapping[str, str]) -> dict[str, Any]:
    """The leaderboard page's query, validated leniently: a bad value falls back to its default."""
    def number(key: str, kind: type) -> Any:
        try:
            value = kind(params[key])
            return value if value >= 0 else None
        except (KeyError, ValueError):
            return None

    act = number("act_bits", int)
    return {
        "model": params.get("model", ""),
        "x": params.get("x") if params.get("x") in X_AXES else "avg_bits",
        "y": params.get("y") if params.get("y") in Y_AXES else "perplexity",
        "log": params.get("log") in ("1", "on", "true"),
        "max_bits": number("max_bits", float) or None,
        "max_bytes": number("max_bytes", int),
        "act_bits": act if act in (8, 16) else None,
        "format": params.get("format") if params.get("format") in _format_names() else "",
        "pareto_only": params.get("pareto_only") in ("1", "on", "true"),
        "distinct": params.get("distinct") in ("1", "on", "true"),
        "sort": params.get("sort") if params.get("sort") in SORTS else "perplexity",
        "order": "desc" if params.get("order") == "desc" else "asc",
    }


def _link(q: Mapping[str, Any], **changes: Any) -> str:
    merged = {**q, **changes}
    flags = ("log", "pareto_only", "distinct")
    query = {k: ("1" if k in flags else v) for k, v in merged.items() if v not in (None, "", False)}
    return "/leaderboard?" + urlencode(query)


def _kind(fmt: str) -> str | None:
    return kind(fmt) if fmt in FORMATS else None


def _format_names() -> tuple[str, ...]:
    """The target formats a plan view's `formats` may name (torch-free: the leaderboard does not load the registry)."""
    return FORMATS


def _base_perplexity(views: list[dict[str, Any]]) -> float | None:
    values = [view_metric(v, "base_perplexity") for v in views]
    return min((v for v in values if v is not None), default=None)


def view_metric(view: Mapping[str, Any], name: str) -> float | None:
    values = [m["value"] for m in view["metrics"] if m["name"] == name]
    return min(values) if values else None


def _spec_from_form(form: Mapping[str, str]) -> dict[str, Any]:
    """A job spec from the submit form: the named fields (blank ones left out) over the optional JSON object."""
    extra = json.loads(form["extra"]) if form.get("extra", "").strip() else {}
    if not isinstance(extra, dict):
        raise ValueError("the further options must be a JSON object")
    numbers = {"budget_bits": float, "budget_mb": float, "act_bits": int, "trials": int, "eval_top": int}
    fields = {k: numbers[k](v) if k in numbers else v for k, v in form.items()
              if k in ("model", "data", "eval_data", *numbers) and v.strip()}
    return extra | fields


def _form(body: bytes) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


def _local(target: str) -> str:
    """Only a path on this server (no scheme, no host) is a redirect target."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


def _unauthorized() -> Response:
    return JSONResponse({"detail": "sign in at /login with a token the server was given (QUANTPLAN_API_TOKENS)"},
                        status_code=401)


def _chunks(f: Any) -> Iterator[bytes]:
    with f:
        while chunk := f.read(CHUNK):
            yield chunk
