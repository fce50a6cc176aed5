"""The HTTP API: authentication, input errors (401/404/413/422), 503 on a database outage, a bounded schemathesis
run, 50 concurrent submissions over loopback on SQLite and PostgreSQL, and the end-to-end path through a real
`quantplan serve` (API + runner + local Ray): submit, poll, leaderboard, download, verify, apply."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import schemathesis
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from quantplan.service.api import create_app
from quantplan.service.client import Client, ClientError
from quantplan.storage import Repository, load_settings
from tests.service.test_cli import run_cli, wait_for

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = {"model": "org/some-model", "data": "wikitext2", "budget_bits": 4.25}


def _settings(url: str, tmp: Path, **extra: object):
    return load_settings(database_url=url, artifacts=str(tmp / "artifacts"), api_tokens=f"tester={TOKEN}",
                         allow_hub=True, **extra)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(f"sqlite:///{tmp_path / 'api.db'}", tmp_path))) as c:
        yield c


def test_writes_need_a_valid_token_reads_optionally(client: TestClient, tmp_path: Path) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token-xyz"}, {"Authorization": f"Basic {TOKEN}"}):
        r = client.post("/v1/jobs", json=SPEC, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in r.json()["detail"]
        assert client.post("/v1/jobs", json={"bad": 1}, headers=headers).status_code == 401  # auth before body
    r = client.post("/v1/jobs", json=SPEC, headers=AUTH)
    assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["submitter"] == "tester"
    job_id = r.json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 401
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # reads are open by default
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).json()["status"] == "cancelled"

    locked = _settings(f"sqlite:///{tmp_path / 'api.db'}", tmp_path, auth_reads=True)
    with TestClient(create_app(locked)) as c:
        assert c.get(f"/v1/jobs/{job_id}").status_code == 401
        assert c.get(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 200
        assert c.get("/healthz").status_code == 200  # health stays open for probes


def test_bad_ids_bodies_and_sizes(client: TestClient) -> None:
    for path in ("/v1/jobs/abc", "/v1/jobs/0", "/v1/jobs/-3", "/v1/plans/1.5", "/v1/jobs/99999999999999"):
        assert client.get(path).status_code == 422, path
    for path in ("/v1/jobs/424242", "/v1/plans/424242", "/v1/plans/424242/artifact", "/v1/jobs/424242/plans",
                 "/v1/plans/..%2F..%2Fetc%2Fpasswd", "/v1/plans/../../etc/passwd", "/v1/nothing"):
        r = client.get(path)
        assert r.status_code in (404, 422), path
        assert "detail" in r.json()
    assert "does not exist" in client.get("/v1/jobs/424242").json()["detail"]
    r = client.get("/v1/leaderboard", params={"model": "never-stored"})
    assert r.status_code == 404 and "no model 'never-stored' is stored" in r.json()["detail"]

    r = client.post("/v1/jobs", json={**SPEC, "budget_bits": "lots", "colour": "red"}, headers=AUTH)
    assert r.status_code == 422
    assert "budget_bits: Input should be a valid number" in r.json()["detail"] and "colour" in r.json()["detail"]
    r = client.post("/v1/jobs", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("invalid request")
    r = client.post("/v1/jobs", json={k: v for k, v in SPEC.items() if k != "budget_bits"}, headers=AUTH)
    assert r.status_code == 422 and "exactly one budget" in r.json()["detail"]

    big = {**SPEC, "data": "text:" + "x" * 2_000_000}
    r = client.post("/v1/jobs", json=big, headers=AUTH)  # declared Content-Length over the limit
    assert r.status_code == 413 and "request body over" in r.json()["detail"]
    chunks = (b"x" * 65536 for _ in range(40))  # no Content-Length: counted while reading
    r = client.post("/v1/jobs", content=chunks, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert client.get("/v1/jobs").json() == []  # nothing was stored by any of these


def test_database_outage_is_503(tmp_path: Path) -> None:
    url = "postgresql://nobody@127.0.0.1:9/none"  # nothing listens on port 9
    down = Repository(settings=_settings(url, tmp_path), migrate=False)
    with TestClient(create_app(down.settings, repo=down), raise_server_exceptions=False) as c:
        for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/jobs/1"), ("POST", "/v1/jobs"),
                             ("GET", "/v1/leaderboard?model=m")):
            r = c.request(method, path, json=SPEC if method == "POST" else None,
                          headers={**AUTH} if method == "POST" else {})
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert "127.0.0.1" not in r.text and "nobody" not in r.text  # no URL or database text
        r = c.get("/v1/jobs")
        assert r.status_code == 503 and r.headers["retry-after"] == "5" and "unavailable" in r.json()["detail"]
        health = c.get("/healthz", headers=AUTH)
        assert health.status_code == 503 and health.json()["database"] == "unreachable"
        assert c.get("/healthz").json() == {"status": "unavailable"}  # anonymous: up or down, no hosts


def test_schemathesis_all_checks_pass(tmp_path: Path) -> None:
    app = create_app(_settings(f"sqlite:///{tmp_path / 'fuzz.db'}", tmp_path))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    calls: dict[int, int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/jobs", "GET /v1/jobs/{job_id}", "POST /v1/jobs/{job_id}/cancel", "GET /v1/leaderboard",
        "GET /v1/plans/{plan_id}", "GET /v1/plans/{plan_id}/plan.json", "GET /v1/plans/{plan_id}/artifact",
        "GET /healthz"}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                      derandomize=True)
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case) -> None:
                # every check (status codes and bodies as documented, schema-invalid input refused, no 5xx), but
                # the acceptance of schema-valid specs: whether a path is inside the roots, a regex compiles or a
                # budget is feasible is not something JSON Schema can say
                response = case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])
                calls[response.status_code] = calls.get(response.status_code, 0) + 1

            try:
                check()
            except Unsatisfiable:  # an operation without inputs (e.g. /healthz) has no negative cases
                assert mode is GenerationMode.NEGATIVE
    assert sum(calls.values()) > 100 and {200, 404, 422} <= set(calls)


@pytest.fixture(params=["sqlite", "postgresql"])
def live_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The API under uvicorn on a free loopback port, in a thread of this process (no runner)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'live.db'}"
    else:
        url = request.getfixturevalue("pg_databases").create()
    server = uvicorn.Server(uvicorn.Config(create_app(_settings(url, tmp_path)), host="127.0.0.1", port=_free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, timeout=30)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_concurrent_submissions_are_stored_exactly_once(live_server: str) -> None:
    keys = [f"submission-{i:02d}" for i in range(50)]

    def submit(key: str) -> tuple[str, int]:
        with Client(live_server, TOKEN) as c:
            return key, c.submit({**SPEC, "seed": int(key[-2:])}, idempotency_key=key)["id"]

    with ThreadPoolExecutor(max_workers=16) as pool:  # every submission twice, as a client retrying would
        results = list(pool.map(submit, keys + keys[::-1]))
    ids: dict[str, set[int]] = {}
    for key, job_id in results:
        ids.setdefault(key, set()).add(job_id)
    assert all(len(v) == 1 for v in ids.values())  # a repeated key returns the same job
    with Client(live_server, TOKEN) as c:
        jobs = c.jobs(limit=1000)
        assert len(jobs) == 50 and len({j["id"] for j in jobs}) == 50
        assert {j["id"] for j in jobs} == {next(iter(v)) for v in ids.values()}
        with pytest.raises(ClientError, match="409.*another spec"):
            c.submit({**SPEC, "seed": 99}, idempotency_key=keys[0])
        with pytest.raises(ClientError, match="401"):
            Client(live_server).submit(SPEC)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_end_to_end_submit_poll_leaderboard_download_apply(capsys, tmp_path, stories_hf, stories_dir,
                                                           monkeypatch) -> None:
    port = _free_port()
    server = f"http://127.0.0.1:{port}"
    env = {**os.environ, "QUANTPLAN_DATABASE_URL": f"sqlite:///{tmp_path / 'server.db'}",
           "QUANTPLAN_ARTIFACTS": str(tmp_path / "artifacts"), "QUANTPLAN_CACHE_DIR": str(tmp_path / "cache"),
           "QUANTPLAN_API_TOKENS": f"e2e={TOKEN}", "COLUMNS": "200",
           "QUANTPLAN_MODEL_ROOTS": os.path.realpath(stories_hf), "QUANTPLAN_DATA_ROOTS": str(stories_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "quantplan.service.cli", "serve", "--port", str(port),
                             "--runners", "1", "--heartbeat", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert wait_for(lambda: _healthy(server) or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        monkeypatch.setenv("QUANTPLAN_SERVER", server)
        monkeypatch.setenv("QUANTPLAN_TOKEN", TOKEN)
        data = f"text:{stories_dir / 'sampled_seed1.txt'}"
        code, out, err = run_cli(capsys, "submit", "--model", str(stories_hf), "--data", data, "--budget-bits",
                                 "4.5", "--trials", "20", "--samples", "16", "--seq-len", "64", "--eval-samples",
                                 "8", "--eval-top", "1", "--wait", "--poll", "0.5", "--json")
        assert code == 0, err
        job = json.loads(out)["job"]
        assert job["status"] == "succeeded" and job["submitter"] == "e2e"

        code, out, _ = run_cli(capsys, "leaderboard", "--model", str(stories_hf), "--max-bits", "4.5", "--distinct",
                               "--json")
        board = json.loads(out)
        packed = [p for p in board["plans"] if p["artifacts"]]
        assert code == 0 and len(packed) == 1 and packed[0]["job_id"] == job["id"]
        plan = packed[0]
        assert plan["perplexity"] is not None and plan["kl"] is not None

        code, out, err = run_cli(capsys, "download", str(plan["id"]), "-o", str(tmp_path / "dl"), "--json")
        assert code == 0, err
        got = json.loads(out)
        assert got["sha256"] == plan["artifacts"][0]["sha256"] and got["bytes"] == plan["artifacts"][0]["bytes"]

        code, out, err = run_cli(capsys, "apply", str(tmp_path / "dl"), "--model", str(stories_hf), "--json")
        assert code == 0, err
        code, out, err = run_cli(capsys, "eval", "--model", str(stories_hf), "--data", data, "--artifact",
                                 str(tmp_path / "dl"), "--seq-len", "64", "--samples", "8", "--json")
        assert code == 0, err
        assert json.loads(out)["perplexity"] == pytest.approx(plan["perplexity"], rel=0.005)

        code, out, _ = run_cli(capsys, "status", str(job["id"]), "--json")
        assert code == 0 and json.loads(out)["status"] == "succeeded"
    finally:
        proc.terminate()  # uvicorn shuts down and stops its runner
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
    assert wait_for(lambda: not _children_of(proc.pid), timeout=30), "the server left its runner running"


def _children_of(pid: int) -> list[int]:
    """Runner processes started by `quantplan serve` with this pid (their command line names it)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--parent-pid" in argv and str(pid).encode() in argv:
            found.append(int(entry.name))
    return found


def _healthy(server: str) -> bool:
    try:
        return httpx.get(f"{server}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
