"""Evaluation and calibration data: data specs, the text protocol, token windows.

Data specs (the ``--data`` option), parsed by `DataSpec.parse`:

* ``wikitext2``: WikiText-2 raw v1 from the Hugging Face hub,
  ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1")`` (offline: needs a warm cache).
* ``wikitext2:<dir>``: the original raw files ``<dir>/wiki.{train,valid,test}.raw``.
* ``text:<file>[,<file>...]``: local UTF-8 text files (file names must not contain ``,``).

Splits (``train``, ``validation``, ``test``):

* ``wikitext2``: the hub dataset's own splits.
* ``wikitext2:<dir>``: test = ``wiki.test.raw``, validation = ``wiki.valid.raw``, train =
  ``wiki.train.raw``, or ``wiki.valid.raw`` with a logged warning when ``wiki.train.raw`` is absent
  (`resolve_split` says which split is really used).
* ``text:...``: the same files for every split.

Text protocol (`load_text`):

* WikiText-2 (the GPTQ protocol): the dataset's rows joined with ``"\\n\\n"``. A hub row is one line
  of the raw file with its ``"\\n"``, or ``""`` for a whitespace-only line. Local raw files are read
  with ``load_dataset("text", data_files=..., keep_linebreaks=True)`` and whitespace-only rows are
  mapped to ``""``, so the rows, and the joined text, match the hub's. The test split therefore
  begins ``"\\n\\n = Robert Boulter = \\n\\n\\n\\n\\n Robert Boulter is ..."``.
* Text files: read with ``load_dataset("text", ...)``. Each file's lines (without their
  line breaks) are stripped of trailing whitespace and joined with ``"\\n"``, and the result is
  stripped. Files are then joined with ``"\\n"`` in the order given, skipping empty files. So two
  files give exactly ``a.strip() + "\\n" + b.strip()`` when no line has trailing whitespace.

Tokenization: the whole joined text is tokenized once, with the tokenizer's default special tokens
(a BOS token at the start for Llama tokenizers). The ids are kept in a small in-process LRU cache
keyed by the data source (including each local file's size and mtime) and the tokenizer's
``name_or_path``, so calibration and evaluation on the same text share one tokenization.

* `eval_windows`: non-overlapping windows of ``seq_len`` tokens, with the remainder dropped. If the
  text is shorter than one window, it returns one shorter window with all the tokens.
* `calibration_set`: ``samples`` windows of ``seq_len`` tokens at random offsets, drawn with a
  ``torch.Generator`` seeded by ``seed``, so the result is deterministic.

Local files are read through the ``datasets`` library with a per-process temporary cache
(``QUANTPLAN_DATASETS_CACHE`` names a persistent one). Hub data uses the normal Hugging Face
cache. ``datasets`` progress bars are turned off.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from quantplan.errors import DataError
from quantplan.workers.dataspec import ACCEPTED_FORMS, WIKITEXT_FILES, DataSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ACCEPTED_FORMS",
    "CalibrationSet",
    "DataSpec",
    "Split",
    "calibration_set",
    "clear_caches",
    "eval_windows",
    "load_text",
    "resolve_split",
    "token_ids",
]

logger = logging.getLogger(__name__)

Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = get_args(Split)

HUB_DATASET = ("wikitext", "wikitext-2-raw-v1")

_TEXT_CACHE_SIZE = 4
_TOKEN_CACHE_SIZE = 8


# --------------------------------------------------------------------------------------------- specs


def _as_spec(spec: DataSpec | str) -> DataSpec:
    if isinstance(spec, DataSpec):
        return spec
    return DataSpec.parse(spec)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


# ------------------------------------------------------------------------------------------ sources

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _resolve(spec: DataSpec, split: str) -> tuple[str, tuple[str, ...]]:
    """(effective split, local files) for `split` of `spec`; files are () for the hub."""
    _check_split(split)
    if spec.kind == "text":
        for p in spec.paths:
            if not os.path.isfile(p):
                raise DataError(f"text file not found: {p}; use text:<file>[,<file>...] with existing files")
        return split, spec.paths
    if not spec.paths:
        return split, ()
    directory = spec.paths[0]
    effective = split
    path = os.path.join(directory, WIKITEXT_FILES[split])
    if split == "train" and not os.path.isfile(path):
        fallback = os.path.join(directory, WIKITEXT_FILES["validation"])
        if os.path.isfile(fallback):
            with _warned_lock:
                if directory not in _warned:
                    _warned.add(directory)
                    logger.warning(
                        "%s has no wiki.train.raw: using wiki.valid.raw (the validation split) for train",
                        directory,
                    )
            effective, path = "validation", fallback
    if not os.path.isfile(path):
        raise DataError(
            f"wikitext2 directory {directory} has no {os.path.basename(path)}; add the raw wikitext-2-raw-v1 "
            f"file or choose another split"
        )
    return effective, (path,)


def resolve_split(spec: DataSpec | str, split: Split) -> str:
    """The split actually read for `split`: differs only for ``wikitext2:<dir>`` train without wiki.train.raw."""
    return _resolve(_as_spec(spec), split)[0]


def _file_state(files: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    """Paths with size and mtime, so cached text is dropped when a file changes."""
    state = []
    for f in files:
        st = os.stat(f)
        state.append((f, st.st_size, st.st_mtime_ns))
    return tuple(state)


def _source_key(spec: DataSpec, split: str) -> tuple[Any, ...]:
    """A hashable identity of the text `load_text(spec, split)` returns."""
    effective, files = _resolve(spec, split)
    if spec.kind == "text":  # the same files for every split: share one entry
        return ("text", _file_state(files))
    if files:
        return ("wikitext2-raw", _file_state(files))
    return ("wikitext2-hub", effective)


# ---------------------------------------------------------------------------------- datasets access

_cache_dir: str | None = None
_cache_lock = threading.Lock()


def _local_cache_dir() -> str:
    """The datasets cache for local files: QUANTPLAN_DATASETS_CACHE, or a per-process temporary one."""
    global _cache_dir
    configured = os.environ.get("QUANTPLAN_DATASETS_CACHE")
    if configured:
        return configured
    with _cache_lock:
        if _cache_dir is None:
            _cache_dir = tempfile.mkdtemp(prefix="quantplan-datasets-")
            atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
        return _cache_dir


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError, ImportError]
    try:
        from huggingface_hub import errors as hub_errors

        errors.append(hub_errors.HfHubHTTPError)
    except ImportError:  # pragma: no cover
        pass
    for module, attr in (("requests", "RequestException"), ("httpx", "HTTPError"), ("httpx2", "HTTPError")):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(__import__(module), attr))
    return tuple(errors)


def _cause(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    first = lines[0].strip()[:200] if lines else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _local_rows(files: tuple[str, ...], **config: Any) -> list[str]:
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(
            "text", data_files={"data": list(files)}, split="data", cache_dir=_local_cache_dir(), **config
        )
    except Exception as e:  # datasets wraps decoding and I/O errors in its own types
        raise DataError(
            f"could not read {', '.join(files)} ({_cause(e)}); data files must be readable UTF-8 text"
        ) from e
    return list(ds["text"])


def _hub_rows(split: str) -> list[str]:
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(*HUB_DATASET, split=split)
    except _hub_errors() as e:
        raise DataError(
            f"could not load WikiText-2 from the Hugging Face hub ({_cause(e)}); use wikitext2:<dir> with local "
            "wiki.*.raw files, or set HF_DATASETS_OFFLINE=1 with a warm cache"
        ) from e
    return list(ds["text"])


def _join_wikitext(rows: list[str]) -> str:
    return "\n\n".join(rows)


def _join_text_documents(documents: list[str]) -> str:
    parts = []
    for doc in documents:
        text = "\n".join(line.rstrip() for line in doc.split("\n")).strip()
        if text:
            parts.append(text)
    return "\n".join(parts)


@functools.lru_cache(maxsize=_TEXT_CACHE_SIZE)
def _text_cached(spec: DataSpec, key: tuple[Any, ...]) -> str:
    """The joined text of the source `key` (from `_source_key`) of `spec`."""
    if spec.kind == "text":
        # One row per file keeps file boundaries; lines are then split and joined as documented.
        files = tuple(f for f, _, _ in key[1])
        return _join_text_documents(_local_rows(files, sample_by="document"))
    if spec.paths:
        files = tuple(f for f, _, _ in key[1])
        rows = _local_rows(files, keep_linebreaks=True)
        return _join_wikitext([row if row.strip() else "" for row in rows])
    return _join_wikitext(_hub_rows(key[1]))


def load_text(spec: DataSpec | str, split: Split = "test") -> str:
    """The joined text of `split` of `spec`, following the text protocol in the module docstring."""
    spec = _as_spec(spec)
    return _text_cached(spec, _source_key(spec, split))


# ------------------------------------------------------------------------------------- tokenization


class _TokenizerRef:
    """Hashes a tokenizer by class, name_or_path and vocabulary size (identity if it has no name)."""

    __slots__ = ("key", "tokenizer")

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        name = getattr(tokenizer, "name_or_path", "") or ""
        ident = str(name) if name else f"id:{id(tokenizer)}"
        self.key = (type(tokenizer).__qualname__, ident, len(tokenizer))

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TokenizerRef) and self.key == other.key


@functools.lru_cache(maxsize=_TOKEN_CACHE_SIZE)
def _token_ids_cached(spec: DataSpec, key: tuple[Any, ...], tok: _TokenizerRef) -> torch.Tensor:
    text = _text_cached(spec, key)
    encoded = tok.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    ids = torch.as_tensor(encoded, dtype=torch.int64)
    return ids.reshape(-1)


def token_ids(spec: DataSpec | str, tokenizer: PreTrainedTokenizerBase, split: Split = "test") -> torch.Tensor:
    """All token ids of `load_text(spec, split)` as a 1-D int64 tensor (a copy; the cache keeps its own)."""
    return _token_ids(_as_spec(spec), tokenizer, split).clone()


def _token_ids(spec: DataSpec, tokenizer: PreTrainedTokenizerBase, split: str) -> torch.Tensor:
    return _token_ids_cached(spec, _source_key(spec, split), _TokenizerRef(tokenizer))


def clear_caches() -> None:
    """Drop the cached texts and token ids."""
    _token_ids_cached.cache_clear()
    _text_cached.cache_clear()


# ---------------------------------------------------------------------------------------- windows


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def eval_windows(
    spec: DataSpec | str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    max_windows: int | None = None,
    split: Split = "test",
) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` int64 windows of the tokenized text; the remainder is dropped.

    A text shorter than `seq_len` tokens gives one ``[1, n_tokens]`` window. `max_windows` keeps the
    first windows only.
    """
    spec = _as_spec(spec)
    _positive("seq_len", seq_len, 2)
    if max_windows is not None:
        _positive("max_windows", max_windows)
    ids = _token_ids(spec, tokenizer, split)
    n = ids.numel()
    if n < 2:
        raise DataError(f"{spec} ({split}) has {n} token(s); evaluation needs at least 2: use a longer text")
    if n < seq_len:
        return ids.reshape(1, n).clone()
    count = n // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seq_len].reshape(count, seq_len).clone()


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """Calibration token windows and the spec that produced them (`spec_dict` is JSON-able).

    ``split`` is the split really read (see `resolve_split`). Equality is identity: compare
    ``spec_dict()`` and ``tokens`` explicitly.
    """

    data: str
    split: str
    samples: int
    seq_len: int
    seed: int
    tokens: torch.Tensor = field(repr=False)

    def __post_init__(self) -> None:
        shape = (self.samples, self.seq_len)
        if tuple(self.tokens.shape) != shape or self.tokens.dtype != torch.int64:
            raise ValueError(
                f"CalibrationSet tokens must be int64 of shape {shape}, got {self.tokens.dtype} "
                f"{tuple(self.tokens.shape)}"
            )

    def spec_dict(self) -> dict[str, Any]:
        """Everything but the tokens: data, split, samples, seq_len, seed."""
        return {
            "data": self.data,
            "split": self.split,
            "samples": self.samples,
            "seq_len": self.seq_len,
            "seed": self.seed,
        }


def calibration_set(
    spec: DataSpec | str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    samples: int,
    seq_len: int,
    seed: int = 0,
    split: Split = "train",
) -> CalibrationSet:
    """`samples` windows of `seq_len` tokens at random offsets (seeded by `seed`, deterministic)."""
    spec = _as_spec(spec)
    _positive("samples", samples)
    _positive("seq_len", seq_len)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    effective = resolve_split(spec, split)
    ids = _token_ids(spec, tokenizer, split)
    n = ids.numel()
    if n < seq_len:
        raise DataError(
            f"{spec} ({effective}) has only {n} tokens, fewer than seq_len={seq_len}: use a shorter "
            "sequence length or more text"
        )
    if samples * seq_len > n:
        raise DataError(
            f"{spec} ({effective}) holds {n} tokens, fewer than the {samples} samples x {seq_len} tokens asked "
            f"for: use at most {n // seq_len} samples, a shorter sequence length, or more text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len + 1, (samples,), generator=generator)
    offsets = starts[:, None] + torch.arange(seq_len)[None, :]
    tokens = ids[offsets]
    return CalibrationSet(data=str(spec), split=effective, samples=samples, seq_len=seq_len, seed=seed, tokens=tokens)
