"""Tests for workers.demo: the cached offline demo model built from pydoc help topics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantplan.workers import demo
from tests.conftest import DEMO_STEPS

STEPS = DEMO_STEPS


@pytest.fixture(scope="module")
def cache(demo_cache: Path) -> Path:
    return demo_cache  # the session's, where build_demo_model(cache, steps=STEPS) built the demo model


@pytest.fixture(scope="module")
def built(cache: Path) -> demo.DemoModel:
    return demo.build_demo_model(cache, steps=STEPS, progress=False)


def test_layout_and_specs(built: demo.DemoModel, cache: Path) -> None:
    assert built.path.parent.parent == cache
    assert built.path.parent.name.startswith("llama-demo-")
    assert built.data_spec == f"text:{built.test_file}"
    assert built.calib_spec == f"text:{built.train_file}"
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_loads_offline_as_llama_with_gqa(built: demo.DemoModel) -> None:
    model = AutoModelForCausalLM.from_pretrained(built.path)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert model.dtype == torch.float32
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.in_features % 128 == 0 for m in linears)
    out = model(input_ids=torch.tensor([[0, 5, 6, 7]]))
    assert out.logits.shape == (1, 4, cfg.vocab_size)


def test_tokenizer_adds_bos_and_round_trips(built: demo.DemoModel) -> None:
    tok = AutoTokenizer.from_pretrained(built.path)
    text = 'The "with" statement\n  is used to wrap — ünïcode too.'
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 0
    assert ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == AutoModelForCausalLM.from_pretrained(built.path).config.vocab_size == demo.VOCAB_SIZE
    assert (tok.eos_token, tok.unk_token) == ("</s>", "<unk>")
    assert tok.model_max_length == demo.MODEL_SPEC["max_position_embeddings"]


def test_training_reduces_loss(built: demo.DemoModel) -> None:
    log = json.loads((built.path / demo.TRAIN_LOG).read_text())
    assert log["steps"] == STEPS and len(log["losses"]) == STEPS
    assert log["final_loss"] < log["initial_loss"] - 0.3
    assert log["heldout_ppl"] < demo.VOCAB_SIZE


def test_heldout_text_is_disjoint_from_training_text(built: demo.DemoModel) -> None:
    train = built.train_file.read_text(encoding="utf-8")
    test = built.test_file.read_text(encoding="utf-8")
    assert test.strip() and train.strip()
    assert 0.05 < len(test) / (len(train) + len(test)) < 0.15
    paragraphs = [p for p in test.split("\n\n") if len(p) >= 80]
    assert paragraphs and not [p for p in paragraphs if p in train]


def test_second_call_uses_cache(built: demo.DemoModel, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = built.path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained despite a cached model")

    monkeypatch.setattr(demo, "_train", no_training)
    again = demo.build_demo_model(cache, steps=STEPS, progress=False)
    assert again == built
    assert weights.stat().st_mtime_ns == mtime


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(demo, "_train", crash)
    with pytest.raises(RuntimeError, match="boom"):
        demo.build_demo_model(tmp_path, steps=STEPS, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_publish_loser_keeps_winner_and_force_replaces(tmp_path: Path) -> None:
    final, mine = tmp_path / "llama-demo-x", tmp_path / "tmp"
    final.mkdir()
    (final / "who").write_text("winner")
    mine.mkdir()
    (mine / "who").write_text("mine")
    demo._publish(mine, final, replace=False)
    assert (final / "who").read_text() == "winner"
    demo._publish(mine, final, replace=True)
    assert (final / "who").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-demo-x"]


def test_cache_key_depends_on_recipe() -> None:
    texts = ["a", "b"]
    key = demo._recipe_key(texts, 10, 0)
    assert key == demo._recipe_key(texts, 10, 0)
    assert len({key, demo._recipe_key(texts, 11, 0), demo._recipe_key(texts, 10, 1)}) == 3
    assert key != demo._recipe_key(["a", "c"], 10, 0)


def test_demo_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path))
    assert demo.demo_cache_dir() == tmp_path / "demo"
    monkeypatch.delenv(demo.CACHE_ENV)
    default = demo.demo_cache_dir()
    assert default.name == "demo" and "quantplan" in str(default.parent).lower()
