"""Exact integer GEMM pieces for the torch references (the CPU path): int8 products per group or over K, epilogue.

Per-channel products go through `torch._int_mm` on the CPU (one int32 accumulator over K, as the kernels). Group
products (g <= 128) are computed in float32 with `torch.bmm`: every product and partial sum is an integer below
2^24 (127 * 128 * 128 < 2^24), so float32 holds it exactly and the result equals the int32 dot bit for bit. That
beats a loop of `torch._int_mm` calls on the CPU, which pay about 10 ms of weight reordering each (measured,
torch 2.13), and a group loop would make one call per group.
"""

from __future__ import annotations

import torch

EXACT_F32 = 2**24  # integers below this are exact in float32
INT8_PRODUCT = 127 * 128  # largest |x * w| with x in [-127, 127] and w in [-128, 127]
CHUNK_ELEMENTS = 1 << 23  # float32 elements of group products held at once (32 MiB)


def int_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = x [M, K] int8 @ w [N, K]^T int8, exactly."""
    if x.device.type == "cpu":
        return torch._int_mm(x.contiguous(), w.t())
    assert INT8_PRODUCT * x.shape[1] < 2**53
    return (x.double() @ w.double().t()).to(torch.int32)  # exact: CUDA's _int_mm rejects small or odd shapes


def grouped_dot(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """float32 [M, N] = sum_g float(x_g @ w_g^T) * scales[g]: design B's per-group float accumulation.

    x [M, K_pad] int8, w [N, K_pad] int8, scales [G, N] float32, K_pad = G * group.
    """
    assert INT8_PRODUCT * group < EXACT_F32, "group products must stay exact in float32"
    m, n, groups = x.shape[0], w.shape[0], scales.shape[0]
    xg = x.reshape(m, groups, group).transpose(0, 1)  # [G, M, g]
    wg = w.reshape(n, groups, group).permute(1, 2, 0)  # [G, g, N]
    acc = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    step = max(1, CHUNK_ELEMENTS // max(m * n, 1))
    for g0 in range(0, groups, step):
        part = torch.bmm(xg[g0 : g0 + step].float(), wg[g0 : g0 + step].float())  # [chunk, M, N] exact integers
        acc += (part * scales[g0 : g0 + step, None, :]).sum(0)
    return acc


def epilogue(
    acc: torch.Tensor, x_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """acc * x_scale (per token or per tensor) + bias, cast to `out_dtype`: the kernels' epilogue in torch."""
    acc = acc * (x_scale[:, None] if x_scale.numel() > 1 else x_scale)
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)
