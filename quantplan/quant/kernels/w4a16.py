"""W4A16 GEMM: fp16/fp32 activations x packed 4-bit (also 2- and 8-bit) weights dequantized in the kernel.

For layers kept at 16-bit activations. Each K tile lies inside one group (BLOCK_K divides g), so one row of
scales (and zero-points) serves the whole tile: `w = ((q - z) * s_g)` is formed in fp32 and rounded to the
activation dtype, which is exactly the weight the fake-quant simulation multiplies, then one tensor-core dot
accumulates in fp32 (IEEE fp32 dot for fp32 activations).

    Y[M, N] = X @ (((Q - z) * s) in X's dtype)^T + bias
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from quantplan.quant.kernels.runtime import (
    GROUP_M,
    KernelInputError,
    TileConfig,
    UnsupportedSchemeError,
    autotuned,
    cdiv,
    check_bias,
    check_out_dtype,
    check_same_device,
    check_tensor,
    jit,
    launch,
    m_bucket,
    next_pow2,
    output,
    tl,
)
from quantplan.quant.kernels.served import served
from quantplan.quant.packing import PackedWeight, centered_codes
from quantplan.quant.schemes import WeightScheme

X_DTYPES = (torch.float16, torch.float32)
KEYS = ("M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "ASYM")
_MN_TILES = (  # (BLOCK_M, BLOCK_N, num_warps, num_stages), small tiles first
    (16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 4), (32, 128, 4, 4),
    (64, 128, 4, 3), (128, 128, 8, 3), (64, 256, 8, 3),
)
CONFIGS = tuple(TileConfig(m, n, k, w, s) for k in (32, 64, 128) for m, n, w, s in _MN_TILES)


def prune(configs: Sequence[TileConfig], args: Mapping[str, Any]) -> list[TileConfig]:
    """BLOCK_K divides the group (any, per-channel); tiles no larger than needed (the smallest always stays)."""
    g, m_cap, n_cap = args["GROUP_SIZE"], max(16, next_pow2(args["M"])), max(32, next_pow2(args["N"]))
    k_cap = max(32, next_pow2(args["K"]))
    fits_k = [c for c in configs if (g % c.block_k == 0 if g else c.block_k <= k_cap)]
    kept = [c for c in fits_k if c.block_m <= m_cap and c.block_n <= n_cap]
    return kept or fits_k[:1]


@jit
def _w4a16_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sg, stride_sn, stride_zg, stride_zn, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ASYM: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0)  # one scale row per K tile (GROUP_SIZE 0: per-channel)
    EPW: tl.constexpr = 32 // BITS
    FIELD: tl.constexpr = (1 << BITS) - 1
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
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + (offs_k // EPW)[:, None] * stride_wk
    shift = ((offs_k % EPW) * BITS)[:, None]
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        p = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        g = k0 // GROUP_SIZE if GROUP_SIZE else 0
        if ASYM:
            zw = tl.load(z_ptr + g * stride_zg + (offs_n // EPW) * stride_zn, mask=n_ok, other=0)
            q = ((p >> shift) & FIELD) - ((zw >> ((offs_n % EPW) * BITS)) & FIELD)[None, :]
        else:
            q = (p << (32 - BITS - shift)) >> (32 - BITS)
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) * s[None, :]).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, w, acc, input_precision="ieee") if IEEE else tl.dot(x, w, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += (BLOCK_K // EPW) * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_w4a16_tuned = autotuned(_w4a16_kernel, CONFIGS, KEYS, prune)


def check_supported(scheme: WeightScheme) -> None:
    """Raise UnsupportedSchemeError unless the table of what the kernels serve gives `scheme` to this kernel."""
    reason = served("w4a16").refusal(scheme)
    if reason is not None:
        raise UnsupportedSchemeError(reason)


def check_inputs(
    x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor | None:
    check_tensor(x, "activations", X_DTYPES, ndim=2)
    check_out_dtype(out_dtype)
    if x.shape[1] != pw.in_features:
        raise KernelInputError(f"activations have K={x.shape[1]} columns, the weight in_features={pw.in_features}")
    bias = check_bias(bias, pw.out_features)
    check_same_device(activations=x, codes=pw.codes, bias=bias)
    return bias


# -- torch reference (also the CPU path) ----------------------------------------------------------------
def prepare(pw: PackedWeight) -> torch.Tensor:
    """The torch path's weight: (code - zero) as [N, K_pad], int8 (int16 for asymmetric w8)."""
    return centered_codes(pw)


def dequantized(pw: PackedWeight, dtype: torch.dtype, prepared: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] = ((q - z) * s) formed in fp32 and rounded to `dtype`, as the kernel (and the simulation) do."""
    q = prepare(pw) if prepared is None else prepared  # [N, K_pad] integers
    g = pw.k_pad if pw.per_channel else pw.group_size
    w = q.view(pw.out_features, -1, g) * pw.scales.float().t()[:, :, None]  # promotes to fp32 in one pass
    return w.view(pw.out_features, -1)[:, : pw.in_features].to(dtype)


def w4a16_ref(
    x: torch.Tensor,
    pw: PackedWeight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    *,
    prepared: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y [M, N] in `out_dtype`, accumulated in fp32; `prepared` may pass `prepare(pw)` computed once."""
    bias = check_inputs(x, pw, bias, out_dtype)
    y = x.float() @ dequantized(pw, x.dtype, prepared).float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# -- Triton -----------------------------------------------------------------------------------------------
def w4a16_triton(
    x: torch.Tensor,
    pw: PackedWeight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """The same product as `w4a16_ref`, from the Triton kernel (autotuned on CUDA, interpreted on CPU tensors)."""
    bias = check_inputs(x, pw, bias, out_dtype)
    (m, k), n = x.shape, pw.out_features
    y = output(out, (m, n), out_dtype, x.device)
    if m == 0:
        return y
    zeros = pw.zeros if pw.zeros is not None else pw.codes  # any tensor: not read when symmetric
    args = dict(
        x_ptr=x, w_ptr=pw.codes, s_ptr=pw.scales, z_ptr=zeros, b_ptr=y if bias is None else bias, y_ptr=y,
        M=m, N=n, K=k, M_BUCKET=m_bucket(m),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=pw.codes.stride(0), stride_wk=pw.codes.stride(1),
        stride_sg=pw.scales.stride(0), stride_sn=pw.scales.stride(1), stride_zg=zeros.stride(0),
        stride_zn=zeros.stride(1), stride_ym=y.stride(0), stride_yn=y.stride(1),
        BITS=pw.bits, GROUP_SIZE=0 if pw.per_channel else pw.group_size, ASYM=pw.scheme.asymmetric,
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, GROUP_M=GROUP_M,
    )

    def grid(meta: Mapping[str, int]) -> tuple[int, ...]:
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)

    launch(_w4a16_kernel, _w4a16_tuned, grid, args, lambda a: prune(CONFIGS, a), config)
    return y
