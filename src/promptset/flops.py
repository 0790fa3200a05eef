"""FLOPs and FLOP rates for `promptset run --plan`: networks counted on the meta device (no weights, no memory),
the peak dense FLOP/s of named GPUs, and a rate measured on this machine with a short timed matmul and convolution.

A FLOP is one multiply or one add (a multiply-add is 2), as `torch.utils.flop_counter` counts them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .errors import UserError

# Dense (no structured sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets, per dtype (None: no such
# tensor cores); `auto` is what `--dtype auto` runs a model in there (devices.auto_dtype), `fp32` students use TF32
# where the GPU has it.
_GPU_COLUMNS = ("name", "bf16", "fp16", "tf32", "fp32", "auto", "memory_gb")
# fmt: off
_GPU_TABLE = (
    # key       name                       bf16   fp16   tf32   fp32  auto    memory_gb
    ("h100",    "NVIDIA H100 SXM",         989.4, 989.4, 494.7, 66.9, "bf16", 80),
    ("h200",    "NVIDIA H200 SXM",         989.4, 989.4, 494.7, 66.9, "bf16", 141),
    ("a100",    "NVIDIA A100 SXM",         312.0, 312.0, 156.0, 19.5, "bf16", 80),
    ("l40s",    "NVIDIA L40S",             362.1, 362.1, 183.0, 91.6, "bf16", 48),
    ("l4",      "NVIDIA L4",               121.0, 121.0, 60.0,  30.3, "bf16", 24),
    ("a10",     "NVIDIA A10",              125.0, 125.0, 62.5,  31.2, "bf16", 24),
    ("rtx4090", "NVIDIA GeForce RTX 4090", 165.2, 165.2, 82.6,  82.6, "bf16", 24),
    ("v100",    "NVIDIA V100 SXM2",        None,  125.0, None,  15.7, "fp16", 32),
    ("t4",      "NVIDIA T4",               None,  65.0,  None,  8.1,  "fp16", 16),
)
# fmt: on
GPU_PEAKS: dict[str, dict] = {
    key: {col: v for col, v in zip(_GPU_COLUMNS, row) if v is not None} for key, *row in _GPU_TABLE
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
