"""Where tensors live: the `--device` and `--dtype` flags, and host-to-device copies that do not stall the GPU.

`--dtype auto` (every stage's default) runs models in bf16 on GPUs that have it, fp16 on older GPUs and fp32 on
the CPU; fp32 on a GPU uses TF32 tensor cores.

Random numbers in the hot loops are drawn on the CPU (one seeded `torch.Generator` per stream, so results do not
depend on the device). A plain `.to("cuda")` of a pageable CPU tensor synchronises the host with the device; copying
through a pinned staging buffer with `non_blocking=True` queues the copy on the stream instead, so the host can run
ahead and queue the next step. The caching host allocator keeps the pinned buffer alive until the copy is done.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CHOICES = ["auto", *DTYPES]  # what every `--dtype` flag of a stage that runs a model accepts
_NOTED_CPU_HALF: set[str] = set()


def auto_dtype(device: torch.device) -> str:
    """What `--dtype auto` runs a model in on `device`: bf16 on CUDA GPUs of compute capability 8.0 and later
    (A100, H100, RTX 30xx/40xx), fp16 on older GPUs (V100, T4: inversion then scales its loss), fp32 elsewhere."""
    if device.type != "cuda":
        return "fp32"
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"


def dtype_name(dtype: torch.dtype) -> str:
    """The `--dtype` name of a torch dtype (fp32, fp16, bf16), as configs and artifacts record it."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"{dtype} is not one of the model dtypes {sorted(DTYPES)}")


def resolve_dtype_name(name: str, device: torch.device) -> str:
    """`--dtype` as the name it resolves to on `device` (`auto` chosen by `auto_dtype`); refuses unknown names."""
    name = name or "auto"
    if name == "auto":
        return auto_dtype(device)
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not one of {DTYPE_CHOICES}")
    return name


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map a `--dtype` flag to the torch dtype a model runs in on `device`, and set up the device for it.

    fp32 on CUDA turns on TF32 for matmuls and convolutions (the tensor cores, about 8x the IEEE fp32 rate on an
    A100/H100 at a 10-bit mantissa in the products; sums stay fp32). fp16 or bf16 on the CPU are allowed when asked
    for explicitly (tests, checks), with a note: they run far slower there than fp32.
    """
    resolved = resolve_dtype_name(name, device)
    if device.type == "cuda" and resolved == "fp32":
        enable_tf32()
    if device.type == "cpu" and resolved != "fp32" and resolved not in _NOTED_CPU_HALF:
        _NOTED_CPU_HALF.add(resolved)
        print(f"note: --dtype {resolved} on CPU runs much slower than fp32 there (meant for checks; "
              "use --dtype auto or fp32 on CPU)", flush=True)
    return DTYPES[resolved]


def enable_tf32() -> None:
    """TF32 tensor-core math for fp32 matmuls and cuDNN convolutions (process-wide; a no-op without CUDA)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: the precision API (allow_tf32 is on its way out)
        matmul.fp32_precision = "tf32"
        cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        cudnn.allow_tf32 = True


def resolve_device(name: str | None) -> torch.device:
    """`auto` (or None) picks CUDA when available, else CPU. A bare `cuda` under a launcher is `cuda:LOCAL_RANK`."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a valid torch device (try cpu, cuda, cuda:0)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available; pass --device cpu")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`x` on `device`; from CPU to CUDA without a host-device synchronisation (elsewhere a plain `.to`)."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def device_name(device: torch.device) -> str:
    """The device with its model, e.g. `cuda:0 (NVIDIA H200)` or `cpu (AMD EPYC 7B13)`: students trained on other
    processors differ in the last bits, so every entry says which one it ran on."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    model = ""
    if device.type == "cpu":
        try:
            model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.lower().startswith("model name")), "")  # fmt: skip
        except OSError:
            pass
        model = model or platform.processor() or platform.machine()
    return f"{device} ({model})" if model else str(device)
