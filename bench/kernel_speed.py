"""Kernel benchmarks: quantized layers against a float matmul of the same shape, ratios measured in one run.

CUDA: latency of the Triton W4A8 (g128, dynamic per-token int8 activations), W8A8 and W4A16 (g128) layers, the
W4A8 GEMM alone, and torch fp16 `F.linear`; speedup over fp16; effective weight bandwidth against the roofline
floor (packed weight bytes / peak memory bandwidth, `--bandwidth-gbs`, H100 SXM 3350 GB/s by default).
CPU: the torch path (the same integer arithmetic) against an fp32 `nn.Linear` of the same shape, and for the
W4A8/W4A16 layers also the fast CPU kernels (`cpu_kernels="fast"`: bf16 products, rows named "... fast").

    python bench/kernel_speed.py                    # the device it finds; CPU defaults to M in 1 16 64 256
    python bench/kernel_speed.py --m 1 16 --shapes 4096x4096 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F

from quantplan.quant.kernels.dispatch import quantize_activations
from quantplan.quant.kernels.w4a8 import w4a8_triton
from quantplan.quant.plan import LayerSpec
from quantplan.quant.qlinear import FAST_KERNELS, QuantLinear
from quantplan.quant.schemes import ActScheme, LayerScheme

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (K in_features, N out_features)
GPU_MS = (1, 16, 64, 256, 2048)
CPU_MS = (1, 16, 64, 256)
SCHEMES = ("w4g128:a8-dynamic", "w8:a8-dynamic", "w4g128:a16")


@dataclass
class Row:
    """One measurement: a layer scheme (or the float baseline) at one shape and batch size."""

    device: str
    k: int
    n: int
    m: int
    name: str
    ms: float
    baseline_ms: float
    weight_bytes: int

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.ms


def time_ms(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median milliseconds per call (CUDA: triton.testing.do_bench; CPU: wall clock after one warm-up call)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def layers(k: int, n: int, device: str, dtype: torch.dtype,
           schemes: tuple[str, ...] = SCHEMES) -> tuple[torch.Tensor, dict[str, QuantLinear]]:
    gen = torch.Generator().manual_seed(k * 7 + n)
    w = torch.randn(n, k, generator=gen) / k**0.5
    built = {s: QuantLinear.from_float(w, None, LayerSpec(LayerScheme.parse(s))).to(device) for s in schemes}
    if device == "cpu":  # each W4A8/W4A16 layer also with the fast (bf16) CPU kernels
        for s in schemes:
            if built[s].kernel.name in FAST_KERNELS:
                built[f"{s} fast"] = fast = copy.deepcopy(built[s])
                fast.cpu_kernels = "fast"
    return w.to(device, dtype), built


@torch.inference_mode()
def bench_shape(k: int, n: int, ms: tuple[int, ...], device: str, reps: int, bandwidth_gbs: float,
                schemes: tuple[str, ...] = SCHEMES) -> list[Row]:
    dtype = torch.float16 if device == "cuda" else torch.float32
    w, built = layers(k, n, device, dtype, schemes)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=dtype)
        base = time_ms(partial(F.linear, x, w), device, reps)
        name = str(dtype).removeprefix("torch.") + " linear"
        chunk = [Row(device, k, n, m, name, base, base, w.numel() * w.element_size())]
        for scheme, layer in built.items():
            t = time_ms(partial(layer, x), device, reps)
            chunk.append(Row(device, k, n, m, scheme, t, base, layer.packed.nbytes))
        if device == "cuda" and SCHEMES[0] in built:  # the W4A8 GEMM alone, activations already quantized
            pw = built[SCHEMES[0]].packed
            x_q, x_scale = quantize_activations(x, ActScheme.DYNAMIC)
            t = time_ms(partial(w4a8_triton, x_q, x_scale, pw, None, torch.float16), device, reps)
            chunk.append(Row(device, k, n, m, "w4g128 gemm only", t, base, pw.nbytes))
        print_rows(chunk, bandwidth_gbs)
        rows += chunk
    return rows


def print_header(device: str) -> None:
    extra = "    GB/s  floor_us  %peak" if device == "cuda" else ""
    print(f"{'K x N':>13} {'M':>5}  {'layer':<20} {'ms':>9} {'vs float':>8}{extra}")


def print_rows(rows: list[Row], bandwidth_gbs: float) -> None:
    """One line per layer; on CUDA also the weight bandwidth it reached and the roofline floor (weight bytes / BW)."""
    for r in rows:
        line = f"{r.k:>5} x {r.n:<5} {r.m:>5}  {r.name:<20} {r.ms:>9.3f} {r.speedup:>7.2f}x"
        if r.device == "cuda":
            gbs = r.weight_bytes / (r.ms * 1e-3) / 1e9
            line += f" {gbs:>7.0f} {r.weight_bytes / bandwidth_gbs / 1e3:>9.1f} {100 * gbs / bandwidth_gbs:>5.0f}%"
        print(line, flush=True)


def parse_shape(text: str) -> tuple[int, int]:
    k, _, n = text.lower().partition("x")
    return int(k), int(n)


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--m", type=int, nargs="+", help="batch sizes (tokens); default depends on the device")
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=SHAPES, help="KxN (in x out), e.g. 4096x11008")
    p.add_argument("--reps", type=int, default=5, help="CPU repetitions per measurement (median)")
    p.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="peak memory bandwidth for the roofline")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), help="layer schemes (default: %(default)s)")
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    ms = tuple(args.m or (GPU_MS if device == "cuda" else CPU_MS))
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"{torch.cuda.get_device_name() if device == 'cuda' else ''}".rstrip())
    print_header(device)
    rows = [r for k, n in args.shapes
            for r in bench_shape(k, n, ms, device, args.reps, args.bandwidth_gbs, tuple(args.schemes))]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([{**asdict(r), "speedup": r.speedup} for r in rows], f, indent=1)
    return rows


if __name__ == "__main__":
    main()
