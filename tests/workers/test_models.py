"""quantplan.workers.models: load_model on a tiny local Llama, its errors, model_identity.

`make_tokenizer` and `save_tiny_llama` are also used by test_data.py and test_evaluate.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from quantplan.errors import ModelLoadError, QuantPlanError
from quantplan.workers.models import _commit_from_path, _looks_like_path, load_model, model_identity, resolve_dtype

CORPUS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    'One day, Tom found a big red ball. He said, "Let\'s play!" They played together all day.',
    " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor .",
]


def make_tokenizer(corpus: Iterable[str] = CORPUS, vocab_size: int = 320):
    """A small byte-level BPE tokenizer that puts <s> (BOS) first, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama(vocab_size: int, seed: int = 0):
    """A randomly initialised 2-layer LlamaForCausalLM (hidden 32, GQA 4/2), built offline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_tiny_llama(path: Path, corpus: Iterable[str] = CORPUS, seed: int = 0) -> Path:
    """Save a tiny Llama and its tokenizer as a Hugging Face directory at `path`."""
    tokenizer = make_tokenizer(corpus)
    model = tiny_llama(len(tokenizer), seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def test_load_model_local_dir(tiny_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    ids = tokenizer("Once upon a time")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert model.config.vocab_size == len(tokenizer)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("bfloat16", torch.bfloat16), ("fp16", torch.float16), ("auto", torch.float32), ("Float32", torch.float32)],
)
def test_load_model_dtypes(tiny_dir: Path, dtype: str, expected: torch.dtype) -> None:
    model, _ = load_model(str(tiny_dir), dtype=dtype)
    assert model.dtype == expected


def test_load_model_relative_and_home_paths(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_dir.parent)
    model, _ = load_model(f".{os.sep}{tiny_dir.name}")
    assert type(model).__name__ == "LlamaForCausalLM"
    monkeypatch.setenv("HOME", str(tiny_dir.parent))
    model, _ = load_model(f"~/{tiny_dir.name}")
    assert type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("spec", ["./no-such-model", "/no/such/model", "~/no-such-quantplan-model", "a/b/c"])
def test_missing_directory(spec: str) -> None:
    with pytest.raises(ModelLoadError, match="model directory not found") as info:
        load_model(spec)
    assert "\n" not in str(info.value)


def test_file_instead_of_directory(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(str(f))


def test_directory_without_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="could not load a model from directory") as info:
        load_model(str(tmp_path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", ["int8", "float64", "", "fp8"])
def test_bad_dtype(tiny_dir: Path, dtype: str) -> None:
    with pytest.raises(QuantPlanError, match="unsupported dtype.*float32, float16, bfloat16 or auto"):
        load_model(str(tiny_dir), dtype=dtype)


def test_bad_dtype_checked_before_loading() -> None:
    # A bad dtype is reported even for a model that does not exist: nothing is loaded first.
    with pytest.raises(QuantPlanError, match="unsupported dtype"):
        load_model("./no-such-model", dtype="int4")


def test_bad_device(tiny_dir: Path) -> None:
    with pytest.raises(QuantPlanError, match="unsupported device"):
        load_model(str(tiny_dir), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(QuantPlanError, match="CUDA is not available"):
            load_model(str(tiny_dir), device="cuda")


def test_hub_id_offline_fails_fast() -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1", "tests must run with HF_HUB_OFFLINE=1 (tests/conftest.py)"
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model("quantplan-test/no-such-model")
    assert time.monotonic() - start < 15
    message = str(info.value)
    assert "'quantplan-test/no-such-model'" in message
    assert "hub unreachable" in message and "local model directory" in message and "HF_HUB_OFFLINE=1" in message
    assert "\n" not in message
    assert isinstance(info.value.__cause__, Exception)


def test_empty_spec() -> None:
    with pytest.raises(ModelLoadError, match="empty model spec"):
        load_model("  ")


def test_looks_like_path() -> None:
    assert _looks_like_path("./m") and _looks_like_path("../m") and _looks_like_path("/m")
    assert _looks_like_path("~/m") and _looks_like_path("a/b/c")
    # Hub ids are "name" or "org/name", even though "/" is os.sep on POSIX.
    assert not _looks_like_path("meta-llama/Llama-2-7b-hf")
    assert not _looks_like_path("gpt2")


def test_resolve_dtype() -> None:
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("auto") == "auto"
    with pytest.raises(QuantPlanError):
        resolve_dtype(torch.float32)  # type: ignore[arg-type]


def test_model_identity(tiny_dir: Path) -> None:
    ident = model_identity(str(tiny_dir))
    model, _ = load_model(str(tiny_dir))
    expected_params = sum(p.numel() for p in model.parameters())
    assert ident == {
        "name": str(tiny_dir.resolve()),
        "source": "local",
        "revision": None,
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "parameters": expected_params,
        "dtype": "float32",
    }
    assert model_identity(str(tiny_dir), model) == ident
    bf16, _ = load_model(str(tiny_dir), dtype="bfloat16")
    assert model_identity(str(tiny_dir), bf16)["dtype"] == "bfloat16"


def test_model_identity_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model directory not found"):
        model_identity("./no-such-model")
    with pytest.raises(ModelLoadError, match="could not load a model from directory"):
        model_identity(str(tmp_path))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1"):
        model_identity("quantplan-test/no-such-model")


def test_commit_from_snapshot_path(tmp_path: Path) -> None:
    snap = tmp_path / "models--org--name" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    assert _commit_from_path(snap) == "a" * 40
    assert _commit_from_path(snap / "config.json") == "a" * 40
    assert _commit_from_path(tmp_path) is None
