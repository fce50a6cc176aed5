"""Data specs (the ``--data`` option): their syntax, checked anywhere, and their paths, checked where data is read.

torch-free, so the job spec (`service.jobs`) and the HTTP API can refuse a malformed spec at submission without
loading the ML stack; `workers.data` reads the text a spec names. `parse_syntax` checks the string alone (the
paths are those of the machine that will run the job); `DataSpec.parse` also makes the paths absolute and checks
that they exist here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, get_args

from quantplan.errors import DataError

__all__ = ["ACCEPTED_FORMS", "KINDS", "WIKITEXT_FILES", "DataSpec", "Kind", "parse_syntax"]

Kind = Literal["wikitext2", "text"]
KINDS: tuple[str, ...] = get_args(Kind)

ACCEPTED_FORMS = "wikitext2 (hub), wikitext2:<dir> (with wiki.{test,valid,train}.raw) or text:<file>[,<file>...]"
WIKITEXT_FILES = {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "train": "wiki.train.raw"}


def parse_syntax(spec: str) -> tuple[Kind, tuple[str, ...]]:
    """(kind, paths as written) of ``wikitext2``, ``wikitext2:<dir>`` or ``text:<file>[,<file>...]``; a
    `DataError` for anything else. The file system is not consulted."""
    if not isinstance(spec, str):
        raise DataError(f"data spec must be a string, got {type(spec).__name__}: use {ACCEPTED_FORMS}")
    kind, sep, rest = spec.strip().partition(":")
    kind, rest = kind.strip().lower(), rest.strip()
    if kind == "wikitext2":
        if sep and not rest:
            raise DataError(f"wikitext2: needs a directory after ':': use {ACCEPTED_FORMS}")
        return "wikitext2", (rest,) if sep else ()
    if kind == "text":
        files = tuple(f for f in (f.strip() for f in rest.split(",")) if f) if rest else ()
        if not files:
            raise DataError(f"text: needs at least one file: use {ACCEPTED_FORMS}")
        return "text", files
    raise DataError(f"unknown data spec {spec!r}: use {ACCEPTED_FORMS}")


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: ``kind`` plus local ``paths`` (``()`` for the hub). ``str()`` round-trips."""

    kind: Kind
    paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"unknown data kind {self.kind!r}: use {ACCEPTED_FORMS}")
        if not isinstance(self.paths, tuple) or not all(isinstance(p, str) and p for p in self.paths):
            raise DataError(f"data spec paths must be a tuple of non-empty strings, got {self.paths!r}")
        if self.kind == "wikitext2" and len(self.paths) > 1:
            raise DataError(f"wikitext2 takes at most one directory, got {len(self.paths)}: use {ACCEPTED_FORMS}")
        if self.kind == "text":
            if not self.paths:
                raise DataError(f"text: needs at least one file: use {ACCEPTED_FORMS}")
            if any("," in p for p in self.paths):
                raise DataError("text: file names must not contain ',' (it separates files); rename the file")

    @classmethod
    def parse(cls, spec: str) -> DataSpec:
        """Parse ``wikitext2``, ``wikitext2:<dir>`` or ``text:<file>[,<file>...]``; check the paths exist."""
        kind, written = parse_syntax(spec)
        if kind == "wikitext2":
            return cls("wikitext2", tuple(_wikitext_dir(d) for d in written))
        return cls("text", tuple(_text_file(f) for f in written))

    def __str__(self) -> str:
        if self.kind == "wikitext2":
            return f"wikitext2:{self.paths[0]}" if self.paths else "wikitext2"
        return "text:" + ",".join(self.paths)


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _wikitext_dir(written: str) -> str:
    path = _absolute(written)
    if not os.path.isdir(path):
        raise DataError(
            f"wikitext2 directory not found: {written}; use wikitext2:<dir> with a directory holding "
            "wiki.test.raw and wiki.valid.raw (and optionally wiki.train.raw)"
        )
    if not any(os.path.isfile(os.path.join(path, f)) for f in WIKITEXT_FILES.values()):
        raise DataError(
            f"wikitext2 directory {written} holds none of wiki.test.raw, wiki.valid.raw, wiki.train.raw; "
            "point it at the raw wikitext-2-raw-v1 files"
        )
    return path


def _text_file(written: str) -> str:
    path = _absolute(written)
    if os.path.isdir(path):
        raise DataError(f"text file is a directory: {written}; list text files, e.g. text:a.txt,b.txt")
    if not os.path.isfile(path):
        raise DataError(f"text file not found: {written}; use text:<file>[,<file>...] with existing files")
    return path
