"""A server several teams share (issue 16): what a job may read (roots, hub), whose job is whose (roles, cancel,
idempotency keys), what anonymous readers see, and input/error hygiene (finite numbers, control characters, no
database text, the OpenAPI document's 422 and budget rules)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from fastapi.testclient import TestClient

from quantplan.errors import ModelLoadError
from quantplan.service.api import create_app
from quantplan.service.confine import ConfinementError, check_safetensors, confine
from quantplan.service.jobs import JobSpec
from quantplan.storage import load_settings

ALICE, BOB, OPS = "alice-token-0123456789", "bob-token-0123456789", "ops-token-0123456789"
TOKENS = f"alice={ALICE},bob={BOB},ops={OPS}:admin"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    """A model root and a data root with a model directory and a text file, plus files outside both."""
    made = {name: tmp_path / name for name in ("models", "data", "outside")}
    for path in made.values():
        path.mkdir()
    (made["models"] / "tiny").mkdir()
    (made["models"] / "tiny" / "model.safetensors").write_bytes(b"")
    (made["data"] / "train.txt").write_text("hello world\n")
    (made["outside"] / "secret.txt").write_text("the secret\n")
    (made["data"] / "escape").symlink_to(made["outside"])  # a symlink inside the root pointing out of it
    return made


def _settings(tmp_path: Path, roots: dict[str, Path], **extra: object):
    return load_settings(database_url=f"sqlite:///{tmp_path / 'shared.db'}", artifacts=str(tmp_path / "artifacts"),
                         api_tokens=TOKENS, model_roots=str(roots["models"]), data_roots=str(roots["data"]),
                         **extra)


@pytest.fixture
def client(tmp_path: Path, roots: dict[str, Path]) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tmp_path, roots))) as c:
        yield c


def _spec(roots: dict[str, Path], **changes: object) -> dict[str, object]:
    return {"model": str(roots["models"] / "tiny"), "data": f"text:{roots['data'] / 'train.txt'}",
            "budget_bits": 4.25, **changes}


# ---------------------------------------------------------------------------------------------- confinement


def test_paths_inside_the_roots_are_accepted_resolved(client: TestClient, roots: dict[str, Path]) -> None:
    dotted = f"text:{roots['data']}/../data/./train.txt"
    r = client.post("/v1/jobs", json=_spec(roots, data=dotted), headers=auth(ALICE))
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["data"] == f"text:{os.path.realpath(roots['data'] / 'train.txt')}"
    assert r.json()["spec"]["model"] == os.path.realpath(roots["models"] / "tiny")


@pytest.mark.parametrize("field", ["data", "eval_data", "select_data"])
def test_data_outside_the_roots_is_refused_alike_whether_or_not_it_exists(
        client: TestClient, roots: dict[str, Path], field: str) -> None:
    outside, data = roots["outside"], roots["data"]
    cases = {
        "absolute": (f"text:{outside / 'secret.txt'}", f"text:{outside / 'missing.txt'}"),
        "dotdot": (f"text:{data}/../outside/secret.txt", f"text:{data}/../outside/missing.txt"),
        "symlink": (f"text:{data}/escape/secret.txt", f"text:{data}/escape/missing.txt"),
        "wikitext-dir": (f"wikitext2:{outside}", f"wikitext2:{outside}-missing"),
        "etc": ("text:/etc/passwd", "text:/etc/no-such-file-here"),
        "relative": ("text:../../../../etc/hostname", "text:../../../../etc/no-such-file"),
    }
    for name, (exists, missing) in cases.items():
        answers = []
        for value in (exists, missing):
            r = client.post("/v1/jobs", json=_spec(roots, **{field: value}), headers=auth(ALICE))
            assert r.status_code == 422, (name, r.text)
            answers.append(r.json()["detail"].replace(value, "<path>").replace(value.partition(":")[2], "<path>"))
        assert answers[0] == answers[1], name  # the answer does not tell whether the file exists
        assert "secret" not in answers[0] and "token" not in answers[0]
    assert client.get("/v1/jobs").json() == []


def test_wikitext_dir_etc_and_model_outside_are_refused(client: TestClient, roots: dict[str, Path]) -> None:
    for changes in ({"data": "wikitext2:/etc"}, {"model": str(roots["outside"])}, {"model": "/etc"},
                    {"model": f"{roots['models']}/../outside"}, {"model": "./models/tiny"}):
        r = client.post("/v1/jobs", json=_spec(roots, **changes), headers=auth(ALICE))
        detail = r.json()["detail"]
        assert r.status_code == 422 and ("outside the model roots" in detail or "relative" in detail
                                         or "outside the data roots" in detail), (changes, detail)


def test_the_hub_is_off_by_default_on_the_server(tmp_path: Path, roots: dict[str, Path]) -> None:
    with TestClient(create_app(_settings(tmp_path, roots))) as c:
        for changes in ({"model": "org/some-model"}, {"data": "wikitext2"}, {"eval_data": "wikitext2"}):
            r = c.post("/v1/jobs", json=_spec(roots, **changes), headers=auth(ALICE))
            assert r.status_code == 422 and "QUANTPLAN_ALLOW_HUB" in r.json()["detail"], changes
    with TestClient(create_app(_settings(tmp_path, roots, allow_hub=True))) as c:
        r = c.post("/v1/jobs", json=_spec(roots, model="org/some-model", data="wikitext2"), headers=auth(ALICE))
        assert r.status_code == 202, r.text


def test_no_roots_configured_means_no_local_paths(tmp_path: Path, roots: dict[str, Path]) -> None:
    settings = load_settings(database_url="sqlite://", api_tokens=TOKENS)
    with pytest.raises(ConfinementError, match="QUANTPLAN_MODEL_ROOTS is not set"):
        confine(JobSpec.parse(_spec(roots)), settings)


def test_several_roots_are_path_separated(tmp_path: Path, roots: dict[str, Path]) -> None:
    settings = load_settings(database_url="sqlite://", model_roots=f"{roots['outside']}{os.pathsep}{roots['models']}",
                             data_roots=str(roots["data"]))
    assert confine(JobSpec.parse(_spec(roots)), settings).model == os.path.realpath(roots["models"] / "tiny")


def test_the_server_loads_safetensors_only(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelLoadError, match="pickle checkpoints only.*pytorch_model.bin.*safetensors"):
        check_safetensors(str(pickled))
    (pickled / "model.safetensors").write_bytes(b"")
    check_safetensors(str(pickled))  # safetensors beside the pickle: transformers loads those


# ---------------------------------------------------------------------------------------------- ownership


def test_only_the_owner_or_an_admin_cancels(client: TestClient, roots: dict[str, Path]) -> None:
    jobs = [client.post("/v1/jobs", json=_spec(roots, seed=i), headers=auth(ALICE)).json()["id"] for i in range(2)]
    r = client.post(f"/v1/jobs/{jobs[0]}/cancel", headers=auth(BOB))
    assert r.status_code == 403 and "belongs to another user" in r.json()["detail"]
    assert client.get(f"/v1/jobs/{jobs[0]}").json()["status"] == "queued"
    assert client.post(f"/v1/jobs/{jobs[0]}/cancel", headers=auth(ALICE)).json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{jobs[1]}/cancel", headers=auth(OPS)).json()["status"] == "cancelled"


def test_idempotency_keys_are_per_user(client: TestClient, roots: dict[str, Path]) -> None:
    headers = {"Idempotency-Key": "nightly-1"}
    alice = client.post("/v1/jobs", json=_spec(roots), headers={**auth(ALICE), **headers}).json()
    assert client.post("/v1/jobs", json=_spec(roots), headers={**auth(ALICE), **headers}).json()["id"] == alice["id"]
    bob = client.post("/v1/jobs", json=_spec(roots), headers={**auth(BOB), **headers})
    assert bob.status_code == 202 and bob.json()["id"] != alice["id"] and bob.json()["submitter"] == "bob"
    bob_other = client.post("/v1/jobs", json=_spec(roots, seed=7), headers={**auth(BOB), **headers})
    assert bob_other.status_code == 409 and str(alice["id"]) not in bob_other.json()["detail"]


def test_anonymous_reads_hide_paths_errors_and_submitters(tmp_path: Path, client: TestClient,
                                                           roots: dict[str, Path]) -> None:
    job_id = client.post("/v1/jobs", json=_spec(roots), headers=auth(ALICE)).json()["id"]
    repo = client.app.state.services.repo
    claimed = repo.claim_job(job_id, "runner-host:1")
    assert claimed is not None
    repo.fail_job(job_id, "runner-host:1", f"could not read {roots['data'] / 'train.txt'}: 4 tokens")
    for view in (client.get(f"/v1/jobs/{job_id}").json(), client.get("/v1/jobs").json()[0]):
        text = str(view)
        assert str(roots["models"]) not in text and str(roots["data"]) not in text and "alice" not in text
        assert "runner-host" not in text and "4 tokens" not in text
        assert view["status"] == "failed" and view["spec"]["budget_bits"] == 4.25  # the rest is public
    seen = client.get(f"/v1/jobs/{job_id}", headers=auth(BOB)).json()  # token holders see it all
    assert seen["submitter"] == "alice" and "4 tokens" in seen["error"] and seen["spec"]["model"]
    assert client.get("/v1/jobs", headers=auth("not-a-known-token")).status_code == 401
    with TestClient(create_app(_settings(tmp_path, roots, auth_reads=True))) as locked:
        assert locked.get(f"/v1/jobs/{job_id}").status_code == 401
        assert locked.get(f"/v1/jobs/{job_id}", headers=auth(BOB)).json()["submitter"] == "alice"


# ---------------------------------------------------------------------------------------------- hygiene


def test_numbers_are_finite_and_strings_printable(client: TestClient, roots: dict[str, Path]) -> None:
    for body in ('{"model": "%s", "data": "text:%s", "budget_mb": Infinity}',
                 '{"model": "%s", "data": "text:%s", "budget_bits": NaN}',
                 '{"model": "%s", "data": "text:%s", "budget_mb": 1e300}'):
        content = body % (roots["models"] / "tiny", roots["data"] / "train.txt")
        r = client.post("/v1/jobs", content=content, headers={**auth(ALICE), "Content-Type": "application/json"})
        assert r.status_code == 422 and "budget" in r.json()["detail"], content
    r = client.post("/v1/jobs", json=_spec(roots, skip="lm_head\x00x"), headers=auth(ALICE))
    assert r.status_code == 422 and "control characters" in r.json()["detail"]
    r = client.get("/v1/leaderboard", params={"model": "\x00x"})
    assert r.status_code == 422 and "control characters" in r.json()["detail"]
    assert client.get("/v1/jobs").json() == []


def test_storage_errors_reach_the_client_as_a_request_id(client: TestClient, roots: dict[str, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from quantplan.storage import StorageError

    def broken(*_: object, **__: object) -> None:
        raise StorageError("database postgresql://admin@db.internal:5432/prod rejected the request: boom")

    monkeypatch.setattr(client.app.state.services.repo, "list_jobs", broken)
    r = client.get("/v1/jobs")
    assert r.status_code == 500 and "request id" in r.json()["detail"]
    assert "db.internal" not in r.text and "boom" not in r.text
    assert r.headers["x-request-id"] in r.json()["detail"]


def test_openapi_documents_the_422_body_and_one_budget(client: TestClient, roots: dict[str, Path]) -> None:
    doc = client.get("/openapi.json").json()
    submit = doc["paths"]["/v1/jobs"]["post"]
    ref = submit["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
    schema = {**doc["components"]["schemas"][ref.rsplit("/", 1)[-1]], "components": doc["components"]}
    r = client.post("/v1/jobs", json={"model": "m"}, headers=auth(ALICE))
    assert r.status_code == 422
    jsonschema.validate(r.json(), schema)  # the body the server sends is the body the document describes
    spec_schema = doc["components"]["schemas"]["JobSpec"]
    budgets = [branch["required"] for branch in spec_schema["oneOf"]]
    assert budgets == [["budget_bits"], ["budget_mb"]]
    validator = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/JobSpec",
                                                 "components": doc["components"]})
    base = {"model": "m", "data": "wikitext2"}
    assert validator.is_valid({**base, "budget_bits": 4}) and validator.is_valid({**base, "budget_mb": 50})
    assert not validator.is_valid(base) and not validator.is_valid({**base, "budget_bits": 4, "budget_mb": 50})
