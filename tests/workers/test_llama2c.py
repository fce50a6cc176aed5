"""Tests for workers.llama2c: stories260K converted to Hugging Face, checked against llama2.c semantics.

The references here are independent of the converter: a pure-Python port of llama2.c's `encode` and a
float64 numpy forward pass that reads the .bin directly and rotates adjacent pairs as llama2.c does.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from quantplan.errors import ModelLoadError, QuantPlanError
from quantplan.workers import llama2c
from quantplan.workers.llama2c import convert_llama2c

STORY_FILES = ("tinystories_train0.txt", "tinystories_validation0.txt")


# ---- independent references -------------------------------------------------------------------------


def read_llama2c_tokenizer(path: Path) -> tuple[list[str], list[float]]:
    data = path.read_bytes()
    pieces, scores, offset = [], [], 4
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8 : offset + 8 + length].decode("utf-8"))
        scores.append(score)
        offset += 8 + length
    return pieces, scores


def llama2c_encode(text: str, pieces: list[str], scores: list[float]) -> list[int]:
    """llama2.c run.c `encode(text, bos=1, eos=0)`: greedy merge of the highest-scoring adjacent pair."""
    lookup = {piece: i for i, piece in enumerate(pieces)}
    ids = [1]
    if text:
        ids.append(lookup[" "])  # the dummy prefix
    for char in text:
        if char in lookup:
            ids.append(lookup[char])
        else:
            ids.extend(b + 3 for b in char.encode("utf-8"))
    while True:
        best, best_score = None, -1e10
        for i in range(1, len(ids) - 1):  # never merge into BOS
            merged = lookup.get(pieces[ids[i]] + pieces[ids[i + 1]])
            if merged is not None and scores[merged] > best_score:
                best, best_score = (i, merged), scores[merged]
        if best is None:
            return ids
        i, merged = best
        ids[i : i + 2] = [merged]


def rmsnorm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * g


def reference_logits(path: Path, ids: list[int]) -> np.ndarray:
    """float64 llama2.c forward pass over `ids`, read straight from a legacy .bin file."""
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = np.fromfile(path, "<i4", count=7).tolist()
    flat = np.fromfile(path, "<f4", offset=28).astype(np.float64)
    hs, kv_dim, nv = dim // n_heads, dim // n_heads * n_kv, abs(vocab)
    offset = 0

    def take(*shape: int) -> np.ndarray:
        nonlocal offset
        size = int(np.prod(shape))
        offset += size
        return flat[offset - size : offset].reshape(shape)

    emb, att_norm = take(nv, dim), take(n_layers, dim)
    wq, wk, wv = take(n_layers, dim, dim), take(n_layers, kv_dim, dim), take(n_layers, kv_dim, dim)
    wo, ffn_norm = take(n_layers, dim, dim), take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    final_norm = take(dim)
    take(2, seq_len, hs // 2)  # RoPE tables
    classifier = emb if vocab > 0 else take(nv, dim)
    assert offset == flat.size

    n = len(ids)
    angles = np.arange(n)[:, None] * 10000.0 ** (-np.arange(0, hs, 2) / hs)[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]

    def rope(t: np.ndarray) -> np.ndarray:  # (n, heads, hs): rotate pairs (2i, 2i+1)
        a, b = t[..., 0::2], t[..., 1::2]
        return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(t.shape)

    mask = np.triu(np.full((n, n), -np.inf), k=1)
    x = emb[ids]
    for layer in range(n_layers):
        h = rmsnorm(x, att_norm[layer])
        q = rope((h @ wq[layer].T).reshape(n, n_heads, hs))
        k = rope((h @ wk[layer].T).reshape(n, n_kv, hs))
        v = (h @ wv[layer].T).reshape(n, n_kv, hs)
        k, v = np.repeat(k, n_heads // n_kv, axis=1), np.repeat(v, n_heads // n_kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hs) + mask
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", att, v).reshape(n, dim) @ wo[layer].T
        h = rmsnorm(x, ffn_norm[layer])
        gate = h @ w1[layer].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w3[layer].T)) @ w2[layer].T
    return rmsnorm(x, final_norm) @ classifier.T


# ---- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(stories_hf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories_hf)


@pytest.fixture(scope="module")
def model(stories_hf: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(stories_hf).eval()


@pytest.fixture(scope="module")
def stories(stories_dir: Path) -> list[str]:
    return [(stories_dir / name).read_text(encoding="utf-8").strip() for name in STORY_FILES]


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


# ---- tokenizer -----------------------------------------------------------------------------------------


def test_tokenizer_matches_llama2c_test_vector(tokenizer):
    assert tokenizer("Once upon a time").input_ids == [1, 403, 407, 261, 378]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer("").input_ids == [1]


def test_tokenizer_matches_llama2c_encode_and_round_trips(tokenizer, stories, stories_dir):
    pieces, scores = read_llama2c_tokenizer(stories_dir / "tok512.bin")
    for text in [*stories, "Ünïcödé → bytes™ and  two  spaces\nnew line"]:
        ids = tokenizer(text).input_ids
        assert ids == llama2c_encode(text, pieces, scores)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


# ---- model ---------------------------------------------------------------------------------------------


def test_config_matches_header(model):
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (8, 4, 512)
    assert cfg.max_position_embeddings == 512 and cfg.rms_norm_eps == 1e-5
    assert cfg.tie_word_embeddings and model.dtype == torch.float32


def test_logits_match_numpy_llama2c_forward(model, tokenizer, stories_dir):
    ids = tokenizer("Once upon a time, there was a little girl named Lily. She").input_ids
    expected = reference_logits(stories_dir / "stories260K.bin", ids)
    assert np.abs(hf_logits(model, ids) - expected).max() < 1e-3


def test_perplexity_and_next_token_match_reference(model, tokenizer, stories):
    ids = tokenizer("\n".join(stories)).input_ids
    assert len(ids) == 493 and ids.count(1) == 1
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert loss.exp().item() == pytest.approx(3.738, rel=0.01)

    probs = torch.softmax(torch.from_numpy(hf_logits(model, tokenizer("Once upon a time").input_ids)[-1]), -1)
    assert probs[tokenizer.convert_tokens_to_ids(",")].item() == pytest.approx(0.969, abs=0.01)


def test_untied_classifier(tmp_path, stories_dir):
    """A negative vocab_size in the header means a separate classifier follows the RoPE tables."""
    data = bytearray((stories_dir / "stories260K.bin").read_bytes())
    struct.pack_into("<i", data, 20, -512)
    classifier = np.random.default_rng(0).normal(scale=0.1, size=(512, 64)).astype("<f4")
    checkpoint = tmp_path / "untied.bin"
    checkpoint.write_bytes(bytes(data) + classifier.tobytes())
    out = convert_llama2c(checkpoint, stories_dir / "tok512.bin", tmp_path / "hf")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not model.config.tie_word_embeddings
    ids = [1, 403, 407, 261, 378, 11, 20, 300]
    assert np.abs(hf_logits(model, ids) - reference_logits(checkpoint, ids)).max() < 1e-3


# ---- errors and atomicity ------------------------------------------------------------------------------


def convert_fails(tmp_path: Path, checkpoint: Path, tok: Path, match: str, **kwargs) -> ModelLoadError:
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    with pytest.raises(ModelLoadError, match=match) as info:
        convert_llama2c(checkpoint, tok, out, **kwargs)
    assert isinstance(info.value, QuantPlanError) and "\n" not in str(info.value)
    assert set(tmp_path.iterdir()) == before  # no output, no temporary directory left behind
    return info.value


def test_truncated_checkpoint(tmp_path, stories_dir):
    bad = tmp_path / "truncated.bin"
    bad.write_bytes((stories_dir / "stories260K.bin").read_bytes()[:-100])
    convert_fails(tmp_path, bad, stories_dir / "tok512.bin", r"1056440 bytes .* implies 1056540 bytes")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"this is not a llama2.c checkpoint at all" * 10, "does not start with a llama2.c header"),
        (struct.pack("<Ii", 0x616B3432, 1) + bytes(300), "version-1 export"),
        (b"short", "too short for a llama2.c header"),
    ],
)
def test_not_a_checkpoint(tmp_path, stories_dir, content, match):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(content)
    convert_fails(tmp_path, bad, stories_dir / "tok512.bin", match)


def test_missing_files(tmp_path, stories_dir):
    convert_fails(tmp_path, tmp_path / "nope.bin", stories_dir / "tok512.bin", "nope.bin does not exist")
    convert_fails(tmp_path, stories_dir / "stories260K.bin", tmp_path / "tok.bin", "tok.bin does not exist")


def test_bad_tokenizers(tmp_path, stories_dir):
    data = (stories_dir / "tok512.bin").read_bytes()
    checkpoint = stories_dir / "stories260K.bin"
    short = tmp_path / "short.bin"
    short.write_bytes(data[: -(8 + 3)])  # drop the last token: score, length 3, U+200A in 3 bytes
    convert_fails(tmp_path, checkpoint, short, "has 511 tokens but the model's vocab_size is 512")
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:-1])
    convert_fails(tmp_path, checkpoint, cut, "not a valid llama2.c tokenizer")


def test_existing_out_dir(tmp_path, stories_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = (stories_dir / "stories260K.bin", stories_dir / "tok512.bin")
    convert_fails(tmp_path, *args, "already exists and is not empty")
    assert (out / "keep.txt").read_text() == "mine"

    assert convert_llama2c(*args, out, overwrite=True) == out
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_while_writing_leaves_nothing(tmp_path, stories_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(llama2c, "_build_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_llama2c(stories_dir / "stories260K.bin", stories_dir / "tok512.bin", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
