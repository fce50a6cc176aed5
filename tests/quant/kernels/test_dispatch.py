"""Dispatch: kernel choice per scheme, backends, clear errors for unsupported combinations and bad inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from quantplan.quant.kernels import runtime, w4a8
from quantplan.quant.kernels.act_quant import quantize_act_ref
from quantplan.quant.kernels.dispatch import quantized_linear, select_kernel
from quantplan.quant.kernels.runtime import (
    BackendUnavailableError,
    KernelInputError,
    UnsupportedSchemeError,
    resolve_backend,
)
from quantplan.quant.packing import PackedWeight
from quantplan.quant.schemes import ActScheme, LayerScheme
from tests.quant.kernels.reference import TOL, make_weight, ref_a8, rel_err, seeded

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("scheme", "kernel"),
    [
        ("w4g128:a8-dynamic", "w4a8"), ("w4:a8-static", "w4a8"), ("w4g32a:a8-lae", "w4a8"),
        ("w2g64a:a8-smooth", "w4a8"), ("w8g64:a8-dynamic", "w4a8"), ("w8:a8-dynamic", "w8a8"),
        ("w8:a8-static", "w8a8"), ("w4g64a:a16", "w4a16"), ("w8a:a16", "w4a16"), ("w2:a16", "w4a16"),
    ],
)
def test_kernel_choice(scheme: str, kernel: str) -> None:
    assert select_kernel(LayerScheme.parse(scheme)).name == kernel


@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        ("w3g64:a8-dynamic", "no packed format"),
        ("w3:a16", "no packed format"),
        ("w16:a8-dynamic", "not quantized"),
        ("w8a:a8-dynamic", "beyond int8"),
        ("w8g64a:a8-static", "beyond int8"),
    ],
)
def test_unsupported_schemes_raise(scheme: str, message: str) -> None:
    with pytest.raises(UnsupportedSchemeError, match=message):
        select_kernel(LayerScheme.parse(scheme))


def test_backends() -> None:
    cpu = torch.device("cpu")
    assert resolve_backend(cpu, None) == resolve_backend(cpu, "auto") == "torch"
    with pytest.raises(KernelInputError, match="unknown backend"):
        resolve_backend(cpu, "cuda")
    with pytest.raises(BackendUnavailableError, match="not meta"):
        resolve_backend(torch.device("meta"), None)


def test_missing_triton_is_an_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "HAS_TRITON", False)
    with pytest.raises(BackendUnavailableError, match="install quantplan"):
        resolve_backend(torch.device("cpu"), "triton")
    _, pw = make_weight(8, 64, "w4g32", seeded("missing"))
    x_q, x_scale = quantize_act_ref(torch.randn(2, 64))
    with pytest.raises(BackendUnavailableError):
        w4a8.w4a8_triton(x_q, x_scale, pw)


@pytest.fixture
def layer() -> tuple:
    gen = seeded("layer")
    qw, pw = make_weight(24, 96, "w4g32a", gen)
    return qw, pw, torch.randn(24, generator=gen)


def test_bad_inputs_raise_clear_errors(backend: str, layer: tuple) -> None:
    _, pw, bias = layer
    x = torch.randn(5, 96)

    def call(x=x, **kw):
        kw = {"bias": bias, "backend": backend, **kw}
        return quantized_linear(x, pw, kw.pop("act", ActScheme.DYNAMIC), **kw)

    with pytest.raises(KernelInputError, match="dtype"):
        call(x.to(torch.int32))
    with pytest.raises(KernelInputError, match="dtype float16, float32, got bfloat16"):
        call(x.bfloat16(), act=ActScheme.A16)
    with pytest.raises(KernelInputError, match="in_features=96"):
        call(torch.randn(5, 95))
    with pytest.raises(KernelInputError, match="bias has 23 elements"):
        call(bias=bias[:23])
    with pytest.raises(KernelInputError, match="bias must have dtype"):
        call(bias=bias.to(torch.int64))
    with pytest.raises(KernelInputError, match="needs a calibrated"):
        call(act=ActScheme.STATIC)
    with pytest.raises(UnsupportedSchemeError, match="output dtype"):
        call(out_dtype=torch.bfloat16)
    with pytest.raises(KernelInputError, match="one device"):
        call(bias=bias.to("meta"))
    x_q, _ = quantize_act_ref(x)
    run = w4a8.w4a8_triton if backend == "triton" else w4a8.w4a8_ref
    with pytest.raises(KernelInputError, match="one value per token"):
        run(x_q, torch.ones(4), pw)
    with pytest.raises(KernelInputError, match="dtype float32"):
        run(x_q, torch.ones(5, dtype=torch.float64), pw)


def test_non_contiguous_inputs_give_the_right_answer(backend: str, layer: tuple) -> None:
    qw, pw, bias = layer
    x = torch.randn(96, 2, 3, generator=seeded("nc")).permute(1, 2, 0)  # [2, 3, 96], not contiguous
    strided = PackedWeight(
        torch.cat([pw.codes, pw.codes], 1)[:, : pw.codes.shape[1]],  # row stride twice the row length
        pw.scales.t().contiguous().t(),  # column-major scales
        pw.zeros.t().contiguous().t(),
        pw.in_features,
        pw.scheme,
    )
    assert not (strided.codes.is_contiguous() or strided.scales.is_contiguous() or x.is_contiguous())
    y = quantized_linear(x, strided, ActScheme.DYNAMIC, bias=bias, backend=backend)
    x_q, x_scale = quantize_act_ref(x.reshape(6, 96))
    assert y.shape == (2, 3, 24) and rel_err(y.reshape(6, 24), ref_a8(x_q, x_scale, qw, bias)) <= TOL


def test_interpreter_works_when_triton_was_imported_compiled() -> None:
    """Another test may import Triton before TRITON_INTERPRET is set: CPU launches must still interpret."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
        assert not isinstance(tl.zeros, InterpretedFunction), "Triton was imported in interpreter mode"
        import torch
        from quantplan.quant.kernels.dispatch import quantized_linear
        from quantplan.quant.packing import pack_weight
        from quantplan.quant.quantizers import quantize_weight
        from quantplan.quant.schemes import ActScheme, WeightScheme
        x = torch.randn(3, 80)
        for scheme, act in [("w4g32a", ActScheme.DYNAMIC), ("w8", ActScheme.STATIC), ("w4g64", ActScheme.A16)]:
            pw = pack_weight(quantize_weight(torch.randn(40, 80), WeightScheme.parse(scheme)))
            s = torch.tensor(0.03)
            a = quantized_linear(x, pw, act, act_scale=s, backend="triton")
            b = quantized_linear(x, pw, act, act_scale=s, backend="torch")
            assert ((a - b).abs().max() / b.abs().max()) < 1e-5, scheme
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_torch_path_runs_without_triton() -> None:
    """Triton is an optional dependency: a laptop without it still runs quantized layers on the torch path."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = sys.modules["triton.language"] = None  # as if it were not installed
        import torch
        from quantplan.quant.kernels.runtime import HAS_TRITON, BackendUnavailableError
        from quantplan.quant.plan import LayerSpec
        from quantplan.quant.qlinear import QuantLinear
        from quantplan.quant.schemes import LayerScheme
        assert not HAS_TRITON
        spec = LayerSpec(LayerScheme.parse("w4g32:a8-dynamic"))
        assert QuantLinear.from_float(torch.randn(16, 64), None, spec)(torch.randn(2, 64)).shape == (2, 16)
        try:
            QuantLinear.from_float(torch.randn(16, 64), None, spec, backend="triton")(torch.randn(2, 64))
        except BackendUnavailableError:
            print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
