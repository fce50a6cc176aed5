"""The artifact store: round trips, content addressing, atomic writes and sha256 verification."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pytest

from quantplan.storage import ArtifactStoreError, LocalArtifactStore, NotFoundError, open_store
from quantplan.storage.artifacts import ArtifactStore


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return open_store(tmp_path / "artifacts")
    return open_store(f"memory://quantplan-test-{uuid.uuid4().hex}")


def _make_dir(root: Path, mtime: int) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(os.urandom(0) + b"\x00\x01" * 5000)
    (root / "sub" / "plan.json").write_text('{"default": "w4:a8"}')
    for p in (root / "model.safetensors", root / "sub" / "plan.json"):
        os.utime(p, (mtime, mtime))
    return root


def test_bytes_and_file_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    data = b"quantplan" * 1000
    ref = store.put_bytes(data)
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.size == len(data)
    assert store.exists(ref.sha256) and ref.uri.endswith(ref.sha256)
    with store.open(ref.sha256) as f:
        assert f.read() == data
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    assert store.put_file(src) == ref  # content-addressed: stored once
    assert store.get_file(ref.sha256, tmp_path / "out" / "copy.bin").read_bytes() == data
    store.verify(ref.sha256)


def test_directory_round_trip_is_deterministic(store: ArtifactStore, tmp_path: Path) -> None:
    a = store.put_dir(_make_dir(tmp_path / "a", mtime=1_000))
    b = store.put_dir(_make_dir(tmp_path / "b", mtime=2_000_000))
    assert a.sha256 == b.sha256  # same content, other mtimes and paths: same archive
    out = store.extract_dir(a.sha256, tmp_path / "restored")
    assert (out / "sub" / "plan.json").read_text() == '{"default": "w4:a8"}'
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    with pytest.raises(ArtifactStoreError, match="not empty"):
        store.extract_dir(a.sha256, out)


def test_failed_writes_leave_nothing(store: ArtifactStore, tmp_path: Path) -> None:
    def chunks():  # a source that dies half-way, like a crashed materialization
        yield b"half of an artifact"
        raise OSError("disk went away")

    with pytest.raises(OSError, match="went away"):
        store.put_stream(chunks())
    src = _make_dir(tmp_path / "d", mtime=0)
    (src / "link").symlink_to(src / "sub" / "plan.json")
    with pytest.raises(ArtifactStoreError, match="symlink"):
        store.put_dir(src)
    assert not store.exists(hashlib.sha256(b"half of an artifact").hexdigest())
    if isinstance(store, LocalArtifactStore):
        assert list((store.root / "tmp").iterdir()) == [] and list((store.root / "objects").rglob("*")) == []
    else:
        assert store.fs.ls(f"{store.root}/tmp") == [] and not store.fs.exists(f"{store.root}/objects")


def test_verify_detects_corruption(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    ref = store.put_bytes(b"weights")
    path = store.path(ref.sha256)
    assert not os.access(path, os.W_OK) or os.geteuid() == 0  # published objects are read-only
    os.chmod(path, 0o644)
    path.write_bytes(b"weightz")
    with pytest.raises(ArtifactStoreError, match="corrupt"):
        store.verify(ref.sha256)
    with pytest.raises(ArtifactStoreError, match="corrupt"):
        store.get_file(ref.sha256, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_missing_and_malformed_digests(store: ArtifactStore) -> None:
    with pytest.raises(NotFoundError, match="not in the store"):
        store.open("0" * 64)
    with pytest.raises(ArtifactStoreError, match="sha256"):
        store.exists("../../etc/passwd")


def test_clean_tmp_removes_abandoned_writes(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    stale = store.root / "tmp" / "dead.part"
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    assert store.clean_tmp(older_than=60) == 1 and not stale.exists()


def test_unknown_fsspec_scheme_is_a_clear_error() -> None:
    with pytest.raises(ArtifactStoreError, match="driver|fsspec"):
        open_store("nosuchscheme://bucket/prefix")
