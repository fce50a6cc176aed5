"""Conversion of GGUF checkpoints (llama.cpp's format) into float Hugging Face model directories.

`convert_gguf(gguf_file, out_dir)` loads a Llama-family GGUF file with transformers' own GGUF loader
(`from_pretrained(dir, gguf_file=name)`: every tensor dequantized by the `gguf` package, llama.cpp's q/k
row permutation undone) and writes what `transformers.AutoModelForCausalLM` and `AutoTokenizer` load:
config, float32 safetensors and the tokenizer the file describes. The weights are exactly the
dequantized GGUF tensors, so a model stored as Q4_1 stays on its 4-bit grid. Needs the optional
dependencies `quantplan[gguf]` (`gguf`, `accelerate`). Problems with the input raise `ModelLoadError`.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from quantplan.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["ARCHITECTURES", "convert_gguf", "gguf_architecture", "load_gguf"]

log = logging.getLogger(__name__)

# `general.architecture` values whose q/k rows transformers un-permutes (its LlamaTensorProcessor). llama.cpp writes
# "llama" for Llama, Mistral and SmolLM checkpoints alike.
ARCHITECTURES = ("llama",)
_MAGIC = b"GGUF"
# GGUF metadata value types: struct formats of the scalars, then the two variable-length ones.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING, _MAX_DIMS = 1 << 30, 8  # far above real files (a chat template, ggml's 4 dimensions)
_EXTRA = "pip install 'quantplan[gguf]'"


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Convert a GGUF checkpoint into a float32 Hugging Face directory (model + tokenizer); return its path.

    The directory is written next to `out_dir` under a temporary name and renamed into place, so a
    failed conversion leaves nothing at `out_dir`. An existing non-empty `out_dir` is replaced only
    when `overwrite` is true.
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    model, tokenizer = load_gguf(gguf_file)
    _drop_quantizer(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent) as tmp:
        staged = Path(tmp) / "new"  # made by save_pretrained, so with the usual (umask) permissions
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        _replace_dir(staged, out_dir, Path(tmp) / "old")
    log.info("converted %s (%s) -> %s", gguf_file, model.config.model_type, out_dir)
    return out_dir


def load_gguf(gguf_file: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` as transformers loads them from a GGUF file: float32, in eval mode, on the CPU.

    The model still carries transformers' GGUF quantizer marker (`hf_quantizer`), as `from_pretrained`
    leaves it; `convert_gguf` removes it before saving.
    """
    gguf_file = Path(gguf_file)
    gguf_architecture(gguf_file)  # fails early, with a message, on a file transformers would misread
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, IndexError, NotImplementedError) as e:
        raise ModelLoadError(
            f"transformers could not load GGUF file {gguf_file} ({type(e).__name__}: {e}): "
            "re-download it, or convert the original Hugging Face checkpoint instead"
        ) from e
    _check_dense(model, gguf_file)
    return model.eval(), tokenizer


def gguf_architecture(gguf_file: Path) -> str:
    """The file's `general.architecture`, checked to be one of `ARCHITECTURES`, and the file checked to be whole.

    Reads the metadata and tensor table with a small parser of its own (the `gguf` package's reader decodes
    every token of a 49K vocabulary into numpy views, seconds per read), and compares the file's size with
    the end of its last tensor, so a truncated download is named as such.
    """
    if not gguf_file.is_file():
        raise ModelLoadError(f"GGUF file {gguf_file} does not exist: pass the path of a .gguf checkpoint")
    with gguf_file.open("rb") as f:
        magic = f.read(len(_MAGIC))
        if magic != _MAGIC:
            raise ModelLoadError(
                f"{gguf_file} is not a GGUF file (it starts with {magic!r}, not {_MAGIC!r}): pass a llama.cpp "
                ".gguf checkpoint (a llama2.c .bin converts with `quantplan convert-llama2c`)"
            )
        _require_extra()
        try:
            metadata, end = _read_layout(f)
        except (EOFError, ValueError, KeyError, struct.error) as e:
            raise ModelLoadError(f"GGUF file {gguf_file} is damaged or truncated ({e}): re-download it") from e
    size = gguf_file.stat().st_size
    if size < end:
        raise ModelLoadError(
            f"GGUF file {gguf_file} is damaged or truncated ({size:,} bytes; its tensors end at byte {end:,}): "
            "re-download it"
        )
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF file {gguf_file} holds a {architecture!r} model; only the Llama family (architecture "
            f"{' or '.join(map(repr, ARCHITECTURES))}) is supported: convert the original Hugging Face checkpoint "
            "instead"
        )
    return architecture


def _read_layout(f: BinaryIO) -> tuple[dict[str, Any], int]:
    """GGUF v2/v3 after the magic: (string and scalar metadata, the byte offset where the last tensor ends)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    version, n_tensors, n_kv = _unpack(f, "<IQQ")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}; only versions 2 and 3 are read")
    metadata = {}
    for _ in range(n_kv):
        key, (value_type,) = _read_str(f), _unpack(f, "<I")
        metadata[key] = _read_value(f, value_type)
    end = 0
    for _ in range(n_tensors):
        _read_str(f)  # the tensor's name
        (n_dims,) = _unpack(f, "<I")
        if n_dims > _MAX_DIMS:
            raise ValueError(f"a tensor with {n_dims} dimensions")
        dims = _unpack(f, f"<{n_dims}Q")
        ggml_type, offset = _unpack(f, "<IQ")
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        end = max(end, offset + math.prod(dims) // block * block_bytes)
    alignment = int(metadata.get("general.alignment", 32))
    return metadata, -(-f.tell() // alignment) * alignment + end


def _read_value(f: BinaryIO, value_type: int) -> Any:
    """One metadata value; arrays are skipped (None): only strings and scalars are kept."""
    if value_type == _STRING:
        return _read_str(f)
    if value_type in _SCALARS:
        return _unpack(f, "<" + _SCALARS[value_type])[0]
    if value_type != _ARRAY:
        raise ValueError(f"unknown metadata value type {value_type}")
    item_type, count = _unpack(f, "<IQ")
    if item_type in _SCALARS:
        f.seek(count * struct.calcsize(_SCALARS[item_type]), os.SEEK_CUR)
    else:
        for _ in range(count):
            _read_value(f, item_type)
    return None


def _read_str(f: BinaryIO) -> str:
    (length,) = _unpack(f, "<Q")
    if length > _MAX_STRING:
        raise ValueError(f"a metadata string of {length:,} bytes")
    data = f.read(length)
    if len(data) < length:
        raise EOFError("the file ends inside its metadata")
    return data.decode("utf-8")


def _unpack(f: BinaryIO, fmt: str) -> tuple[Any, ...]:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) < size:
        raise EOFError("the file ends inside its metadata")
    return struct.unpack(fmt, data)


def _require_extra() -> None:
    try:
        import accelerate  # noqa: F401  (transformers needs it to load GGUF files)
        import gguf  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(
            f"reading GGUF files needs the optional dependencies ({e.name} is missing): {_EXTRA}"
        ) from None


def _check_dense(model: PreTrainedModel, gguf_file: Path) -> None:
    """Every parameter must be a float tensor: a transformers that keeps GGUF blocks packed gives uint8 ones."""
    packed = [name for name, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise ModelLoadError(
            f"transformers kept {len(packed)} tensors of {gguf_file} packed (e.g. {packed[0]}) instead of "
            "dequantizing them: use a transformers version whose GGUF loader dequantizes Llama models"
        )


def _drop_quantizer(model: PreTrainedModel) -> None:
    """Remove transformers' GGUF quantizer marker, which makes `save_pretrained` refuse the (dense) model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # deletes hf_quantizer and config.quantization_config
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelLoadError(f"output path {out_dir} exists and is not a directory: choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ModelLoadError(
            f"output directory {out_dir} already exists and is not empty: choose another path or pass --overwrite"
        )


def _replace_dir(staged: Path, out_dir: Path, old: Path) -> None:
    """Rename `staged` to `out_dir`; an existing `out_dir` moves to `old` (inside the temporary directory that
    is removed afterwards) and comes back if the rename fails."""
    moved = out_dir.exists()
    if moved:
        os.replace(out_dir, old)
    try:
        os.rename(staged, out_dir)
    except OSError:
        if moved:
            os.replace(old, out_dir)
        raise
