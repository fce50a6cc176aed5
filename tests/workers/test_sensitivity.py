"""Sensitivity maths: Fisher estimator, weight/activation costs, statistics, and that the proxy predicts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from quantplan.quant.apply import apply_plan, quantizable_modules
from quantplan.quant.modules import linear_weight
from quantplan.quant.plan import Plan
from quantplan.quant.quantizers import fake_quantize_weight
from quantplan.quant.schemes import ActScheme, WeightScheme
from quantplan.workers.data import calibration_set, eval_windows
from quantplan.workers.evaluate import evaluate
from quantplan.workers.models import load_model
from quantplan.workers.sensitivity import (
    ACT_SCHEMES,
    HIST_EDGES,
    ActStats,
    FisherSums,
    act_quant_error,
    act_set_start,
    block_costs,
    chunked_nll,
    collect_act_stats,
    fisher_sums,
    layer_act_params,
    lm_split,
    pass_windows,
    percentile_from_hist,
    sensitivity_pass,
    spearman,
    weight_costs,
)


def _tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    return _tiny_llama(64)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(2, 64, (4, 12), generator=torch.Generator().manual_seed(1))


def test_fisher_is_mean_of_token_scaled_squared_microbatch_gradients(tiny, tokens) -> None:
    stats = collect_act_stats(tiny, tokens)
    params = layer_act_params(tiny, stats)
    sums = fisher_sums(copy.deepcopy(tiny), tokens, params, micro_batch=2)
    assert sums.batches == 2 and sums.tokens == 4 * 11
    name = "model.layers.1.mlp.down_proj"
    expected = torch.zeros_like(linear_weight(dict(tiny.named_modules())[name]))
    for batch in tokens.split(2):
        model = copy.deepcopy(tiny)
        model(input_ids=batch, labels=batch).loss.backward()
        expected += batch[:, 1:].numel() * dict(model.named_modules())[name].weight.grad ** 2
    torch.testing.assert_close(sums.fisher[name], expected, rtol=1e-4, atol=1e-12)


def test_fisher_is_the_same_with_one_product_per_microbatch(tiny, tokens, monkeypatch) -> None:
    """Small layers get their per-micro-batch gradients from one bmm, large ones from a loop: same sums."""
    import quantplan.workers.sensitivity as sensitivity

    params = layer_act_params(tiny, collect_act_stats(tiny, tokens))
    batched = fisher_sums(copy.deepcopy(tiny), tokens, params, micro_batch=1)
    monkeypatch.setattr(sensitivity, "_FISHER_BMM_MAX", 0)
    looped = fisher_sums(copy.deepcopy(tiny), tokens, params, micro_batch=1)
    for name, f in looped.fisher.items():
        torch.testing.assert_close(batched.fisher[name], f, rtol=1e-5, atol=1e-12)


def test_statistics_through_the_trunk_equal_the_full_model(tiny, tokens) -> None:
    """The statistics pass skips the LM head; every layer input, hence every statistic, is unchanged."""
    from quantplan.workers.sensitivity import _observe

    stats = collect_act_stats(tiny, tokens)  # one batch, as below
    expected = ActStats()
    modules = quantizable_modules(tiny)
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: _observe(expected, n, a[0])) for n, m in modules.items()]
    with torch.no_grad():
        tiny(input_ids=tokens, use_cache=False)
    for h in hooks:
        h.remove()
    assert set(stats.channel_absmax) == set(modules)
    for name in modules:
        torch.testing.assert_close(stats.channel_absmax[name], expected.channel_absmax[name])
        assert torch.equal(stats.hist[name], expected.hist[name])
    assert stats.feeders["model.layers.0.self_attn.q_proj"] == "model.layers.0.input_layernorm"


def test_activation_cost_matches_manual_hook_computation(tiny, tokens) -> None:
    stats = collect_act_stats(tiny, tokens)
    params = layer_act_params(tiny, stats)
    sums = fisher_sums(copy.deepcopy(tiny), tokens, params, micro_batch=4)
    name = "model.layers.0.self_attn.o_proj"
    model = copy.deepcopy(tiny)
    m2 = dict(model.named_modules())[name]
    cache = {}

    def keep_output(_m, _a, out):
        out.retain_grad()
        cache["y"] = out

    m2.register_forward_pre_hook(lambda _m, a: cache.__setitem__("x", a[0]))
    m2.register_forward_hook(keep_output)
    model(input_ids=tokens, labels=tokens).loss.backward()
    # dL/dx through this layer only: y = x W^T, so dL/dx = dL/dy W
    gx = cache["y"].grad @ m2.weight
    t_b = tokens[:, 1:].numel()
    for i, a in enumerate(ACT_SCHEMES):
        err = act_quant_error(cache["x"].detach(), a, params[name])
        manual = 0.5 * t_b * (gx.pow(2) * err.pow(2)).sum()
        assert float(sums.act_cost[name][i]) == pytest.approx(float(manual.detach()), rel=1e-4)


def _reference_pass(model, tokens, start: int, micro_batch: int) -> tuple[ActStats, FisherSums]:
    """Estimator v3's two passes, restricted: statistics over every token, Fisher sums over every token and
    activation costs over tokens[start:] only (what the fused pass must reproduce)."""
    stats = collect_act_stats(model, tokens)
    params = layer_act_params(model, stats)
    sums = FisherSums()
    if start:
        sums.merge(fisher_sums(copy.deepcopy(model), tokens[:start], micro_batch=micro_batch))
    return stats, sums.merge(fisher_sums(copy.deepcopy(model), tokens[start:], params, micro_batch=micro_batch))


@pytest.mark.parametrize(("samples", "micro_batch", "act_samples", "batch_size"), [
    (4, 1, None, None),  # the act set is every sequence, one forward batch: no statistics forward at all
    (8, 1, 3, None),  # sequences before the act set run Fisher-only and record their statistics
    (9, 2, 4, 2),  # an act set of three batches held at once, the last a short micro-batch
    (12, 1, 7, 1),  # an act set of 7 batches: 4 held at once, the other 3 get a statistics forward first
    (5, 2, 2, 8),  # a short micro-batch after the act set's only whole one
])
def test_fused_pass_equals_statistics_then_fisher(tiny, samples, micro_batch, act_samples, batch_size) -> None:
    """One forward per token gives the same statistics, Fisher sums and activation costs (on the act set) as a
    statistics forward over every token followed by the Fisher pass."""
    tokens = torch.randint(2, 64, (samples, 12), generator=torch.Generator().manual_seed(samples))
    start = act_set_start(tokens, micro_batch, act_samples)
    assert start == (0 if act_samples is None else (samples - act_samples) // micro_batch * micro_batch)
    counted: list[int] = []
    stats, sums = sensitivity_pass(copy.deepcopy(tiny), tokens, micro_batch=micro_batch, act_samples=act_samples,
                                   batch_size=batch_size, on_windows=counted.append)
    # progress: every sequence is counted once per pass it goes through, as pass_windows predicts
    expected = pass_windows(tiny, tokens, micro_batch=micro_batch, act_samples=act_samples, batch_size=batch_size)
    assert sum(counted) == expected >= samples and all(k > 0 for k in counted)
    assert (expected > samples) == (samples == 12)  # only the long act set takes a statistics forward
    ref_stats, ref = _reference_pass(tiny, tokens, start, micro_batch)
    assert stats.feeders == ref_stats.feeders and stats.feeders
    for name in ref_stats.channel_absmax:
        assert torch.equal(stats.channel_absmax[name], ref_stats.channel_absmax[name])
        assert torch.equal(stats.hist[name], ref_stats.hist[name])
    assert (sums.batches, sums.act_batches, sums.tokens) == (ref.batches, ref.act_batches, ref.tokens)
    assert sums.act_batches == -(-(samples - start) // micro_batch) < sums.batches or start == 0
    assert sums.loss_sum == pytest.approx(ref.loss_sum, rel=1e-5)
    for name, f in ref.fisher.items():
        torch.testing.assert_close(sums.fisher[name], f, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(sums.act_cost[name], ref.act_cost[name], rtol=1e-4, atol=1e-12)


@pytest.fixture(scope="module")
def wide_vocab() -> LlamaForCausalLM:
    """A tiny Llama whose vocabulary (3,000) dwarfs its width, as real LMs' do."""
    return _tiny_llama(3000)


@pytest.mark.parametrize(("micro_batch", "act_samples", "batch_size"), [(1, 3, 2), (2, None, None)])
def test_chunked_loss_equals_full_logits(wide_vocab, monkeypatch, micro_batch, act_samples, batch_size) -> None:
    """The loss over the vocabulary in chunks (the head never runs on a whole batch) gives the same statistics,
    Fisher sums, activation costs and loss as the model's full logits, to 1e-5 relative."""
    import quantplan.workers.sensitivity as sensitivity

    monkeypatch.setattr(sensitivity, "LOSS_CHUNK_ELEMENTS", 7 * 3000)  # 7 positions per chunk: many chunks
    tokens = torch.randint(2, 3000, (6, 16), generator=torch.Generator().manual_seed(3))
    head_calls = []
    hook = wide_vocab.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    try:
        stats, sums = sensitivity_pass(copy.deepcopy(wide_vocab), tokens, micro_batch=micro_batch,
                                       act_samples=act_samples, batch_size=batch_size)
        assert not head_calls  # no [tokens, vocab] logits from the head
        monkeypatch.setattr(sensitivity, "lm_split", lambda _model: None)
        ref_stats, ref = sensitivity_pass(copy.deepcopy(wide_vocab), tokens, micro_batch=micro_batch,
                                          act_samples=act_samples, batch_size=batch_size)
        assert head_calls
    finally:
        hook.remove()
    assert (sums.batches, sums.act_batches, sums.tokens) == (ref.batches, ref.act_batches, ref.tokens)
    assert sums.loss_sum == pytest.approx(ref.loss_sum, rel=1e-6)
    for name in ref.fisher:
        assert torch.equal(stats.channel_absmax[name], ref_stats.channel_absmax[name])
        torch.testing.assert_close(sums.fisher[name], ref.fisher[name], rtol=1e-5, atol=0)
        torch.testing.assert_close(sums.act_cost[name], ref.act_cost[name], rtol=1e-5, atol=0)


def test_chunked_nll_gradients_equal_cross_entropy() -> None:
    """Loss and the gradients of hidden states, head weight and bias equal cross-entropy over full logits."""
    gen = torch.Generator().manual_seed(0)
    h, w, b = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((19, 8), (50, 8), (50,)))
    y = torch.randint(0, 50, (19,), generator=gen)
    grads = []
    for loss_fn in (lambda h, w, b: chunked_nll(h, w, b, y),
                    lambda h, w, b: F.cross_entropy(F.linear(h, w, b), y, reduction="sum")):
        args = [t.clone().requires_grad_(True) for t in (h, w, b)]
        loss = loss_fn(*args)
        (2.5 * loss).backward()
        grads.append((loss.detach(), *(a.grad for a in args)))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_lm_split_only_where_the_logits_are_the_head_of_the_trunk(wide_vocab) -> None:
    trunk, head = lm_split(wide_vocab)
    assert trunk is wide_vocab.model and head is wide_vocab.lm_head
    capped = copy.deepcopy(wide_vocab)
    capped.config.final_logit_softcapping = 30.0
    assert lm_split(capped) is None
    assert lm_split(torch.nn.Sequential(torch.nn.Linear(4, 4))) is None


def test_act_set_start_keeps_whole_micro_batches() -> None:
    tokens = torch.zeros(10, 128, dtype=torch.long)  # one forward batch is 32 sequences of 128
    assert act_set_start(tokens) == 0
    assert act_set_start(tokens, act_samples=4) == 6
    assert act_set_start(tokens, micro_batch=4, act_samples=3) == 4  # widened to whole micro-batches
    assert act_set_start(torch.zeros(100, 128, dtype=torch.long)) == 68


def test_weight_costs_pick_the_best_clip_and_blocks_sum_to_cost() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(2.5).sample((16, 128))
    f = torch.rand(16, 128, generator=gen)
    costs = weight_costs(w, f, (WeightScheme.parse("w3g64"), WeightScheme.parse("w8"), WeightScheme.parse("w4g32a")))
    for name, c in costs.items():
        scheme = WeightScheme.parse(name)
        manual = 0.5 * (f * (w - fake_quantize_weight(w, scheme, c.clip)) ** 2).sum()
        assert c.cost == pytest.approx(float(manual), rel=1e-5)
        assert float(c.blocks.float().sum()) == pytest.approx(c.cost, rel=1e-2)  # fp16 block scores
        assert c.blocks.shape == (16, 128 // scheme.group_size(128))
        assert c.cost <= float(block_costs(w, f, scheme, 1.0).double().sum()) * (1 + 1e-6)  # clipping never hurts
    assert costs["w3g64"].clip < 1.0 and costs["w8"].clip == 1.0
    assert costs["w8"].cost < costs["w4g32a"].cost < costs["w3g64"].cost


def test_schemes_with_group_larger_than_k_are_left_out() -> None:
    costs = weight_costs(torch.randn(4, 64), torch.ones(4, 64))
    assert "w4g128" not in costs and "w4g64" in costs and "w4" in costs


def test_percentile_from_histogram() -> None:
    from quantplan.workers.sensitivity import _observe

    x = torch.randn(2000, 32).abs() * 3
    stats = ActStats()
    _observe(stats, "l", x[:1000])
    _observe(stats, "l", x[1000:])
    assert float(stats.channel_absmax["l"].max()) == pytest.approx(float(x.max()))
    for q in (99.0, 99.9):
        exact = float(torch.quantile(x.flatten(), q / 100))
        approx = percentile_from_hist(stats.hist["l"], q)
        step = float(HIST_EDGES[1] / HIST_EDGES[0])
        assert exact <= approx * 1.0001 and approx <= exact * step * 1.0001


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def stories_proxy(stories_hf, stories_dir, tmp_path_factory):
    """Sensitivities of stories260K (in process) and held-out windows to measure against: the first 40 of the
    64 sampled stories calibrate, the last 24 are held out."""
    torch.manual_seed(0)
    model, tok = load_model(str(stories_hf))
    lines = (stories_dir / "sampled_seed1.txt").read_text(encoding="utf-8").splitlines()
    tmp = tmp_path_factory.mktemp("stories_split")
    (tmp / "calib.txt").write_text("\n".join(lines[:40]), encoding="utf-8")
    (tmp / "heldout.txt").write_text("\n".join(lines[40:]), encoding="utf-8")
    calib = calibration_set(f"text:{tmp / 'calib.txt'}", tok, samples=16, seq_len=128, seed=0)
    held_out = eval_windows(f"text:{tmp / 'heldout.txt'}", tok, seq_len=128, max_windows=24)
    stats = collect_act_stats(model, calib.tokens)
    params = layer_act_params(model, stats)
    sums = fisher_sums(copy.deepcopy(model), calib.tokens, params, micro_batch=1)
    return model, calib.tokens, held_out, sums


def _measured_kl(model, plan, calib, held_out) -> float:
    quantized = copy.deepcopy(model)
    apply_plan(quantized, plan, calib)
    return evaluate(quantized, held_out, reference=model, batch_size=24).kl


def test_weight_proxy_ranks_single_layer_changes(stories_proxy) -> None:
    """Acceptance: Spearman(predicted, measured) >= 0.8 over layers x weight schemes (a sample here)."""
    model, calib, held_out, sums = stories_proxy
    layers = list(quantizable_modules(model).items())[::4]  # 9 of 35 layers, every kind and depth
    predicted, measured = [], []
    for name, module in layers:
        costs = weight_costs(linear_weight(module), sums.fisher[name] / sums.batches,
                             tuple(WeightScheme.parse(s) for s in ("w2g32", "w3g64", "w4g32", "w4", "w8")))
        for scheme, c in costs.items():
            predicted.append(c.cost)
            measured.append(_measured_kl(model, Plan.from_layers({name: {"scheme": scheme, "clip": c.clip}}),
                                         calib, held_out))
    assert spearman(predicted, measured) >= 0.8


def test_activation_proxy_ranks_single_layer_changes(stories_proxy) -> None:
    """Acceptance: Spearman(predicted, measured) >= 0.7 over layers x activation schemes (a sample here)."""
    model, calib, held_out, sums = stories_proxy
    predicted, measured = [], []
    for name in list(quantizable_modules(model))[1::5]:
        for i, act in enumerate(ACT_SCHEMES):
            predicted.append(float(sums.act_cost[name][i]) / sums.batches)
            measured.append(_measured_kl(model, Plan.from_layers({name: f"w16:{act.value}"}), calib, held_out))
    assert spearman(predicted, measured) >= 0.7
    assert ActScheme.DYNAMIC in ACT_SCHEMES
