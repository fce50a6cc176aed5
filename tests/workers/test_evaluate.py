"""quantplan.workers.evaluate: perplexity and KL against manual float64 computations on a tiny random Llama."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quantplan.workers.data import DataSpec, eval_windows, load_text
from quantplan.workers.evaluate import EvalResult, evaluate
from quantplan.workers.models import load_model
from tests.workers.test_models import save_tiny_llama


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: one thread avoids OpenMP overhead, which is large on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path):
    corpus = [(stories_dir / name).read_text(encoding="utf-8") for name in ("tinystories_train0.txt",)]
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", corpus=corpus)
    return load_model(str(path))


@pytest.fixture(scope="module")
def windows(tiny) -> torch.Tensor:
    model, _ = tiny
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (7, 24), generator=generator)


@pytest.fixture(scope="module")
def perturbed(tiny):
    model, _ = tiny
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return other


def manual_logits(model, windows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=windows).logits.double()


def manual_nll(model, windows: torch.Tensor) -> float:
    logits = manual_logits(model, windows)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()


def manual_kl(reference, model, windows: torch.Tensor) -> float:
    log_p = manual_logits(reference, windows)[:, :-1].log_softmax(-1)
    log_q = manual_logits(model, windows)[:, :-1].log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def test_perplexity_matches_manual(tiny, windows: torch.Tensor) -> None:
    model, _ = tiny
    result = evaluate(model, windows)
    nll = manual_nll(model, windows)
    assert result.tokens == 7 * 23
    assert result.nll == pytest.approx(nll, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(result.nll), rel=1e-12)
    assert result.kl is None
    # A random init is close to uniform: the NLL is about log(vocab).
    assert abs(result.nll - math.log(model.config.vocab_size)) < 0.5


def test_batch_size_does_not_change_result(tiny, windows: torch.Tensor, perturbed) -> None:
    model, _ = tiny
    results = [evaluate(perturbed, windows, reference=model, batch_size=b) for b in (1, 3, 7, 64)]
    for r in results[1:]:
        assert r.tokens == results[0].tokens
        assert r.nll == pytest.approx(results[0].nll, rel=1e-6)
        assert r.kl == pytest.approx(results[0].kl, rel=1e-5)


def test_kl_against_itself_is_zero(tiny, windows: torch.Tensor) -> None:
    model, _ = tiny
    result = evaluate(model, windows, reference=model)
    assert result.kl is not None and abs(result.kl) < 1e-9
    twin = copy.deepcopy(model)
    assert abs(evaluate(twin, windows, reference=model, batch_size=2).kl) < 1e-9


def test_kl_matches_manual_float64(tiny, windows: torch.Tensor, perturbed) -> None:
    model, _ = tiny
    result = evaluate(perturbed, windows, reference=model, batch_size=4)
    expected = manual_kl(model, perturbed, windows)
    assert expected > 1e-4
    assert result.kl == pytest.approx(expected, rel=1e-6)
    assert result.nll == pytest.approx(manual_nll(perturbed, windows), rel=1e-6)
    reverse = manual_kl(perturbed, model, windows)
    assert evaluate(model, windows, reference=perturbed).kl == pytest.approx(reverse, rel=1e-6)


def test_bfloat16_model_against_float32_reference(tiny, windows: torch.Tensor) -> None:
    model, _ = tiny
    low = copy.deepcopy(model).to(torch.bfloat16)
    result = evaluate(low, windows, reference=model)
    assert 0 < result.kl < 0.05
    assert result.nll == pytest.approx(evaluate(model, windows).nll, rel=0.05)


def test_short_windows_and_end_to_end(tiny, stories_dir: Path) -> None:
    model, tokenizer = tiny
    spec = DataSpec.parse(f"text:{stories_dir / 'tinystories_validation0.txt'}")
    ids = tokenizer(load_text(spec))["input_ids"]
    windows = eval_windows(spec, tokenizer, seq_len=4096)  # longer than the text: one short window
    assert windows.shape == (1, len(ids))
    result = evaluate(model, windows)
    assert result.tokens == len(ids) - 1
    assert result.nll == pytest.approx(manual_nll(model, windows), rel=1e-6)
    two = torch.tensor([[ids[0], ids[1]]])
    assert evaluate(model, two).tokens == 1


def test_result_to_dict(tiny, windows: torch.Tensor) -> None:
    model, _ = tiny
    result = evaluate(model, windows[:2], reference=model)
    d = result.to_dict()
    assert set(d) == {"perplexity", "nll", "tokens", "kl"}
    assert json.loads(json.dumps(d)) == d
    assert EvalResult(**d) == result


def test_progress_and_modes_restored(tiny, windows: torch.Tensor, capsys: pytest.CaptureFixture) -> None:
    model, _ = tiny
    expected = evaluate(model, windows, batch_size=2)
    model.train()
    try:
        result = evaluate(model, windows, batch_size=2, progress=True)
        assert model.training
    finally:
        model.eval()
    assert result == expected
    assert capsys.readouterr().out == ""  # the progress bar goes to stderr only


def test_plain_module_returning_logits() -> None:
    class Bigram(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Embedding(5, 5)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.table(input_ids)

    torch.manual_seed(0)
    model = Bigram()
    windows = torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]])
    logits = model.table.weight.double()[windows[:, :-1]]
    nll = F.cross_entropy(logits.reshape(-1, 5), windows[:, 1:].reshape(-1)).item()
    assert evaluate(model, windows).nll == pytest.approx(nll, rel=1e-9)


class FixedLogits(torch.nn.Module):
    """Predicts the same distribution at every position."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*input_ids.shape, -1)


def test_kl_direction_is_reference_to_model() -> None:
    p = [0.5, 0.5, 0.0, 0.0]  # the reference: two likely tokens
    q = [0.7, 0.1, 0.1, 0.1]  # the model
    reference = FixedLogits([math.log(x) if x else -1e9 for x in p])
    model = FixedLogits([math.log(x) for x in q])
    windows = torch.zeros(3, 5, dtype=torch.long)
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi)  # KL(p || q)
    reverse = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q, strict=True) if pi)  # finite part of KL(q || p)
    result = evaluate(model, windows, reference=reference)
    assert result.kl == pytest.approx(expected, rel=1e-6)
    assert result.kl != pytest.approx(reverse, rel=1e-2)
    assert result.nll == pytest.approx(-math.log(0.7), rel=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, dtype=torch.long),
        torch.zeros(0, 5, dtype=torch.long),
        torch.zeros(2, 1, dtype=torch.long),
        torch.zeros(2, 4),
    ],
)
def test_bad_windows(tiny, bad: torch.Tensor) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match="windows"):
        evaluate(model, bad)


def test_bad_batch_size(tiny, windows: torch.Tensor) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, windows, batch_size=0)


def test_stories260k(request: pytest.FixtureRequest, stories_dir: Path) -> None:
    """The converted stories260K model on its own in-domain samples: a low perplexity (once llama2c exists)."""
    hf_dir = request.getfixturevalue("stories_hf")
    model, tokenizer = load_model(str(hf_dir))
    windows = eval_windows(f"text:{stories_dir / 'sampled_seed1.txt'}", tokenizer, seq_len=256, max_windows=8)
    result = evaluate(model, windows, reference=model)
    assert result.kl == pytest.approx(0.0, abs=1e-9)
    # A working conversion predicts its own samples well; a broken one is near log(512) = 6.2 or worse.
    assert result.nll < 2.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_against_cpu_reference(tiny, windows: torch.Tensor, perturbed) -> None:
    model, _ = tiny
    on_gpu = copy.deepcopy(perturbed).to("cuda")
    expected = evaluate(perturbed, windows, reference=model)
    result = evaluate(on_gpu, windows, reference=model, batch_size=3)
    assert result.nll == pytest.approx(expected.nll, rel=1e-4)
    assert result.kl == pytest.approx(expected.kl, rel=1e-3)
