"""FLOPs and FLOP rates for `promptset run --plan`: networks counted on the meta device (no weights, no memory),
the peak dense FLOP/s of named GPUs, and a rate measured on this machine with a short timed matmul and convolution.

A FLOP is one multiply or one add (a multiply-add is 2), as `torch.utils.flop_counter` counts them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .errors import UserError

# Dense (no structured sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets, per dtype; `auto` is what
# `--dtype auto` runs a model in there (devices.auto_dtype), `fp32` students use TF32 where the GPU has it.
GPU_PEAKS: dict[str, dict] = {
    "h100": {"name": "NVIDIA H100 SXM", "bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9, "auto": "bf16",
             "memory_gb": 80},
    "h200": {"name": "NVIDIA H200 SXM", "bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9, "auto": "bf16",
             "memory_gb": 141},
    "a100": {"name": "NVIDIA A100 SXM", "bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5, "auto": "bf16",
             "memory_gb": 80},
    "l40s": {"name": "NVIDIA L40S", "bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6, "auto": "bf16",
             "memory_gb": 48},
    "l4": {"name": "NVIDIA L4", "bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3, "auto": "bf16",
           "memory_gb": 24},
    "a10": {"name": "NVIDIA A10", "bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2, "auto": "bf16",
             "memory_gb": 24},
    "rtx4090": {"name": "NVIDIA GeForce RTX 4090", "bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6,
                "auto": "bf16", "memory_gb": 24},
    "v100": {"name": "NVIDIA V100 SXM2", "fp16": 125.0, "fp32": 15.7, "auto": "fp16", "memory_gb": 32},
    "t4": {"name": "NVIDIA T4", "fp16": 65.0, "fp32": 8.1, "auto": "fp16", "memory_gb": 16},
}


def gpu_peak(name: str, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s, the dtype it is for) of GPU `name` for a model in `dtype` (auto, fp32, fp16, bf16): fp32 runs on
    TF32 tensor cores where the GPU has them (as promptset sets it up), bf16 falls back to fp16 on GPUs without it."""
    spec = GPU_PEAKS.get(name.lower())
    if spec is None:
        raise UserError(f"--plan-device {name!r}: not one of cpu, {', '.join(GPU_PEAKS)}")
    dtype = spec["auto"] if dtype in ("auto", "") else dtype
    if dtype == "fp32" and "tf32" in spec:
        dtype = "tf32"
    if dtype == "bf16" and "bf16" not in spec:
        dtype = "fp16"
    return spec[dtype] * 1e12, dtype


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything `fn` runs (forward, and backward when it calls it), counted by torch's FlopCounterMode:
    with meta tensors nothing is computed, so a 512 px UNet counts in a fraction of a second."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def train_step_flops(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of a classifier on input `x` with every weight trained."""
    fwd = count_flops(lambda: model(x))

    def step():
        model(x).float().sum().backward()

    return fwd, count_flops(step)


def measure_rate(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> float:
    """FLOP/s this device reaches on a square matmul and a 3x3 convolution, half the time each (after a warm-up):
    the rate a network of such layers runs at, at best."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(device, dtype)
    x = torch.randn(8 if device.type == "cpu" else 64, 128, 32, 32, device=device, dtype=dtype)
    jobs = [(lambda: a @ b, 2 * n**3), (lambda: conv(x), 2 * x.shape[0] * 128 * 128 * 9 * 32 * 32)]
    total_flops, total_time = 0.0, 0.0
    with torch.no_grad():
        for fn, flops in jobs:
            elapsed, reps = _repeat(fn, device, seconds / 2, 200)
            total_flops += reps * flops
            total_time += elapsed
    return total_flops / total_time


def timed(fn: Callable[[], object], device: torch.device, budget: float = 1.0, most: int = 20) -> float:
    """Seconds per call of `fn` on `device`: one warm-up call, then calls until `budget` seconds (at most `most`)."""
    elapsed, reps = _repeat(fn, device, budget, most)
    return elapsed / reps


def _repeat(fn: Callable[[], object], device: torch.device, budget: float, most: int) -> tuple[float, int]:
    """(seconds, calls): one untimed warm-up call of `fn`, then calls until more than `budget` seconds have passed
    or `most` calls were made; on CUDA every call is waited for."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    start, reps = time.perf_counter(), 0
    while True:
        fn()
        reps += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed > budget or reps >= most:
            return elapsed, reps
