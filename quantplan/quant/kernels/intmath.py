"""Exact integer GEMM pieces for the torch references (the CPU path): int8 products per group or over K, epilogue.

Every int8 product goes through `torch._int_mm` on the CPU (one exact int32 accumulator per dot, as the kernels).
Per group, the weight is kept group-major ([G, N, g], contiguous) so each group's block is a dense matrix, and
rows go 64 at a time: oneDNN's int8 GEMM with K = g slows down by 10-40x above 64 rows (measured, torch 2.13,
2 cores), while a loop over 64-row blocks stays below an fp32 GEMM of the same shape.
"""

from __future__ import annotations

import torch

INT8_PRODUCT = 127 * 128  # largest |x * w| with x in [-127, 127] and w in [-128, 127]
ROWS = 64  # rows per int8 GEMM call in the grouped loop (see the module docstring)


def int_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = x [M, K] int8 @ w [N, K]^T int8, exactly."""
    if x.device.type == "cpu":
        return torch._int_mm(x.contiguous(), w.t())
    assert INT8_PRODUCT * x.shape[1] < 2**53
    return (x.double() @ w.double().t()).to(torch.int32)  # exact; CUDA's _int_mm rejects small or odd shapes


def group_major(w: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K_pad] -> [G, N, g] contiguous: each group's weights as one dense [N, g] block."""
    n = w.shape[0]
    return w.reshape(n, -1, group).transpose(0, 1).contiguous()


def grouped_dot(x: torch.Tensor, w_groups: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [M, N] = sum_g float(x_g @ w_g^T) * scales[g]: design B's per-group float accumulation, in order.

    x [M, G * g] int8, w_groups [G, N, g] int8 (`group_major`), scales [G, N] float32.
    """
    groups, n, g = w_groups.shape
    acc = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
    for r in range(0, x.shape[0], ROWS):
        rows = x[r : r + ROWS]
        for i in range(groups):
            acc[r : r + ROWS] += int_matmul(rows[:, i * g : (i + 1) * g], w_groups[i]).float() * scales[i]
    return acc


def epilogue(
    acc: torch.Tensor, x_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """acc * x_scale (per token or per tensor) + bias, cast to `out_dtype`: the kernels' epilogue in torch."""
    acc = acc * (x_scale[:, None] if x_scale.numel() > 1 else x_scale)
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)
