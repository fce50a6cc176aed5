"""W4A8 GEMM: int8 activations x packed 4-bit (also 2-bit, and symmetric 8-bit) weights, float accumulation per group.

Design B (docs ALGORITHMS.md, "W4A8 kernels"): BLOCK_K equals the group size g, so each K tile is one group and
`acc_f32 += dot_i32(x_i8, w_i8) * s_g` costs one convert and one FMA per output per group while keeping
arbitrary fp16 group scales. Per-channel weights use one int32 accumulator over all of K and scale once in the
epilogue. Weights are unpacked in registers: symmetric two's complement fields are sign-extended with two
shifts; asymmetric fields are masked and their zero-point subtracted, which keeps `code - zero` within int8.
The epilogue multiplies by the activation scale (per token or per tensor) and adds the bias.

    Y[M, N] = x_scale * sum_g s_g * (X_q[:, g] @ (Q[:, g] - z_g)^T) + bias
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from quantplan.quant.kernels.intmath import epilogue, group_major, grouped_dot, int_matmul
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
from quantplan.quant.packing import PackedWeight, centered_int8
from quantplan.quant.schemes import WeightScheme

KEYS = ("M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "ASYM", "PER_TOKEN")
_MN_TILES = (  # (BLOCK_M, BLOCK_N, num_warps, num_stages), small tiles first: decode shapes are memory-bound
    (16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 4), (32, 128, 4, 4),
    (64, 128, 4, 3), (128, 128, 8, 3), (64, 256, 8, 3), (128, 256, 8, 3),
)
CONFIGS = tuple(TileConfig(m, n, k, w, s) for k in (32, 64, 128, 256) for m, n, w, s in _MN_TILES)
PER_CHANNEL_BLOCK_K = (64, 128, 256)


def prune(configs: Sequence[TileConfig], args: Mapping[str, Any]) -> list[TileConfig]:
    """Grouped: BLOCK_K == g (design B); per-channel: BLOCK_K 64..256 no wider than K; tiles no larger than needed."""
    g, m_cap, n_cap = args["GROUP_SIZE"], max(16, next_pow2(args["M"])), max(32, next_pow2(args["N"]))
    k_cap = max(64, next_pow2(args["K"]))

    def fits_k(c: TileConfig) -> bool:
        return c.block_k == g if g else c.block_k in PER_CHANNEL_BLOCK_K and c.block_k <= k_cap

    kept = [c for c in configs if fits_k(c) and c.block_m <= m_cap and c.block_n <= n_cap]
    return kept or [c for c in configs if fits_k(c)][:1]


@jit
def _w4a8_kernel(
    x_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sg, stride_sn, stride_zg, stride_zn, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ASYM: tl.constexpr, HAS_BIAS: tl.constexpr,
    PER_TOKEN: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tl.static_assert(GROUP_SIZE == 0 or GROUP_SIZE == BLOCK_K)  # design B: one K tile per group
    EPW: tl.constexpr = 32 // BITS  # codes per int32 word
    FIELD: tl.constexpr = (1 << BITS) - 1
    # grouped launch order: GROUP_M row tiles sweep the same weight columns while they sit in L2
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
    shift = ((offs_k % EPW) * BITS)[:, None]  # [BLOCK_K, 1] bit offset of each code in its word
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    acc_i = tl.full([BLOCK_M, BLOCK_N], 0, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
        p = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        if ASYM:
            g = k0 // BLOCK_K if GROUP_SIZE else 0
            zw = tl.load(z_ptr + g * stride_zg + (offs_n // EPW) * stride_zn, mask=n_ok, other=0)
            w = ((p >> shift) & FIELD) - ((zw >> ((offs_n % EPW) * BITS)) & FIELD)[None, :]
        else:
            w = (p << (32 - BITS - shift)) >> (32 - BITS)  # sign-extend the field
        d = tl.dot(x, w.to(tl.int8), out_dtype=tl.int32)
        if GROUP_SIZE:
            s = tl.load(s_ptr + (k0 // BLOCK_K) * stride_sg + offs_n * stride_sn, mask=n_ok, other=0.0)
            acc += d.to(tl.float32) * s.to(tl.float32)[None, :]
        else:
            acc_i += d
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += (BLOCK_K // EPW) * stride_wk
    if not GROUP_SIZE:
        s = tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0)
        acc = acc_i.to(tl.float32) * s.to(tl.float32)[None, :]
    x_scale = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)[:, None] if PER_TOKEN else tl.load(xs_ptr)
    acc = acc * x_scale
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_w4a8_tuned = autotuned(_w4a8_kernel, CONFIGS, KEYS, prune)


# -- inputs -------------------------------------------------------------------------------------------------
def check_supported(scheme: WeightScheme) -> None:
    """Raise UnsupportedSchemeError unless the table of what the kernels serve gives `scheme` to this kernel."""
    reason = served("w4a8").refusal(scheme)
    if reason is not None:
        raise UnsupportedSchemeError(reason)


# -- torch reference (also the CPU path) ----------------------------------------------------------------
DEQUANT_ROWS_PER_GROUP_WIDTH = 8  # w4a8_cpu: grouped weights take the float GEMM from 8 x g rows on
def prepare(pw: PackedWeight) -> torch.Tensor:
    """The torch path's weight: int8 (code - zero), [N, K_pad] per-channel or group-major [G, N, g]."""
    w = centered_int8(pw)
    return w if pw.per_channel else group_major(w, pw.group_size)


def w4a8_ref(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    pw: PackedWeight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    *,
    prepared: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y [M, N] in `out_dtype`; `prepared` may pass `prepare(pw)` computed once (QuantLinear keeps it)."""
    x, x_scale, w, scales, bias = _operands(x_q, x_scale, pw, bias, out_dtype, prepared)
    acc = int_matmul(x, w).float() * scales[0] if pw.per_channel else grouped_dot(x, w, scales)
    return epilogue(acc, x_scale, bias, out_dtype)


def w4a8_cpu(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    pw: PackedWeight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    *,
    prepared: torch.Tensor | None = None,
    dense: torch.Tensor | None = None,
) -> torch.Tensor:
    """The CPU path: `w4a8_dequant` for grouped weights from DEQUANT_ROWS_PER_GROUP_WIDTH x g rows on (prefill,
    evaluation batches), else `w4a8_ref` (decoding, and per-channel weights: one int8 GEMM over K is fast).
    `dense` (`dense_weight(pw)`, kept by the caller) spares `w4a8_dequant` the per-call dequantization.

    `w4a8_ref` runs one small integer GEMM per group and 64-row block (G times the output traffic of one GEMM);
    `w4a8_dequant` dequantizes the whole weight once per call and runs one float GEMM. Measured with one thread
    (docs/BENCHMARKS.md, "CPU (torch path)"): at g32 the float GEMM is 2-3x faster from 256 rows on; at g128 the
    two cross near 1,000-1,500 rows (4096 x 4096), below which the dequantization dominates."""
    if not uses_dense(pw, x_q.shape[0]):
        return w4a8_ref(x_q, x_scale, pw, bias, out_dtype, prepared=prepared)
    return w4a8_dequant(x_q, x_scale, pw, bias, out_dtype, prepared=prepared, dense=dense)


def uses_dense(pw: PackedWeight, rows: int) -> bool:
    """Whether `w4a8_cpu` takes the float GEMM on the dequantized weight for `rows` rows."""
    return not pw.per_channel and rows >= DEQUANT_ROWS_PER_GROUP_WIDTH * pw.group_size


def dense_weight(pw: PackedWeight, prepared: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 [N, K_pad] weight `w4a8_dequant` multiplies: (code - zero) times its group's scale."""
    w = prepare(pw) if prepared is None else prepared
    scales = pw.scales.float()
    if pw.per_channel:
        return w.float() * scales[0][:, None]
    return (w.float() * scales[:, :, None]).transpose(0, 1).reshape(pw.out_features, -1)  # [G, N, g] -> [N, K_pad]


def w4a8_dequant(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    pw: PackedWeight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    *,
    prepared: torch.Tensor | None = None,
    dense: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y as `w4a8_ref` computes it, by one float32 GEMM: the weights (`prepare(pw)`: int8 codes minus zero)
    dequantized with their group scales folded in (`dense_weight`, per call unless `dense` passes it), times the
    int8 activations. It differs from the reference by float rounding only (the same products and sums, added in
    another order: ~1e-7 relative)."""
    x, x_scale, w, _, bias = _operands(x_q, x_scale, pw, bias, out_dtype, prepared)
    weight = dense_weight(pw, w) if dense is None else dense
    return epilogue(x.float() @ weight.t(), x_scale, bias, out_dtype)


def _operands(x_q: torch.Tensor, x_scale: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None,
              out_dtype: torch.dtype, prepared: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The torch paths' checked inputs: (x_q padded to K_pad, x_scale, prepared weight, scales [G, N] float32,
    bias)."""
    check_supported(pw.scheme)
    x_scale, bias = check_a8_inputs(x_q, x_scale, pw, bias, out_dtype)
    w = prepare(pw) if prepared is None else prepared
    return F.pad(x_q, (0, pw.k_pad - pw.in_features)), x_scale, w, pw.scales.float(), bias


# -- Triton -----------------------------------------------------------------------------------------------
def kernel_args(
    x_q: torch.Tensor, x_scale: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, y: torch.Tensor
) -> dict[str, Any]:
    """The kernel's arguments, tile sizes excepted (checked inputs; `y` is the [M, N] output)."""
    zeros = pw.zeros if pw.zeros is not None else pw.codes  # any tensor: not read when symmetric
    (m, k), n = x_q.shape, pw.out_features
    return dict(
        x_ptr=x_q, xs_ptr=x_scale, w_ptr=pw.codes, s_ptr=pw.scales, z_ptr=zeros, b_ptr=y if bias is None else bias,
        y_ptr=y, M=m, N=n, K=k, M_BUCKET=m_bucket(m),
        stride_xm=x_q.stride(0), stride_xk=x_q.stride(1), stride_wn=pw.codes.stride(0), stride_wk=pw.codes.stride(1),
        stride_sg=pw.scales.stride(0), stride_sn=pw.scales.stride(1), stride_zg=zeros.stride(0),
        stride_zn=zeros.stride(1), stride_ym=y.stride(0), stride_yn=y.stride(1),
        BITS=pw.bits, GROUP_SIZE=0 if pw.per_channel else pw.group_size, ASYM=pw.scheme.asymmetric,
        HAS_BIAS=bias is not None, PER_TOKEN=x_scale.numel() > 1, GROUP_M=GROUP_M,
    )


def grid(m: int, n: int) -> Callable[[Mapping[str, Any]], tuple[int, ...]]:
    """One program per (BLOCK_M, BLOCK_N) tile of the [m, n] output (the interpreter passes M, N as tensors)."""

    def tiles(meta: Mapping[str, Any]) -> tuple[int, ...]:
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)

    return tiles


def w4a8_triton(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    pw: PackedWeight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """The same product as `w4a8_ref`, from the Triton kernel (autotuned on CUDA, interpreted on CPU tensors)."""
    check_supported(pw.scheme)
    x_scale, bias = check_a8_inputs(x_q, x_scale, pw, bias, out_dtype)
    y = output(out, (x_q.shape[0], pw.out_features), out_dtype, x_q.device)
    if y.shape[0] == 0:
        return y
    args = kernel_args(x_q, x_scale, pw, bias, y)
    launch(_w4a8_kernel, _w4a8_tuned, grid(*y.shape), args, lambda a: prune(CONFIGS, a), config)
    return y


