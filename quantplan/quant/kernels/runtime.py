"""Kernel runtime: optional Triton, kernel errors, backends, tile configs, launching (compiled or interpreted).

Triton is optional: without it the kernel modules still import (their torch references work) and a Triton launch
raises BackendUnavailableError. A kernel launched on CUDA tensors is compiled and autotuned; on CPU tensors it runs
under the Triton interpreter whatever TRITON_INTERPRET said when the kernel module was imported (that is how the
tests run the GPU code on a CPU), with the first tile config that fits the problem instead of a timed search.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from quantplan.errors import QuantPlanError
from quantplan.quant.packing import PackedWeight

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    triton = None
    tl = None

HAS_TRITON = triton is not None
jit = triton.jit if HAS_TRITON else (lambda fn: fn)  # without Triton a kernel stays a plain, never-run function
BACKENDS = ("auto", "triton", "torch")
OUT_DTYPES = (torch.float16, torch.float32)
MIN_TILE = 16  # a GPU rejects dot tiles below 16 (the interpreter would not): no config may go below it
GROUP_M = 8  # programs along M that share a band of weight columns (L2 reuse when M spans several tiles)


class KernelError(QuantPlanError):
    """A quantized kernel could not run; the message says why and what to do."""


class UnsupportedSchemeError(KernelError, ValueError):
    """A weight/activation combination (or dtype) that no kernel implements: never silently computed another way."""


class KernelInputError(KernelError, ValueError):
    """Inputs of the wrong dtype, shape or device for a kernel."""


class BackendUnavailableError(KernelError, RuntimeError):
    """The requested backend cannot run here (no Triton installed, or a device it does not support)."""


# -- tile configs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    """One autotune candidate: tile sizes (BLOCK_N None for kernels without an N tile) and launch settings."""

    block_m: int
    block_n: int | None
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        assert all(b is None or b >= MIN_TILE for b in (self.block_m, self.block_n, self.block_k)), self

    def meta(self) -> dict[str, int]:
        """The kernel's tile constexprs."""
        blocks = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}
        return {k: v for k, v in blocks.items() if v is not None}


Pruner = Callable[[Sequence[TileConfig], Mapping[str, Any]], list[TileConfig]]


def next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def m_bucket(m: int) -> int:
    """The autotune key for M: tiles are re-tuned per power of two, not per batch size."""
    return min(max(MIN_TILE, next_pow2(m)), 4096)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def autotuned(
    kernel: Any, configs: Sequence[TileConfig], keys: Sequence[str], prune: Pruner, do_bench: Callable | None = None
) -> Any:
    """`kernel` under triton.autotune over `configs`, keyed on `keys`, pruned by `prune(configs, kernel_args)`.

    `do_bench(fn, quantiles)` replaces Triton's timer (the tests time interpreted kernels with it).
    """
    if not HAS_TRITON:
        return kernel
    pairs = [(c, triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages)) for c in configs]

    def early_prune(tconfigs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
        keep = set(prune([c for c, _ in pairs], {**named_args, **kwargs}))
        return [t for c, t in pairs if c in keep]

    return triton.autotune(
        configs=[t for _, t in pairs],
        key=list(keys),
        prune_configs_by={"early_config_prune": early_prune},
        do_bench=do_bench,
    )(kernel)


# -- launching ------------------------------------------------------------------------------------------
def require_triton() -> None:
    if not HAS_TRITON:
        raise BackendUnavailableError(
            "Triton is not installed: install quantplan[triton] on a CUDA machine, or use backend='torch'"
        )


@functools.cache
def interpreted(kernel: Any) -> Any:
    """`kernel` as an interpreter function, whether or not TRITON_INTERPRET was set when it was defined."""
    from triton.runtime.interpreter import InterpretedFunction

    return kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)


def launch(
    kernel: Any,
    tuned: Any,
    grid: Callable[[Mapping[str, Any]], tuple[int, ...]],
    args: dict[str, Any],
    choose: Callable[[Mapping[str, Any]], list[TileConfig]],
    config: TileConfig | None = None,
) -> None:
    """Run `kernel` with keyword `args`: autotuned on CUDA unless `config` is given, interpreted on CPU tensors.

    `grid(meta)` reads the tile sizes (and any argument) from `meta`; `choose(args)` lists the configs that fit
    the problem (the pruner), of which the interpreter takes the first.
    """
    require_triton()
    on_cuda = any(isinstance(v, torch.Tensor) and v.is_cuda for v in args.values())
    if on_cuda and config is None:
        tuned[grid](**args)
        return
    if config is None:
        config = choose(args)[0]
    runner = kernel if on_cuda else interpreted(kernel)
    meta = config.meta()
    runner[grid](**args, **meta, num_warps=config.num_warps, num_stages=config.num_stages)


# -- backends and input checks ----------------------------------------------------------------------------
def resolve_backend(device: torch.device, backend: str | None) -> str:
    """'triton' or 'torch' for tensors on `device`: auto means Triton on CUDA, the torch path on the CPU."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise KernelInputError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if device.type not in ("cpu", "cuda"):
        raise BackendUnavailableError(f"quantized kernels run on CPU or CUDA tensors, not {device.type}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        require_triton()
    return backend


def check_tensor(t: Any, name: str, dtypes: Sequence[torch.dtype], ndim: int | None = None) -> torch.Tensor:
    """`t` as a tensor of one of `dtypes` (and `ndim` dims), else a KernelInputError naming `name`."""
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise KernelInputError(f"{name} must have dtype {want}, got {str(t.dtype).removeprefix('torch.')}")
    if ndim is not None and t.ndim != ndim:
        raise KernelInputError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise KernelInputError(f"all inputs must be on one device, got {where}")


def check_out_dtype(out_dtype: torch.dtype) -> torch.dtype:
    if out_dtype not in OUT_DTYPES:
        raise UnsupportedSchemeError(f"output dtype {out_dtype} is not supported; use torch.float16 or torch.float32")
    return out_dtype


def output(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`out` checked against the result's shape, dtype and device (the kernel writes every element), or a new one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise KernelInputError(
            f"out must be a contiguous {dtype} tensor of shape {shape} on {device}, got {out.dtype} "
            f"{tuple(out.shape)} on {out.device}"
        )
    return out


def check_bias(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if bias is None:
        return None
    check_tensor(bias, "bias", (torch.float16, torch.float32), ndim=1)
    if bias.shape[0] != n:
        raise KernelInputError(f"bias has {bias.shape[0]} elements but the weight has N={n} output features")
    return bias.contiguous()


def check_a8_inputs(
    x_q: torch.Tensor, x_scale: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the A8 GEMM inputs shared by W4A8 and W8A8; returns (x_scale as fp32 [M] or [1], bias)."""
    check_tensor(x_q, "quantized activations", (torch.int8,), ndim=2)
    check_out_dtype(out_dtype)
    m, k = x_q.shape
    if k != pw.in_features:
        raise KernelInputError(f"activations have K={k} columns but the weight has in_features={pw.in_features}")
    check_tensor(x_scale, "activation scale", (torch.float32,))
    if not (x_scale.numel() == 1 or tuple(x_scale.shape) in ((m,), (m, 1))):
        raise KernelInputError(
            f"activation scale must hold one value per token ({m}) or one per tensor, got shape {tuple(x_scale.shape)}"
        )
    bias = check_bias(bias, pw.out_features)
    check_same_device(activations=x_q, scale=x_scale, codes=pw.codes, bias=bias)
    return x_scale.reshape(-1).contiguous(), bias
