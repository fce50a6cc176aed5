"""quantplan.workers.data: DataSpec parsing, the text protocol, eval windows and calibration sets."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch

import quantplan.workers.data as data_mod
from quantplan.errors import DataError, QuantPlanError
from quantplan.workers.data import (
    CalibrationSet,
    DataSpec,
    calibration_set,
    eval_windows,
    load_text,
    resolve_split,
    token_ids,
)
from tests.workers.test_models import make_tokenizer

STORY_FILES = ("tinystories_train0.txt", "tinystories_validation0.txt")


def read(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


@pytest.fixture(scope="module")
def wikitext_dir(shared_data: Path) -> Path:
    return shared_data / "wikitext2"


@pytest.fixture(scope="module")
def stories(stories_dir: Path) -> tuple[Path, Path]:
    return stories_dir / STORY_FILES[0], stories_dir / STORY_FILES[1]


@pytest.fixture(scope="module")
def stories_spec(stories: tuple[Path, Path]) -> DataSpec:
    return DataSpec.parse(f"text:{stories[0]},{stories[1]}")


@pytest.fixture(scope="module")
def tokenizer(stories: tuple[Path, Path]):
    return make_tokenizer([read(p) for p in stories])


@pytest.fixture(autouse=True)
def _fresh_caches():
    data_mod.clear_caches()
    yield
    data_mod.clear_caches()


# ------------------------------------------------------------------------------------------- parse


def test_parse_forms(wikitext_dir: Path, stories: tuple[Path, Path]) -> None:
    assert DataSpec.parse("wikitext2") == DataSpec("wikitext2", ())
    assert DataSpec.parse("  wikitext2 ") == DataSpec("wikitext2", ())
    assert DataSpec.parse(f"wikitext2:{wikitext_dir}") == DataSpec("wikitext2", (str(wikitext_dir),))
    a, b = (str(p) for p in stories)
    assert DataSpec.parse(f"text:{a}") == DataSpec("text", (a,))
    assert DataSpec.parse(f"text:{a}, {b}") == DataSpec("text", (a, b))


@pytest.mark.parametrize("form", ["wikitext2", "wikitext2:{wiki}", "text:{a}", "text:{a},{b}", "text:{b},{a},{b}"])
def test_round_trip(form: str, wikitext_dir: Path, stories: tuple[Path, Path]) -> None:
    spec = DataSpec.parse(form.format(wiki=wikitext_dir, a=stories[0], b=stories[1]))
    assert DataSpec.parse(str(spec)) == spec
    assert str(DataSpec.parse(str(spec))) == str(spec)
    assert hash(DataSpec.parse(str(spec))) == hash(spec)


def test_relative_paths_become_absolute(stories_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = stories_dir.resolve()  # the working directory is reported without symlinks
    monkeypatch.chdir(real)
    spec = DataSpec.parse(f"text:{STORY_FILES[0]}")
    assert spec.paths == (str(real / STORY_FILES[0]),)
    monkeypatch.chdir(real.parent.parent)
    assert DataSpec.parse(str(spec)) == spec
    wiki = DataSpec.parse(f"wikitext2:{os.curdir}{os.sep}wikitext2")
    assert wiki.paths == (str(real.parent.parent / "wikitext2"),)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("c4", "unknown data spec 'c4': use wikitext2"),
        ("", "unknown data spec"),
        ("wikitext103", "unknown data spec"),
        ("text:", "needs at least one file"),
        ("text: , ,", "needs at least one file"),
        ("text:/no/such/file.txt", "text file not found: /no/such/file.txt"),
        ("wikitext2:", "needs a directory"),
        ("wikitext2:/no/such/dir", "wikitext2 directory not found: /no/such/dir"),
    ],
)
def test_parse_errors(spec: str, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        DataSpec.parse(spec)
    assert isinstance(info.value, QuantPlanError)
    assert "\n" not in str(info.value)


def test_parse_errors_on_disk(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a directory"):
        DataSpec.parse(f"text:{tmp_path}")
    with pytest.raises(DataError, match="holds none of wiki.test.raw"):
        DataSpec.parse(f"wikitext2:{tmp_path}")
    with pytest.raises(DataError, match="must be a string"):
        DataSpec.parse(None)  # type: ignore[arg-type]


def test_direct_construction_is_checked() -> None:
    with pytest.raises(DataError, match="unknown data kind"):
        DataSpec("c4", ())  # type: ignore[arg-type]
    with pytest.raises(DataError, match="at least one file"):
        DataSpec("text", ())
    with pytest.raises(DataError, match="must not contain ','"):
        DataSpec("text", ("a,b.txt",))
    with pytest.raises(DataError, match="at most one directory"):
        DataSpec("wikitext2", ("a", "b"))


# ------------------------------------------------------------------------------------ text protocol


def _hub_style_rows(raw: str) -> list[str]:
    """The rows of the HF wikitext dataset: each line with its newline, whitespace-only lines as ""."""
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


def test_wikitext_dir_test_split(wikitext_dir: Path) -> None:
    text = load_text(f"wikitext2:{wikitext_dir}", "test")
    # Row 0 is a whitespace-only line (""), so the joined text starts with the "\n\n" separator.
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert text.lstrip("\n").startswith(" = Robert Boulter = ")
    raw = read(wikitext_dir / "wiki.test.raw")
    rows = _hub_style_rows(raw)
    assert len(rows) == 4358
    assert text == "\n\n".join(rows)


def test_wikitext_dir_validation_split(wikitext_dir: Path) -> None:
    text = load_text(DataSpec.parse(f"wikitext2:{wikitext_dir}"), "validation")
    assert text.startswith("\n\n = Homarus gammarus = \n")
    assert text == "\n\n".join(_hub_style_rows(read(wikitext_dir / "wiki.valid.raw")))


def test_wikitext_dir_train_falls_back_to_validation(
    wikitext_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not (wikitext_dir / "wiki.train.raw").exists()
    monkeypatch.setattr(data_mod, "_warned", set())
    spec = DataSpec.parse(f"wikitext2:{wikitext_dir}")
    with caplog.at_level(logging.WARNING, logger="quantplan.workers.data"):
        train = load_text(spec, "train")
    assert train == load_text(spec, "validation")
    assert "no wiki.train.raw" in caplog.text and "wiki.valid.raw" in caplog.text
    assert resolve_split(spec, "train") == "validation"
    assert resolve_split(spec, "test") == "test"


def test_wikitext_dir_with_train_and_missing_split(tmp_path: Path) -> None:
    (tmp_path / "wiki.train.raw").write_text(" \n = Train = \n \n Some train text . \n", encoding="utf-8")
    (tmp_path / "wiki.test.raw").write_text(" \n = Test = \n", encoding="utf-8")
    spec = DataSpec.parse(f"wikitext2:{tmp_path}")
    assert load_text(spec, "train") == "\n\n = Train = \n\n\n\n\n Some train text . \n"
    assert resolve_split(spec, "train") == "train"
    with pytest.raises(DataError, match="has no wiki.valid.raw"):
        load_text(spec, "validation")


def test_hub_wikitext_offline_fails_fast() -> None:
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1", "tests must run offline (tests/conftest.py)"
    start = time.monotonic()
    with pytest.raises(DataError, match="wikitext2:<dir>") as info:
        load_text("wikitext2", "test")
    assert time.monotonic() - start < 15
    assert "HF_DATASETS_OFFLINE=1" in str(info.value) and "\n" not in str(info.value)


def test_text_files_protocol(stories: tuple[Path, Path], stories_spec: DataSpec) -> None:
    story1, story2 = (read(p) for p in stories)
    for split in ("train", "validation", "test"):
        assert load_text(stories_spec, split) == story1.strip() + "\n" + story2.strip()
    reverse = DataSpec("text", tuple(reversed(stories_spec.paths)))
    assert load_text(reverse) == story2.strip() + "\n" + story1.strip()


def test_text_files_whitespace(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_bytes(b"\n  first line  \r\nsecond\t\r\n\r\n\r\n")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    b = tmp_path / "b.txt"
    b.write_bytes("caf\u00e9 \u675c\u752b".encode())
    assert load_text(f"text:{a},{empty},{b}") == "first line\nsecond\ncaf\u00e9 \u675c\u752b"


def test_text_not_utf8(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match="readable UTF-8"):
        load_text(f"text:{bad}")


def test_text_file_removed_after_parse(tmp_path: Path) -> None:
    f = tmp_path / "gone.txt"
    f.write_text("hello", encoding="utf-8")
    spec = DataSpec.parse(f"text:{f}")
    f.unlink()
    with pytest.raises(DataError, match="text file not found"):
        load_text(spec)


def test_changed_file_is_reloaded(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("first version", encoding="utf-8")
    assert load_text(f"text:{f}") == "first version"
    f.write_text("second, longer version", encoding="utf-8")
    assert load_text(f"text:{f}") == "second, longer version"


def test_bad_split(stories_spec: DataSpec) -> None:
    with pytest.raises(DataError, match="unknown split 'valid'"):
        load_text(stories_spec, "valid")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ windows


def test_eval_windows(stories_spec: DataSpec, tokenizer) -> None:
    ids = tokenizer(load_text(stories_spec))["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    seq_len = 16
    windows = eval_windows(stories_spec, tokenizer, seq_len=seq_len)
    count = len(ids) // seq_len
    assert count >= 3
    assert windows.shape == (count, seq_len) and windows.dtype == torch.int64
    assert windows.reshape(-1).tolist() == ids[: count * seq_len]
    first = eval_windows(stories_spec, tokenizer, seq_len=seq_len, max_windows=2)
    assert torch.equal(first, windows[:2])
    assert eval_windows(stories_spec, tokenizer, seq_len=seq_len, max_windows=10_000).shape == windows.shape


def test_eval_windows_short_text(stories_spec: DataSpec, tokenizer) -> None:
    ids = tokenizer(load_text(stories_spec))["input_ids"]
    windows = eval_windows(stories_spec, tokenizer, seq_len=len(ids) + 100)
    assert windows.shape == (1, len(ids))
    assert windows[0].tolist() == ids
    exact = eval_windows(stories_spec, tokenizer, seq_len=len(ids))
    assert exact.shape == (1, len(ids))


def test_eval_windows_errors(stories_spec: DataSpec, tokenizer, tmp_path: Path) -> None:
    for bad in (0, 1, -5):
        with pytest.raises(DataError, match="seq_len must be an integer >= 2"):
            eval_windows(stories_spec, tokenizer, seq_len=bad)
    with pytest.raises(DataError, match="max_windows"):
        eval_windows(stories_spec, tokenizer, seq_len=8, max_windows=0)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"has 1 token\(s\); evaluation needs at least 2"):
        eval_windows(f"text:{empty}", tokenizer, seq_len=8)


def test_wikitext_eval_windows(wikitext_dir: Path) -> None:
    tok = make_tokenizer(["Robert Boulter is an English film , television and theatre actor ."], vocab_size=300)
    spec = f"wikitext2:{wikitext_dir}"
    windows = eval_windows(spec, tok, seq_len=128, max_windows=4)
    assert windows.shape == (4, 128)
    assert windows[0, 0].item() == tok.bos_token_id
    assert tok.decode(windows[0, 1:].tolist()).startswith("\n\n = Robert Boulter = \n")


def test_calibration_set(stories_spec: DataSpec, tokenizer) -> None:
    ids = token_ids(stories_spec, tokenizer, "train")
    cal = calibration_set(stories_spec, tokenizer, samples=6, seq_len=12, seed=1)
    assert isinstance(cal, CalibrationSet)
    assert cal.tokens.shape == (6, 12) and cal.tokens.dtype == torch.int64
    assert (cal.data, cal.split, cal.samples, cal.seq_len, cal.seed) == (str(stories_spec), "train", 6, 12, 1)
    # Each sample is a contiguous window of the tokenized text.
    text_ids = ids.tolist()
    for row in cal.tokens.tolist():
        assert any(text_ids[s : s + 12] == row for s in range(len(text_ids) - 11))
    again = calibration_set(str(stories_spec), tokenizer, samples=6, seq_len=12, seed=1)
    assert torch.equal(again.tokens, cal.tokens)
    other = calibration_set(stories_spec, tokenizer, samples=6, seq_len=12, seed=2)
    assert not torch.equal(other.tokens, cal.tokens)
    # The full text is a valid single sample; asking for more tokens than the text holds is an error.
    whole = calibration_set(stories_spec, tokenizer, samples=1, seq_len=ids.numel())
    assert torch.equal(whole.tokens, ids[None])
    with pytest.raises(DataError, match="use at most 1 samples"):
        calibration_set(stories_spec, tokenizer, samples=2, seq_len=ids.numel())


def test_calibration_spec_dict(wikitext_dir: Path, stories_spec: DataSpec, tokenizer) -> None:
    cal = calibration_set(stories_spec, tokenizer, samples=3, seq_len=8, seed=0, split="validation")
    d = cal.spec_dict()
    assert d == {"data": str(stories_spec), "split": "validation", "samples": 3, "seq_len": 8, "seed": 0}
    assert json.loads(json.dumps(d)) == d
    wiki = calibration_set(f"wikitext2:{wikitext_dir}", tokenizer, samples=2, seq_len=32)
    assert wiki.spec_dict()["split"] == "validation"  # train fell back to wiki.valid.raw
    assert wiki.spec_dict()["data"] == f"wikitext2:{wikitext_dir}"


def test_calibration_too_short(stories_spec: DataSpec, tokenizer) -> None:
    n = token_ids(stories_spec, tokenizer).numel()
    with pytest.raises(DataError, match=rf"has only {n} tokens, fewer than seq_len={n + 1}"):
        calibration_set(stories_spec, tokenizer, samples=4, seq_len=n + 1)
    with pytest.raises(DataError, match="samples must be an integer >= 1"):
        calibration_set(stories_spec, tokenizer, samples=0, seq_len=8)
    with pytest.raises(DataError, match="seed must be an integer"):
        calibration_set(stories_spec, tokenizer, samples=1, seq_len=8, seed=1.5)  # type: ignore[arg-type]


def test_calibration_set_checks_shape() -> None:
    with pytest.raises(ValueError, match="int64 of shape"):
        CalibrationSet("text:x", "train", 2, 4, 0, torch.zeros(2, 3, dtype=torch.int64))


class CountingTokenizer:
    """Wraps a tokenizer and counts encode calls (name_or_path and len as the cache key needs)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name_or_path = "counting-tokenizer"
        self.calls = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __call__(self, text: str, **kwargs):
        self.calls += 1
        return self.inner(text, **kwargs)


def test_tokenization_is_cached(stories_spec: DataSpec, tokenizer) -> None:
    counting = CountingTokenizer(tokenizer)
    windows = eval_windows(stories_spec, counting, seq_len=8)
    cal = calibration_set(stories_spec, counting, samples=2, seq_len=8)
    eval_windows(str(stories_spec), counting, seq_len=16, split="validation")
    assert counting.calls == 1
    # Callers get copies: changing them does not change the cache.
    windows.fill_(0)
    cal.tokens.fill_(0)
    ids = token_ids(stories_spec, counting)
    ids.fill_(0)
    assert eval_windows(stories_spec, counting, seq_len=8)[0, 0].item() == tokenizer.bos_token_id
    assert counting.calls == 1
    data_mod.clear_caches()
    eval_windows(stories_spec, counting, seq_len=8)
    assert counting.calls == 2
