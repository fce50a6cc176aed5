"""quantplan.workers.evaluate: perplexity and KL against manual float64 computations on tiny random models, the
chunked-head path against the full-logits path on every recognised architecture, memory-sized batches, progress."""

from __future__ import annotations

import copy
import json
import math
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from quantplan.workers import evaluate as evaluate_module
from quantplan.workers.data import DataSpec, eval_windows, load_text
from quantplan.workers.evaluate import CHUNKED_LMS, EvalResult, eval_memory, evaluate, evaluate_many, merge_results
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


def test_many_models_in_one_pass_equal_one_evaluation_each(tiny, windows: torch.Tensor, perturbed) -> None:
    """evaluate_many runs the reference once per batch for every model and gives evaluate's numbers exactly."""
    model, _ = tiny
    calls = []
    base, results = evaluate_many(model, [perturbed, model], windows, batch_size=3,
                                  on_progress=lambda done, total: calls.append((done, total)))
    assert base == evaluate(model, windows, batch_size=3)
    assert results == [evaluate(perturbed, windows, reference=model, batch_size=3),
                       evaluate(model, windows, reference=model, batch_size=3)]
    assert results[0].kl > 1e-4 and abs(results[1].kl) < 1e-9
    assert calls == [(0, 7), (3, 7), (6, 7), (7, 7)]
    # results on disjoint windows merge into the result on all of them (token-weighted)
    parts = [evaluate(perturbed, w, reference=model) for w in windows.split([2, 5])]
    merged = merge_results(parts)
    assert merged.tokens == results[0].tokens
    assert merged.nll == pytest.approx(results[0].nll, rel=1e-12)
    assert merged.kl == pytest.approx(results[0].kl, rel=1e-12)
    assert merged.perplexity == pytest.approx(results[0].perplexity, rel=1e-12)
    # without a reference: each model's perplexity alone, no KL, no reference result
    none, alone = evaluate_many(None, [perturbed, model], windows, batch_size=3)
    assert none is None and alone == [evaluate(perturbed, windows, batch_size=3), base]


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


# --- chunked loss over the vocabulary: the head applied to chunks of positions --------------------------------

TINY_VOCAB = 96


def _tiny_lm(arch: str, **overrides: object) -> torch.nn.Module:
    """A tiny random causal LM of each architecture `CHUNKED_LMS` names (OPT with a project_out)."""
    import transformers as tf

    common = dict(vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    llama_like = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    torch.manual_seed(0)
    if arch == "opt":
        config = tf.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,  # != hidden: the decoder ends with project_in/project_out
            max_position_embeddings=64,
            **common,
        )
        return tf.OPTForCausalLM(config).eval()
    if arch == "gpt_neox":
        config = tf.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            **common,
        )
        return tf.GPTNeoXForCausalLM(config).eval()
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common)).eval()
    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    return model_cls(config_cls(**{**llama_like, **common, **overrides})).eval()


def _nudged(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A copy with every parameter moved a little, final norm and head included."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return other


class HeadInputs:
    """Records the shape of every input the model's `lm_head` sees and the size of every output it gives."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.inputs: list[tuple[int, ...]] = []
        self.outputs: list[int] = []
        self._handle = model.lm_head.register_forward_hook(self._record)

    def _record(self, _module, args, out) -> None:
        self.inputs.append(tuple(args[0].shape))
        self.outputs.append(out.numel())

    def close(self) -> None:
        self._handle.remove()


def _run(model, windows, **kwargs) -> tuple[EvalResult, HeadInputs]:
    seen = HeadInputs(model)
    try:
        return evaluate(model, windows, **kwargs), seen
    finally:
        seen.close()


@pytest.fixture(scope="module")
def lm_windows() -> torch.Tensor:
    return torch.randint(2, TINY_VOCAB, (5, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "opt", "gpt_neox", "gpt2"])
def test_chunked_equals_full_logits_on_every_architecture(
    arch: str, lm_windows: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _tiny_lm(arch)
    assert type(model).__name__ in CHUNKED_LMS
    other = _nudged(model)
    ref_seen = HeadInputs(model)
    full, full_seen = _run(other, lm_windows, reference=model, batch_size=2, chunked=False)
    ref_seen.close()
    for seen in (full_seen, ref_seen):  # [B, L, H]: whole batches through both models' heads
        assert [shape[:2] for shape in seen.inputs] == [(2, 24), (2, 24), (1, 24)]
    # 5 positions per chunk: several chunks per row, a short last one
    monkeypatch.setattr(evaluate_module, "_CHUNK_ELEMENTS", 5 * TINY_VOCAB)
    ref_seen = HeadInputs(model)
    chunked, seen = _run(other, lm_windows, reference=model, batch_size=2)
    ref_seen.close()
    for one in (seen, ref_seen):
        assert one.inputs and all(len(shape) == 2 and shape[0] <= 5 for shape in one.inputs)
        assert sum(shape[0] for shape in one.inputs) == 5 * 23  # only the predicting positions, each once
        assert max(one.outputs) <= 5 * TINY_VOCAB
    assert chunked.tokens == full.tokens
    assert chunked.perplexity == pytest.approx(full.perplexity, rel=1e-6)
    assert chunked.kl == pytest.approx(full.kl, rel=1e-6)
    assert chunked.kl > 1e-4
    # and both equal the float64 computation on the model's own logits
    assert chunked.nll == pytest.approx(manual_nll(other, lm_windows), rel=1e-6)
    assert chunked.kl == pytest.approx(manual_kl(model, other, lm_windows), rel=1e-6)


def test_tiny_llama_takes_the_chunked_path(tiny, windows: torch.Tensor) -> None:
    model, _ = tiny
    result, seen = _run(model, windows, batch_size=4)
    assert seen.inputs == [(23, model.config.hidden_size)] * 7  # one chunk per row, never a [B, L, V] batch
    assert result.nll == pytest.approx(manual_nll(model, windows), rel=1e-6)


def test_replaced_head_is_called(lm_windows: torch.Tensor) -> None:
    """A quantized lm_head (FakeQuantLinear or the packed QuantLinear) is the module the chunks go through."""
    from quantplan.quant.modules import FakeQuantLinear
    from quantplan.quant.plan import LayerSpec
    from quantplan.quant.qlinear import QuantLinear
    from quantplan.quant.schemes import LayerScheme

    model = _tiny_lm("llama")
    before = evaluate(model, lm_windows)
    spec = LayerSpec(LayerScheme.parse("w4g32:a8-dynamic"))
    for head in (
        FakeQuantLinear.from_module(model.lm_head, spec),
        QuantLinear.from_float(model.lm_head.weight, None, spec),
    ):
        quantized = copy.deepcopy(model)
        quantized.lm_head = head
        chunked, seen = _run(quantized, lm_windows, reference=model)
        assert seen.inputs and all(len(shape) == 2 for shape in seen.inputs)
        full = evaluate(quantized, lm_windows, reference=model, chunked=False)
        assert chunked.nll == pytest.approx(full.nll, rel=1e-6)
        assert chunked.kl == pytest.approx(full.kl, rel=1e-6)
        assert chunked.kl > 1e-5 and chunked.nll != pytest.approx(before.nll, rel=1e-6)


class ScaledLlama(LlamaForCausalLM):
    """A subclass whose forward changes the logits after the head: only its own forward is faithful."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_unrecognised_models_use_their_full_forward(lm_windows: torch.Tensor) -> None:
    base = _tiny_lm("llama")
    scaled = ScaledLlama(base.config).eval()
    scaled.load_state_dict(base.state_dict())
    softcapped = copy.deepcopy(base)
    softcapped.config.final_logit_softcapping = 30.0
    wrapped_head = copy.deepcopy(base)
    wrapped_head.lm_head = torch.nn.Sequential(base.lm_head)
    for model in (scaled, softcapped):
        result, seen = _run(model, lm_windows, batch_size=5)
        assert seen.inputs == [(5, 24, 64)]  # the model's own forward, on the whole batch
        assert result.nll == pytest.approx(manual_nll(model, lm_windows), rel=1e-6)
    assert evaluate(scaled, lm_windows).nll != pytest.approx(evaluate(base, lm_windows).nll, rel=1e-3)
    assert evaluate(wrapped_head, lm_windows).nll == pytest.approx(manual_nll(base, lm_windows), rel=1e-6)
    hooked = copy.deepcopy(base)
    hooked.register_forward_hook(lambda _m, _a, out: setattr(out, "logits", out.logits * 2) or out)
    assert evaluate(hooked, lm_windows).nll == pytest.approx(manual_nll(hooked, lm_windows), rel=1e-6)


def test_chunked_model_against_full_logits_reference(lm_windows: torch.Tensor) -> None:
    """One model chunked, the other (a plain module) on full logits: the KL still pairs the same positions."""
    model = _tiny_lm("gpt2")

    class Plain(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids).logits

    other = _nudged(model)
    expected = manual_kl(model, other, lm_windows)
    assert evaluate(other, lm_windows, reference=Plain(model)).kl == pytest.approx(expected, rel=1e-6)
    assert evaluate(Plain(other), lm_windows, reference=model).kl == pytest.approx(expected, rel=1e-6)


def test_reference_vocabulary_must_match(lm_windows: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        evaluate(_tiny_lm("llama"), lm_windows, reference=FixedLogits([0.0] * 7))


# --- batch size from a memory budget, progress callback --------------------------------------------------------


def _batches(model, windows, **kwargs) -> tuple[EvalResult, list[tuple[int, int]]]:
    calls: list[tuple[int, int]] = []
    result = evaluate(model, windows, on_progress=lambda done, total: calls.append((done, total)), **kwargs)
    return result, calls


def test_progress_callback_reports_windows(tiny, windows: torch.Tensor) -> None:
    model, _ = tiny
    expected = evaluate(model, windows, batch_size=2)
    for bar in (False, True):
        result, calls = _batches(model, windows, batch_size=2, progress=bar)
        assert calls == [(0, 7), (2, 7), (4, 7), (6, 7), (7, 7)]
        assert result == expected

    class Cancelled(Exception):
        pass

    def cancel(done: int, total: int) -> None:
        if done >= 4:
            raise Cancelled

    with pytest.raises(Cancelled):
        evaluate(model, windows, batch_size=2, on_progress=cancel)


def tied(model: torch.nn.Module) -> bool:
    return model.lm_head.weight is model.get_input_embeddings().weight


def test_memory_model_shape() -> None:
    model = _tiny_lm("llama", tie_word_embeddings=True)
    chunked = eval_memory(model, 512)
    full = eval_memory(model, 512, chunked=False)
    both = eval_memory(model, 512, reference=_nudged(model))
    assert chunked is not None and full is not None and both is not None
    assert tied(model)  # the tied head and embedding are one tensor, counted once
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert chunked.weights == weights
    assert both.weights == 2 * weights
    assert eval_memory(model, 512, reference=model).weights == weights  # one model counted once
    # the full path keeps [L, V] logits per window, the chunked one [L, H] hidden states
    assert full.per_window - chunked.per_window == 512 * 4 * (TINY_VOCAB - 64)
    assert chunked.peak(3) == chunked.weights + 3 * chunked.per_window + chunked.logits_chunk
    assert eval_memory(FixedLogits([0.0, 1.0]), 16) is None


def test_max_memory_sizes_the_batch(tiny, windows: torch.Tensor, perturbed) -> None:
    model, _ = tiny
    memory = eval_memory(perturbed, windows.shape[1], reference=model)
    assert memory is not None
    expected = evaluate(perturbed, windows, reference=model, batch_size=7)
    for budget, sizes in [
        (memory.peak(3), [3, 3, 1]),
        (memory.peak(3) - 1, [2, 2, 2, 1]),
        (memory.peak(7) * 10, [7]),
        (1, [1] * 7),  # nothing fits: one window at a time
    ]:
        result, calls = _batches(perturbed, windows, reference=model, max_memory=budget)
        done = [d for d, _ in calls]
        assert [b - a for a, b in pairwise(done)] == sizes, budget
        assert result.nll == pytest.approx(expected.nll, rel=1e-6)
        assert result.kl == pytest.approx(expected.kl, rel=1e-5)
    # without a budget, 8 windows per batch; an explicit batch_size wins over a budget
    assert [d for d, _ in _batches(model, torch.cat([windows, windows]))[1]] == [0, 8, 14]
    assert [d for d, _ in _batches(model, windows, batch_size=5, max_memory=1)[1]] == [0, 5, 7]
    # a model with no config to size from goes one window at a time
    plain = _batches(FixedLogits([0.0, 1.0]), torch.zeros(3, 4, dtype=torch.long), max_memory=10**9)[1]
    assert [d for d, _ in plain] == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_bad_max_memory(tiny, windows: torch.Tensor, bad) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match="max_memory"):
        evaluate(model, windows, max_memory=bad)
