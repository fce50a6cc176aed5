"""Activation quantization to int8 (per-token dynamic or per-tensor static) with an optional fused pre-scale.

One kernel reads X [M, K] (fp16/fp32), multiplies it by the inverse equalization scale 1/s (LAE or SmoothQuant
where s could not fold into a norm, FPTQ arXiv 2308.15987), and writes int8 codes `round(x / scale)` clamped to
+-127, plus one fp32 scale per row (dynamic: max|x| / 127) or the given per-tensor scale (static). It reproduces
`quant.quantizers.quantize_act_int8` bit for bit: IEEE division (`div_rn`) and round-half-to-even, as torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from quantplan.quant.kernels.runtime import (
    KernelInputError,
    TileConfig,
    autotuned,
    cdiv,
    check_same_device,
    check_tensor,
    jit,
    launch,
    m_bucket,
    next_pow2,
    output,
    tl,
)
from quantplan.quant.quantizers import act_scale_per_token, quantize_act_int8

X_DTYPES = (torch.float16, torch.float32)
KEYS = ("M_BUCKET", "K", "DYNAMIC", "HAS_PRE")
CONFIGS = (
    TileConfig(16, None, 256, num_warps=4, num_stages=1),
    TileConfig(16, None, 1024, num_warps=8, num_stages=1),
    TileConfig(32, None, 1024, num_warps=8, num_stages=1),
    TileConfig(16, None, 2048, num_warps=8, num_stages=1),
)


def prune(configs: Sequence[TileConfig], args: Mapping[str, Any]) -> list[TileConfig]:
    """Rows per program no larger than needed; a K tile no wider than the row (the smallest tile always fits)."""
    k_cap, m_cap = max(256, next_pow2(args["K"])), max(16, next_pow2(args["M"]))
    kept = [c for c in configs if c.block_k <= k_cap and c.block_m <= m_cap]
    return kept or [min(configs, key=lambda c: (c.block_m, c.block_k))]


@jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@jit
def _act_quant_kernel(
    x_ptr, inv_ptr, scale_ptr, q_ptr,
    M, K, M_BUCKET,
    stride_xm, stride_xk, stride_qm,
    DYNAMIC: tl.constexpr, HAS_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    if DYNAMIC:  # pass 1: max|x / s| per row (the row is re-read from cache in pass 2)
        amax = tl.full([BLOCK_M], 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            ok = m_ok[:, None] & (k < K)[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk, mask=ok, other=0.0)
            if HAS_PRE:
                x = x * tl.load(inv_ptr + k, mask=k < K, other=0.0)[None, :]
            amax = tl.maximum(amax, tl.reduce(tl.abs(x.to(tl.float32)), 1, _max_combine))
        scale = tl.maximum(tl.math.div_rn(amax, 127.0), 1e-8)
        tl.store(scale_ptr + offs_m, scale, mask=m_ok)
    else:
        scale = tl.full([BLOCK_M], 0.0, tl.float32) + tl.load(scale_ptr)
    for k0 in range(0, K, BLOCK_K):  # pass 2: codes
        k = k0 + offs_k
        ok = m_ok[:, None] & (k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk, mask=ok, other=0.0)
        if HAS_PRE:
            x = x * tl.load(inv_ptr + k, mask=k < K, other=0.0)[None, :]
        v = tl.math.div_rn(x.to(tl.float32), tl.broadcast_to(scale[:, None], (BLOCK_M, BLOCK_K)))
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)  # clamping before rounding is the same: the bounds are integers
        r = tl.floor(v)
        d = v - r  # exact for |v| <= 127
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        q = tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)  # round half to even, as torch.round
        tl.store(q_ptr + offs_m[:, None] * stride_qm + k[None, :], q.to(tl.int8), mask=ok)


_act_quant_tuned = autotuned(_act_quant_kernel, CONFIGS, KEYS, prune)


# -- inputs -------------------------------------------------------------------------------------------------
def _check(
    x: torch.Tensor, scale: torch.Tensor | None, inv_pre_scale: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    check_tensor(x, "activations", X_DTYPES, ndim=2)
    if scale is not None:
        check_tensor(scale, "static activation scale", (torch.float32, torch.float16))
        if scale.numel() != 1:
            raise KernelInputError(f"a static activation scale is one number, got shape {tuple(scale.shape)}")
        scale = scale.float().reshape(1)
    if inv_pre_scale is not None:
        check_tensor(inv_pre_scale, "inverse pre-scale", X_DTYPES, ndim=1)
        if inv_pre_scale.shape[0] != x.shape[1]:
            raise KernelInputError(
                f"inverse pre-scale has {inv_pre_scale.shape[0]} channels but activations have K={x.shape[1]}"
            )
        inv_pre_scale = inv_pre_scale.contiguous()
    check_same_device(activations=x, scale=scale, inv_pre_scale=inv_pre_scale)
    return scale, inv_pre_scale


# -- torch reference (also the CPU path) ----------------------------------------------------------------
def quantize_act_ref(
    x: torch.Tensor, scale: torch.Tensor | None = None, inv_pre_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [M, K], scales fp32: [M] per token when `scale` is None, else the static [1])."""
    scale, inv_pre_scale = _check(x, scale, inv_pre_scale)
    if inv_pre_scale is not None:
        x = x * inv_pre_scale
    if scale is None:
        per_token = act_scale_per_token(x)  # [M, 1]
        return quantize_act_int8(x, per_token), per_token.reshape(-1)
    return quantize_act_int8(x, scale), scale


# -- Triton -----------------------------------------------------------------------------------------------
def quantize_act_triton(
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    inv_pre_scale: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same result as `quantize_act_ref`, from the Triton kernel (interpreted on CPU tensors).

    `out` (int8 [M, K]) and `out_scale` (fp32 [M], dynamic only) receive the result when given.
    """
    scale, inv_pre_scale = _check(x, scale, inv_pre_scale)
    m, k = x.shape
    q = output(out, (m, k), torch.int8, x.device)
    dynamic = scale is None
    out_scale = output(out_scale, (m,), torch.float32, x.device) if dynamic else scale
    if m == 0:
        return q, out_scale
    args = dict(
        x_ptr=x, inv_ptr=x if inv_pre_scale is None else inv_pre_scale, scale_ptr=out_scale, q_ptr=q,
        M=m, K=k, M_BUCKET=m_bucket(m), stride_xm=x.stride(0), stride_xk=x.stride(1), stride_qm=q.stride(0),
        DYNAMIC=dynamic, HAS_PRE=inv_pre_scale is not None,
    )

    def grid(meta: Mapping[str, int]) -> tuple[int, ...]:
        return (cdiv(m, meta["BLOCK_M"]),)

    launch(_act_quant_kernel, _act_quant_tuned, grid, args, lambda a: prune(CONFIGS, a), config)
    return q, out_scale
