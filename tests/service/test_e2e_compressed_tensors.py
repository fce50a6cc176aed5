"""End to end in local mode: a job searched for `--target compressed-tensors`, its plan exported with
`--format compressed-tensors`, loaded by transformers alone and measured: the stored perplexity (weight-only plan,
`--act-bits 16`: transformers' loader would simulate int8 activations its own way) within 0.5%. Symmetric
weights: compressed-tensors 0.20's `from_pretrained` path cannot load asymmetric pack-quantized groups
(docs/ARTIFACTS.md); the ModelCompressor tests cover those."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.service.test_cli import run_cli
from tests.service.test_runner import SMALL, env, job_env  # noqa: F401 - fixtures

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.slow


def test_run_target_export_and_load_with_transformers(capsys, env, ray_local, tmp_path: Path) -> None:  # noqa: F811
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"symmetry": "sym"}))
    code, out, err = run_cli(capsys, "run", "--model", env["model"], "--data", env["data"], "--budget-bits", "4.5",
                             "--trials", "10", "--act-bits", "16", "--target", "compressed-tensors", *SMALL,
                             "--spec", str(spec), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["job"]["spec"]["target"] == "compressed-tensors"
    [best] = [p for p in result["plans"] if p["artifacts"]]
    assert best["formats"] == ["quantplan", "compressed-tensors"]  # what the leaderboard says it exports to
    out_dir = tmp_path / "ct"
    code, out, err = run_cli(capsys, "export", str(best["id"]), "--format", "compressed-tensors", "-o", str(out_dir),
                             "--json")
    assert code == 0, err
    config = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert all(g["input_activations"] is None for g in config["config_groups"].values())  # weight-only
    code, out, err = run_cli(capsys, "eval", "--model", str(out_dir), "--data", env["data"], "--seq-len", "64",
                             "--samples", "8", "--json")  # transformers' from_pretrained, nothing of QuantPlan's
    assert code == 0, err
    measured = json.loads(out)["perplexity"]
    assert measured == pytest.approx(best["perplexity"], rel=0.005)
    print(f"\nstored {best['perplexity']:.5f}, transformers on the compressed-tensors export {measured:.5f}")
    _the_api_builds_the_same_checkpoint_once(env["db"], env["artifacts"], env, best, out_dir)


def _the_api_builds_the_same_checkpoint_once(db: str, artifacts: str, job: dict[str, str], plan: dict, local: Path,
                                             ) -> None:
    """`GET /v1/plans/{id}/artifact?format=compressed-tensors`: built from the stored artifact on the first request
    (on a confined server: the model inside the roots), archived and recorded, streamed as is the second time."""
    import io
    import tarfile

    from fastapi.testclient import TestClient

    from quantplan.service.api import create_app
    from quantplan.service.client import Client
    from quantplan.settings import load_settings

    settings = load_settings(database_url=db, artifacts=artifacts, model_roots=job["model"],
                             data_roots=str(Path(job["data"].removeprefix("text:")).parent))
    with TestClient(create_app(settings)) as api:
        url = f"/v1/plans/{plan['id']}/artifact"
        first, again = (api.get(url, params={"format": "compressed-tensors"}) for _ in range(2))
        assert first.status_code == again.status_code == 200, first.text
        assert first.headers["X-Content-SHA256"] == again.headers["X-Content-SHA256"] != plan["artifacts"][0]["sha256"]
        kinds = {a["kind"] for a in api.get(f"/v1/plans/{plan['id']}").json()["artifacts"]}
        assert kinds == {"packed", "compressed-tensors"}
        assert api.get(url, params={"format": "onnx"}).status_code == 422
        client = Client("http://testserver")
        client.http = api  # `quantplan download --format compressed-tensors` through this app
        got = client.download(plan["id"], local.parent / "downloaded", format="compressed-tensors")
        assert got["sha256"] == first.headers["X-Content-SHA256"]
        downloaded = (local.parent / "downloaded" / "model.safetensors").read_bytes()
        assert downloaded == (local / "model.safetensors").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(first.content)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("model.safetensors"))
        served = tar.extractfile(member).read()
    assert served == (local / "model.safetensors").read_bytes(), "the checkpoint `export --format` wrote"
