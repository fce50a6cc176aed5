"""W4A8 kernel (design B) and its torch reference against float64, for every group size, symmetric and asymmetric."""

from __future__ import annotations

import pytest
import torch

from quantplan.quant.kernels.act_quant import quantize_act_ref
from quantplan.quant.kernels.runtime import UnsupportedSchemeError
from quantplan.quant.kernels.w4a8 import (
    CONFIGS,
    DEQUANT_ROWS_PER_GROUP_WIDTH,
    KEYS,
    _w4a8_kernel,
    prepare,
    prune,
    w4a8_cpu,
    w4a8_dequant,
    w4a8_ref,
    w4a8_triton,
)
from tests.quant.kernels.reference import FP16_TOL, TOL, make_weight, poisoned, ref_a8, rel_err, seeded

N, K = 72, 200  # N spans a partial BLOCK_N tile; K is no multiple of any group, so the last group is padded


def run(backend: str, x_q, x_scale, pw, bias=None, out_dtype=torch.float32, **kw) -> torch.Tensor:
    if backend == "torch":
        return w4a8_ref(x_q, x_scale, pw, bias, out_dtype)
    out = poisoned((x_q.shape[0], pw.out_features), out_dtype)
    return w4a8_triton(x_q, x_scale, pw, bias, out_dtype, out=out, **kw)


def activations(m: int, k: int, gen: torch.Generator, per_token: bool):
    x = torch.randn(m, k, generator=gen) * (1 + 3 * torch.rand(m, 1, generator=gen))
    return quantize_act_ref(x, None if per_token else torch.tensor(0.05))


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("group", ["g32", "g64", "g128", ""])
@pytest.mark.parametrize("asym", [False, True])
def test_matches_float64(backend: str, m: int, group: str, asym: bool) -> None:
    scheme = f"w4{group}{'a' if asym else ''}"
    gen = seeded("w4a8", m, scheme)
    qw, pw = make_weight(N, K, scheme, gen)
    bias = torch.randn(N, generator=gen) if m % 2 else None
    for per_token in (True, False):
        x_q, x_scale = activations(m, K, gen, per_token)
        y = run(backend, x_q, x_scale, pw, bias)
        assert y.dtype == torch.float32 and rel_err(y, ref_a8(x_q, x_scale, qw, bias)) <= TOL


@pytest.mark.parametrize("scheme", ["w2g32", "w2g64a", "w2", "w8g32", "w8g128", "w4g128a"])
def test_other_widths(backend: str, scheme: str) -> None:
    gen = seeded("widths", scheme)
    qw, pw = make_weight(40, 300, scheme, gen)
    x_q, x_scale = activations(17, 300, gen, per_token=True)
    assert rel_err(run(backend, x_q, x_scale, pw), ref_a8(x_q, x_scale, qw, None)) <= TOL


@pytest.mark.parametrize("scheme", ["w4g32", "w4g64a", "w4g128a", "w4", "w4a", "w8g32", "w2g64a"])
@pytest.mark.parametrize("per_token", [True, False])
def test_dequantized_float_gemm_matches_the_reference(scheme: str, per_token: bool) -> None:
    """The CPU path's float GEMM on dequantized weights gives the reference's numbers to float rounding,
    against float64 too, with the prepared weight or without."""
    gen = seeded("cpu", scheme, per_token)
    qw, pw = make_weight(N, K, scheme, gen)
    bias = torch.randn(N, generator=gen)
    x_q, x_scale = activations(150, K, gen, per_token)
    y = w4a8_dequant(x_q, x_scale, pw, bias)
    assert rel_err(y, w4a8_ref(x_q, x_scale, pw, bias).double()) <= 1e-6
    assert rel_err(y, ref_a8(x_q, x_scale, qw, bias)) <= TOL
    assert torch.equal(w4a8_dequant(x_q, x_scale, pw, bias, prepared=prepare(pw)), y)
    half = w4a8_dequant(x_q, x_scale, pw, bias.half(), torch.float16)
    assert half.dtype == torch.float16 and rel_err(half, ref_a8(x_q, x_scale, qw, bias)) <= FP16_TOL


@pytest.mark.parametrize(("scheme", "rows", "dequantized"), [
    ("w4g32", 8 * 32, True), ("w4g32", 8 * 32 - 1, False), ("w4g128a", 8 * 128, True), ("w4", 2000, False)])
def test_cpu_path_picks_the_float_gemm_for_many_rows_of_grouped_weights(scheme: str, rows: int,
                                                                        dequantized: bool) -> None:
    gen = seeded("pick", scheme, rows)
    _, pw = make_weight(N, K, scheme, gen)
    x_q, x_scale = activations(rows, K, gen, per_token=True)
    assert rows >= DEQUANT_ROWS_PER_GROUP_WIDTH * pw.group_size or not dequantized
    want = (w4a8_dequant if dequantized else w4a8_ref)(x_q, x_scale, pw)
    assert torch.equal(w4a8_cpu(x_q, x_scale, pw), want)


def test_fp16_output(backend: str) -> None:
    gen = seeded("fp16-out")
    qw, pw = make_weight(N, K, "w4g64a", gen)
    x_q, x_scale = activations(17, K, gen, per_token=True)
    bias = torch.randn(N, generator=gen).half()
    y = run(backend, x_q, x_scale, pw, bias, torch.float16)
    ref = ref_a8(x_q, x_scale, qw, bias)
    assert y.dtype == torch.float16
    assert ((y.double() - ref).abs() <= FP16_TOL * ref.abs() + TOL * ref.abs().max()).all()


@pytest.mark.parametrize("scheme", ["w4g32", "w4g128a", "w4"])
def test_triton_matches_torch_path(scheme: str) -> None:
    pytest.importorskip("triton")
    gen = seeded("cross", scheme)
    _, pw = make_weight(N, K, scheme, gen)
    x_q, x_scale = activations(17, K, gen, per_token=True)
    assert rel_err(run("triton", x_q, x_scale, pw), run("torch", x_q, x_scale, pw)) <= TOL


@pytest.mark.parametrize("scheme", ["w4g32a", "w4"])
def test_torch_path_row_blocks_and_prepared_weight(scheme: str) -> None:
    """The CPU path multiplies 64 rows at a time; a weight prepared once gives the same result."""
    gen = seeded("rows", scheme)
    qw, pw = make_weight(N, K, scheme, gen)
    x_q, x_scale = activations(150, K, gen, per_token=True)
    y = w4a8_ref(x_q, x_scale, pw)
    assert rel_err(y, ref_a8(x_q, x_scale, qw, None)) <= TOL
    assert torch.equal(w4a8_ref(x_q, x_scale, pw, prepared=prepare(pw)), y)


@pytest.mark.parametrize("scheme", ["w4g64", "w4a"])
def test_every_pruned_config(scheme: str) -> None:
    """Each config autotuning could pick for this shape computes the same result (partial tiles everywhere)."""
    pytest.importorskip("triton")
    gen = seeded("configs", scheme)
    qw, pw = make_weight(N, K, scheme, gen)
    x_q, x_scale = activations(64, K, gen, per_token=True)
    ref = ref_a8(x_q, x_scale, qw, None)
    args = {"M": 64, "N": N, "K": K, "GROUP_SIZE": 0 if pw.per_channel else pw.group_size}
    configs = prune(CONFIGS, args)
    assert len(configs) >= 4
    for config in configs:
        assert rel_err(run("triton", x_q, x_scale, pw, config=config), ref) <= TOL, config


def test_configs_are_gpu_valid_and_design_b() -> None:
    assert set(KEYS) <= set(_w4a8_kernel.arg_names)
    assert all(c.block_m >= 16 and c.block_n >= 16 and c.block_k >= 32 for c in CONFIGS)  # int8 dot: K >= 32
    for m in (1, 16, 64, 256, 2048):
        for n, k in ((4096, 4096), (11008, 4096), (4096, 11008), (72, 200)):
            for g in (32, 64, 128, 0):
                kept = prune(CONFIGS, {"M": m, "N": n, "K": k, "GROUP_SIZE": g})
                assert kept and all(c.block_k == g for c in kept) if g else kept


def test_asymmetric_8bit_is_refused(backend: str) -> None:
    gen = seeded("w8a")
    _, pw = make_weight(N, K, "w8g64a", gen)
    x_q, x_scale = activations(3, K, gen, per_token=True)
    with pytest.raises(UnsupportedSchemeError, match="beyond int8"):
        run(backend, x_q, x_scale, pw)


def test_autotuner_keys_and_pruner() -> None:
    """The autotuned launch CUDA runs, with a stand-in timer: it times exactly the pruned configs, once per key."""
    pytest.importorskip("triton")
    from quantplan.quant.kernels import w4a8
    from quantplan.quant.kernels.runtime import autotuned, interpreted

    timed: list[int] = []

    def one_run(fn, quantiles):
        fn()
        timed.append(1)
        return [float(len(timed))] * 3

    tuned = autotuned(interpreted(w4a8._w4a8_kernel), CONFIGS, KEYS, prune, do_bench=one_run)
    gen = seeded("autotune")
    qw, pw = make_weight(N, K, "w4g64a", gen)
    for m, new_key in ((3, True), (5, False), (17, True)):  # 3 and 5 share the M bucket 16
        x_q, x_scale = activations(m, K, gen, per_token=True)
        y = poisoned((m, N), torch.float32)
        before = len(timed)
        tuned[w4a8.grid(m, N)](**w4a8.kernel_args(x_q, x_scale, pw, None, y))
        pruned = prune(CONFIGS, {"M": m, "N": N, "K": K, "GROUP_SIZE": 64})
        assert len(timed) - before == (len(pruned) if new_key else 0)
        assert rel_err(y, ref_a8(x_q, x_scale, qw, None)) <= TOL
    assert len(tuned.cache) == 2
