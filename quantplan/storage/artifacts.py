"""Content-addressed artifact store: a local directory by default, any fsspec URL as an option.

Layout under the root: `objects/<first 2 hex>/<sha256>` holds each object once; `tmp/` holds writes in
progress. A write streams into `tmp/` while hashing, then renames to its final name, so a reader sees a
whole object or none, and a crashed write leaves only a temporary file (`clean_tmp` removes old ones).

A directory is stored as ONE uncompressed tar archive, written deterministically (entries sorted, mtime 0,
owner 0, permission bits kept, no symlinks), so the same directory content always has the same sha256;
`extract_dir` unpacks it. On object stores (s3://, gs://) the final rename is the filesystem's `mv`, which
publishes the object whole; the fsspec driver for the URL (s3fs, gcsfs, ...) must be installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from quantplan.storage.errors import ArtifactStoreError, NotFoundError

CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredArtifact:
    sha256: str
    size: int
    uri: str


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.hash, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def _check_sha(sha256: str) -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ArtifactStoreError(f"{sha256!r} is not a sha256 hex digest (64 lowercase hex characters)")
    return sha256


class ArtifactStore:
    """The shared logic; subclasses say how to open, publish, discard and read objects."""

    location: str

    # --- what a backend implements
    def _open_tmp(self) -> tuple[BinaryIO, str]:
        raise NotImplementedError

    def _publish(self, tmp: str, sha256: str) -> None:
        raise NotImplementedError

    def _discard(self, tmp: str) -> None:
        raise NotImplementedError

    def _key(self, sha256: str) -> str:
        raise NotImplementedError

    def exists(self, sha256: str) -> bool:
        raise NotImplementedError

    def _open_read(self, sha256: str) -> BinaryIO:
        raise NotImplementedError

    # --- the API
    def uri(self, sha256: str) -> str:
        return self._key(_check_sha(sha256))

    def put_bytes(self, data: bytes) -> StoredArtifact:
        return self.put_stream([data])

    def put_stream(self, chunks: Iterable[bytes]) -> StoredArtifact:
        """Store the concatenated chunks; if the iterator raises, nothing is stored."""
        with self._writing() as w:
            for chunk in chunks:
                w.write(chunk)
        return self._stored(w)

    def put_file(self, path: str | os.PathLike[str]) -> StoredArtifact:
        path = Path(path)
        if not path.is_file():
            raise ArtifactStoreError(f"{path} is not a file; pass an existing file (or use put_dir for a directory)")
        with path.open("rb") as f:
            return self.put_stream(iter(lambda: f.read(CHUNK), b""))

    def put_dir(self, path: str | os.PathLike[str]) -> StoredArtifact:
        """Store a directory as one deterministic tar archive (see the module docstring)."""
        root = Path(path)
        if not root.is_dir():
            raise ArtifactStoreError(f"{root} is not a directory; pass an existing directory")
        with self._writing() as w, tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for entry in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
                _add_entry(tar, root, entry)
        return self._stored(w)

    def open(self, sha256: str) -> BinaryIO:
        """A binary reader of the object; `NotFoundError` when it is not stored."""
        if not self.exists(_check_sha(sha256)):
            raise NotFoundError(f"artifact {sha256} is not in the store at {self.location}; re-run the job "
                                "that produced it or point QUANTPLAN_ARTIFACTS at the right store")
        return self._open_read(sha256)

    def verify(self, sha256: str) -> None:
        """Re-hash the stored object; `ArtifactStoreError` when its content no longer matches its name."""
        digest = hashlib.sha256()
        with self.open(sha256) as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise ArtifactStoreError(f"artifact {sha256} at {self.uri(sha256)} is corrupt (its content hashes to "
                                f"{digest.hexdigest()}); delete it and re-run the job that produced it")

    def get_file(self, sha256: str, dest: str | os.PathLike[str]) -> Path:
        """Copy the verified object to `dest` (written under a temporary name, then renamed)."""
        self.verify(sha256)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            with self.open(sha256) as src, tmp.open("wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def extract_dir(self, sha256: str, dest: str | os.PathLike[str]) -> Path:
        """Unpack a verified directory archive into `dest` (created; must be empty or absent)."""
        self.verify(sha256)
        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()):
            raise ArtifactStoreError(f"{dest} is not empty; extract into a new directory")
        dest.mkdir(parents=True, exist_ok=True)
        with self.open(sha256) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            tar.extractall(dest, filter="data")
        return dest

    @contextmanager
    def _writing(self) -> Iterator[_HashingWriter]:
        raw, tmp = self._open_tmp()
        writer = _HashingWriter(raw)
        try:
            yield writer
            raw.close()
            self._publish(tmp, writer.hash.hexdigest())
        except BaseException:
            raw.close()
            self._discard(tmp)
            raise

    def _stored(self, w: _HashingWriter) -> StoredArtifact:
        sha = w.hash.hexdigest()
        return StoredArtifact(sha, w.size, self.uri(sha))


def _add_entry(tar: tarfile.TarFile, root: Path, entry: Path) -> None:
    name = entry.relative_to(root).as_posix()
    if entry.is_symlink():
        raise ArtifactStoreError(f"{entry} is a symlink; artifacts hold plain files only - copy its target instead")
    info = tar.tarinfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    info.mode = entry.stat().st_mode & 0o777
    if entry.is_dir():
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        return
    info.size = entry.stat().st_size
    with entry.open("rb") as f:
        tar.addfile(info, f)


class LocalArtifactStore(ArtifactStore):
    """Objects in a local directory; published with fsync + `os.replace`, then made read-only."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.location = str(self.root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """The object's local path (read it, never write it)."""
        return self.root / "objects" / _check_sha(sha256)[:2] / sha256

    def _key(self, sha256: str) -> str:
        return self.path(sha256).as_uri()

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def _open_read(self, sha256: str) -> BinaryIO:
        return self.path(sha256).open("rb")

    def _open_tmp(self) -> tuple[BinaryIO, str]:
        tmp = self.root / "tmp" / f"{uuid.uuid4().hex}.part"
        return tmp.open("xb"), str(tmp)

    def _publish(self, tmp: str, sha256: str) -> None:
        final = self.path(sha256)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if final.exists():  # same content already stored
            os.unlink(tmp)
            return
        final.parent.mkdir(exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _discard(self, tmp: str) -> None:
        Path(tmp).unlink(missing_ok=True)

    def clean_tmp(self, older_than: float = 3600.0) -> int:
        """Remove temporary files left by crashed writes older than `older_than` seconds; how many."""
        cutoff, removed = time.time() - older_than, 0
        for f in (self.root / "tmp").glob("*.part"):
            if f.stat().st_mtime < cutoff:
                f.unlink(missing_ok=True)
                removed += 1
        return removed


class FsspecArtifactStore(ArtifactStore):
    """Objects under any fsspec URL (s3://bucket/prefix, gs://..., memory://...)."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        try:
            import fsspec
        except ImportError:
            raise ArtifactStoreError(f"artifact store {url!r} needs fsspec (and the driver for its scheme, e.g. "
                                "s3fs); `pip install fsspec s3fs`, or use a local directory") from None
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as e:
            raise ArtifactStoreError(f"cannot open artifact store {url!r}: {e}; install its fsspec driver") from e
        self.root = root.rstrip("/")
        self.location = url.rstrip("/")
        self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)

    def _path(self, sha256: str) -> str:
        return f"{self.root}/objects/{sha256[:2]}/{sha256}"

    def _key(self, sha256: str) -> str:
        return f"{self.location}/objects/{sha256[:2]}/{sha256}"

    def exists(self, sha256: str) -> bool:
        return bool(self.fs.exists(self._path(_check_sha(sha256))))

    def _open_read(self, sha256: str) -> BinaryIO:
        return self.fs.open(self._path(sha256), "rb")

    def _open_tmp(self) -> tuple[BinaryIO, str]:
        tmp = f"{self.root}/tmp/{uuid.uuid4().hex}.part"
        return self.fs.open(tmp, "wb"), tmp

    def _publish(self, tmp: str, sha256: str) -> None:
        final = self._path(sha256)
        if self.fs.exists(final):
            self.fs.rm(tmp)
            return
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(tmp, final)

    def _discard(self, tmp: str) -> None:
        if self.fs.exists(tmp):
            self.fs.rm(tmp)


def open_store(location: str | os.PathLike[str]) -> ArtifactStore:
    """The store at a local path (or file:// URL), or at any other URL through fsspec."""
    text = os.fspath(location)
    if "://" not in text:
        return LocalArtifactStore(text)
    if text.startswith("file://"):
        return LocalArtifactStore(text[len("file://") :])
    return FsspecArtifactStore(text)
