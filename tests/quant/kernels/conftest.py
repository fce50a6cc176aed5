"""Kernel tests: Triton kernels run on CPU tensors under the interpreter (TRITON_INTERPRET=1) unless CUDA is here.

The variable must be set before Triton is imported; when another test imported it first, the launcher still
interprets kernels given CPU tensors (quant.kernels.runtime.launch), and test_dispatch checks that path in a
fresh process. On a CUDA machine the variable is left alone so the `gpu` tests run compiled kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quantplan.quant.kernels.runtime import HAS_TRITON  # noqa: E402 - after the environment is set

BACKENDS = ("triton", "torch")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each kernel test runs once on the Triton kernel and once on its torch reference (the CPU path)."""
    if request.param == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    return request.param
