"""Conversion of llama2.c checkpoints and tokenizers into Hugging Face Llama model directories.

`convert_llama2c(checkpoint, tokenizer, out_dir)` reads a llama2.c legacy (version-0) ``.bin`` model
export and a llama2.c binary tokenizer (``tok*.bin``) and writes a directory that
`transformers.AutoModelForCausalLM` and `transformers.AutoTokenizer` load: LlamaConfig, float32
safetensors weights, and a fast tokenizer that encodes exactly like llama2.c's ``run.c`` ``encode``
with BOS. Problems with the inputs raise `ModelLoadError` with a one-line message.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from quantplan.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = ["Llama2cHeader", "convert_llama2c", "read_checkpoint", "read_tokenizer"]

_HEADER = struct.Struct("<7i")
# llama2.c's version-1/2 exports (export.py --version 1/2) start with this uint32 magic ("ak42").
_NEW_FORMAT_MAGIC = 0x616B3432
# Generous bounds: anything outside them is not a header but other data read as int32.
_MAX_SIZE = 1 << 20
_MAX_VOCAB = 1 << 24
# SentencePiece stores the control pieces like this; llama2.c keeps them verbatim in tok*.bin.
_SPECIAL_PIECES = {0: ("<unk>", "<unk>"), 1: ("\n<s>\n", "<s>"), 2: ("\n</s>\n", "</s>")}
_SPACE = "\u2581"  # SentencePiece's '▁', which llama2.c replaced by ' ' in its pieces


@dataclass(frozen=True)
class Llama2cHeader:
    """The seven int32 fields of a legacy llama2.c export, plus what the sign of vocab_size means."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The float32 arrays of the file, in file order, with their shapes."""
        d, h, n, kv, v = self.dim, self.hidden_dim, self.n_layers, self.kv_dim, self.vocab_size
        shapes = [
            ("tok_embeddings", (v, d)),
            ("attention_norm", (n, d)),
            ("wq", (n, d, d)),
            ("wk", (n, kv, d)),
            ("wv", (n, kv, d)),
            ("wo", (n, d, d)),
            ("ffn_norm", (n, d)),
            ("w1", (n, h, d)),
            ("w2", (n, d, h)),
            ("w3", (n, h, d)),
            ("norm", (d,)),
            # The precomputed RoPE cos/sin tables: stored, but recomputed by the HF model.
            ("freq_cis", (2, self.seq_len, self.head_dim // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("output", (v, d)))
        return shapes

    def expected_bytes(self) -> int:
        return _HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in self.shapes())


def convert_llama2c(
    checkpoint: str | Path, tokenizer: str | Path, out_dir: str | Path, *, overwrite: bool = False
) -> Path:
    """Convert a llama2.c model and tokenizer into a Hugging Face Llama directory; return its path.

    The directory is written next to `out_dir` under a temporary name and renamed into place, so a
    failed conversion leaves nothing at `out_dir`. An existing non-empty `out_dir` is replaced only
    when `overwrite` is true.
    """
    checkpoint, tokenizer, out_dir = Path(checkpoint), Path(tokenizer), Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    header, weights = read_checkpoint(checkpoint)
    pieces, scores = read_tokenizer(tokenizer, header.vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, unlike tempfile.mkdtemp, gives the directory the usual permissions (umask) it keeps after the rename.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        _build_model(header, weights).save_pretrained(tmp, safe_serialization=True)
        _build_tokenizer(pieces, scores, header.seq_len).save_pretrained(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_checkpoint(path: Path) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """Read a legacy llama2.c export: its header and its arrays by name (read-only memory maps)."""
    header = _read_header(path)
    actual, expected = path.stat().st_size, header.expected_bytes()
    if actual != expected:
        raise ModelLoadError(
            f"llama2.c checkpoint {path} is {actual} bytes but its header {_describe(header)} implies "
            f"{expected} bytes: the file is truncated or not a legacy (version-0) export; re-download or "
            "re-export it"
        )
    # A memory map avoids reading a large checkpoint twice; tensors are copied out of it later.
    flat = np.memmap(path, dtype="<f4", mode="r", offset=_HEADER.size)
    weights, offset = {}, 0
    for name, shape in header.shapes():
        size = int(np.prod(shape))
        weights[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    return header, weights


def _read_header(path: Path) -> Llama2cHeader:
    if not path.is_file():
        raise ModelLoadError(f"llama2.c checkpoint {path} does not exist: pass the path of the model .bin file")
    with path.open("rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise ModelLoadError(
            f"{path} is {len(raw)} bytes, too short for a llama2.c header (28 bytes): pass a llama2.c model .bin"
        )
    if struct.unpack_from("<I", raw)[0] == _NEW_FORMAT_MAGIC:
        version = struct.unpack_from("<i", raw, 4)[0]
        raise ModelLoadError(
            f"{path} is a llama2.c version-{version} export; only legacy version-0 files are supported: "
            "re-export it with llama2.c's `export.py --version 0`"
        )
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = _HEADER.unpack(raw)
    header = Llama2cHeader(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, vocab > 0)
    if not _plausible(header):
        raise ModelLoadError(
            f"{path} does not start with a llama2.c header (read {_describe(header)}): "
            "pass a legacy (version-0) llama2.c model .bin file"
        )
    return header


def _plausible(h: Llama2cHeader) -> bool:
    sizes = (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.seq_len)
    if not all(0 < s <= _MAX_SIZE for s in sizes) or not 0 < h.vocab_size <= _MAX_VOCAB:
        return False
    # RoPE rotates pairs inside each head, and GQA shares each kv head among a whole number of heads.
    return h.dim % h.n_heads == 0 and h.head_dim % 2 == 0 and h.n_heads % h.n_kv_heads == 0


def _describe(h: Llama2cHeader) -> str:
    return (
        f"(dim={h.dim}, hidden_dim={h.hidden_dim}, n_layers={h.n_layers}, n_heads={h.n_heads}, "
        f"n_kv_heads={h.n_kv_heads}, vocab_size={h.vocab_size}, seq_len={h.seq_len})"
    )


def read_tokenizer(path: Path, vocab_size: int) -> tuple[list[str], list[float]]:
    """Read a llama2.c binary tokenizer: its pieces (with ' ' as stored) and their scores.

    Layout: int32 max_token_length, then per token float32 score, int32 length, that many UTF-8 bytes.
    The file carries no token count, so it is read to its end and the count compared to `vocab_size`.
    """
    if not path.is_file():
        raise ModelLoadError(f"llama2.c tokenizer {path} does not exist: pass the path of the tok*.bin file")
    data = path.read_bytes()
    pieces, scores = _parse_tokenizer(path, data)
    if len(pieces) != vocab_size:
        raise ModelLoadError(
            f"tokenizer {path} has {len(pieces)} tokens but the model's vocab_size is {vocab_size}: "
            "pass the tokenizer the model was trained with"
        )
    for token_id, (stored, _) in _SPECIAL_PIECES.items():
        if pieces[token_id] != stored:
            raise ModelLoadError(
                f"tokenizer {path} stores {pieces[token_id]!r} as token {token_id}, expected {stored!r}: "
                "only Llama-style SentencePiece vocabularies (<unk>, <s>, </s> first) are supported"
            )
    return pieces, scores


def _parse_tokenizer(path: Path, data: bytes) -> tuple[list[str], list[float]]:
    def malformed(why: str) -> ModelLoadError:
        return ModelLoadError(f"tokenizer {path} is not a valid llama2.c tokenizer .bin ({why}): re-export it")

    if len(data) < 4:
        raise malformed("shorter than its 4-byte header")
    (max_len,) = struct.unpack_from("<i", data)
    pieces, scores, offset = [], [], 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise malformed(f"token {len(pieces)} is cut off")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if not 0 < length <= max_len or offset + length > len(data):
            raise malformed(f"token {len(pieces)} has length {length}, max_token_length is {max_len}")
        try:
            pieces.append(data[offset : offset + length].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise malformed(f"token {len(pieces)} is not UTF-8") from e
        scores.append(score)
        offset += length
    if len(set(pieces)) != len(pieces):
        raise malformed("it holds duplicate pieces")
    return pieces, scores


def _build_model(header: Llama2cHeader, weights: dict[str, np.ndarray]) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        max_position_embeddings=header.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=header.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    # A tied lm_head shares embed_tokens, so it is the only weight the state dict may leave out.
    missing, unexpected = model.load_state_dict(_hf_state_dict(header, weights), strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if header.shared_classifier else set()):
        raise AssertionError(f"llama2.c to HF weight mapping is incomplete: {missing=} {unexpected=}")
    return model.eval()


def _hf_state_dict(header: Llama2cHeader, weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map llama2.c arrays to LlamaForCausalLM parameter names (copies, so the memory map can close)."""

    def t(name: str, layer: int | None = None) -> torch.Tensor:
        array = weights[name] if layer is None else weights[name][layer]
        return torch.from_numpy(np.array(array, dtype=np.float32))

    sd = {"model.embed_tokens.weight": t("tok_embeddings"), "model.norm.weight": t("norm")}
    if not header.shared_classifier:
        sd["lm_head.weight"] = t("output")
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t("attention_norm", i)
        sd[p + "self_attn.q_proj.weight"] = _to_rotate_half(t("wq", i), header.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _to_rotate_half(t("wk", i), header.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = t("wv", i)
        sd[p + "self_attn.o_proj.weight"] = t("wo", i)
        sd[p + "post_attention_layernorm.weight"] = t("ffn_norm", i)
        sd[p + "mlp.gate_proj.weight"] = t("w1", i)
        sd[p + "mlp.down_proj.weight"] = t("w2", i)
        sd[p + "mlp.up_proj.weight"] = t("w3", i)
    return sd


def _to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows so HF's rotate_half RoPE equals llama2.c's rotation of adjacent pairs.

    Within each head llama2.c rotates rows (2i, 2i+1); HF rotates (i, i + head_dim/2). Moving the even
    rows of each head to its first half and the odd rows to its second half makes them agree; this is
    `permute` in llama2.c's export.py and in transformers' convert_llama_weights_to_hf.py.
    """
    dim_out, dim_in = w.shape
    return w.view(n_heads, dim_out // n_heads // 2, 2, dim_in).transpose(1, 2).reshape(dim_out, dim_in)


def _build_tokenizer(pieces: list[str], scores: list[float], max_length: int) -> PreTrainedTokenizerFast:
    """A fast Llama-style (SentencePiece BPE with byte fallback) tokenizer over the llama2.c vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {piece.replace(" ", _SPACE): i for i, piece in enumerate(pieces)}
    for token_id, (stored, name) in _SPECIAL_PIECES.items():
        del vocab[stored.replace(" ", _SPACE)]
        vocab[name] = token_id
    backend = Tokenizer(BPE(vocab, _merges(vocab, scores), unk_token="<unk>", byte_fallback=True))
    backend.add_special_tokens(
        [AddedToken(name, special=True, normalized=False) for _, name in _SPECIAL_PIECES.values()]
    )
    # llama2.c adds a dummy-prefix space to non-empty text and does not split it into words.
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
    backend.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
        # The default clean-up would turn " ." into "." when decoding, which llama2.c does not do.
        clean_up_tokenization_spaces=False,
    )


def _merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces.

    llama2.c merges, at each step, the adjacent pair whose concatenation has the highest score, so
    the merges are ranked by the score of the merged piece, as transformers' SentencePiece converter
    does (its helper is internal and differs across transformers versions, hence this copy).
    """
    ranked = []
    for piece, token_id in vocab.items():
        if token_id in _SPECIAL_PIECES:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelLoadError(f"output path {out_dir} exists and is not a directory: choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ModelLoadError(
            f"output directory {out_dir} already exists and is not empty: choose another path or pass overwrite=True"
        )


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished directory to out_dir; an existing out_dir is moved aside, then removed."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    out_dir.rename(old / "dir")
    try:
        tmp.rename(out_dir)
    except BaseException:
        (old / "dir").rename(out_dir)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
