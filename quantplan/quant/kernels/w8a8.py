"""W8A8 GEMM: int8 activations x int8 weights with one scale per output channel, one int32 accumulator over K.

The 8-bit packed codes are byte-for-byte an int8 [N, K_pad] matrix (`codes.view(torch.int8)`), so the kernel
loads them without unpacking. Float scales are applied once, in the epilogue:

    Y[M, N] = (float(X_q @ Q^T) * s_w) * x_scale + bias
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from quantplan.quant.kernels.intmath import epilogue, int_matmul
from quantplan.quant.kernels.runtime import (
    GROUP_M,
    TileConfig,
    UnsupportedSchemeError,
    autotuned,
    cdiv,
    check_a8_inputs,
    jit,
    launch,
    m_bucket,
    next_pow2,
    output,
    tl,
)
from quantplan.quant.kernels.served import served
from quantplan.quant.packing import PackedWeight
from quantplan.quant.schemes import WeightScheme

KEYS = ("M_BUCKET", "N", "K", "PER_TOKEN")
_MN_TILES = (  # (BLOCK_M, BLOCK_N, num_warps, num_stages), small tiles first
    (16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 4), (32, 128, 4, 4),
    (64, 128, 4, 3), (128, 128, 8, 3), (64, 256, 8, 3), (128, 256, 8, 3),
)
CONFIGS = tuple(TileConfig(m, n, k, w, s) for k in (64, 128, 256) for m, n, w, s in _MN_TILES)


def prune(configs: Sequence[TileConfig], args: Mapping[str, Any]) -> list[TileConfig]:
    """Tiles no larger than the problem needs (the smallest config always stays)."""
    m_cap, n_cap, k_cap = max(16, next_pow2(args["M"])), max(32, next_pow2(args["N"])), max(64, next_pow2(args["K"]))
    kept = [c for c in configs if c.block_m <= m_cap and c.block_n <= n_cap and c.block_k <= k_cap]
    return kept or list(configs[:1])


@jit
def _w8a8_kernel(
    x_ptr, xs_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PER_TOKEN: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grouped launch order (repeated in each GEMM kernel: the interpreter cannot call a compiled helper)
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    band = pid // (GROUP_M * num_n)
    rows = tl.minimum(num_m - band * GROUP_M, GROUP_M)
    pid_m = band * GROUP_M + (pid % (GROUP_M * num_n)) % rows
    pid_n = (pid % (GROUP_M * num_n)) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.full([BLOCK_M, BLOCK_N], 0, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = tl.dot(x, w, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    s = tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
    out = acc.to(tl.float32) * s[None, :]
    x_scale = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)[:, None] if PER_TOKEN else tl.load(xs_ptr)
    out = out * x_scale
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_w8a8_tuned = autotuned(_w8a8_kernel, CONFIGS, KEYS, prune)


def check_supported(scheme: WeightScheme) -> None:
    """Raise UnsupportedSchemeError unless the table of what the kernels serve gives `scheme` to this kernel."""
    reason = served("w8a8").refusal(scheme)
    if reason is not None:
        raise UnsupportedSchemeError(reason)


def int8_weight(pw: PackedWeight) -> torch.Tensor:
    """The packed codes as the int8 [N, K_pad] matrix they are (a view, no copy)."""
    return pw.codes.view(torch.int8)


# -- torch reference (also the CPU path) ----------------------------------------------------------------
def w8a8_ref(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    pw: PackedWeight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Y [M, N] in `out_dtype` through `torch._int_mm` on the CPU (the packed codes are the int8 weight)."""
    check_supported(pw.scheme)
    x_scale, bias = check_a8_inputs(x_q, x_scale, pw, bias, out_dtype)
    x = F.pad(x_q, (0, pw.k_pad - pw.in_features))
    acc = int_matmul(x, int8_weight(pw)).float() * pw.scales[0].float()
    return epilogue(acc, x_scale, bias, out_dtype)


# -- Triton -----------------------------------------------------------------------------------------------
def w8a8_triton(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    pw: PackedWeight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """The same product as `w8a8_ref`, from the Triton kernel (autotuned on CUDA, interpreted on CPU tensors)."""
    check_supported(pw.scheme)
    x_scale, bias = check_a8_inputs(x_q, x_scale, pw, bias, out_dtype)
    (m, k), n, w = x_q.shape, pw.out_features, int8_weight(pw)
    y = output(out, (m, n), out_dtype, x_q.device)
    if m == 0:
        return y
    args = dict(
        x_ptr=x_q, xs_ptr=x_scale, w_ptr=w, s_ptr=pw.scales, b_ptr=y if bias is None else bias, y_ptr=y,
        M=m, N=n, K=k, M_BUCKET=m_bucket(m), stride_xm=x_q.stride(0), stride_xk=x_q.stride(1),
        stride_wn=w.stride(0), stride_wk=w.stride(1), stride_sn=pw.scales.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        HAS_BIAS=bias is not None, PER_TOKEN=x_scale.numel() > 1, GROUP_M=GROUP_M,
    )

    def grid(meta: Mapping[str, int]) -> tuple[int, ...]:
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)

    launch(_w8a8_kernel, _w8a8_tuned, grid, args, lambda a: prune(CONFIGS, a), config)
    return y
